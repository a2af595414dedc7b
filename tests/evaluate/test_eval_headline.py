"""metrics/<recipe>.json (the DVC metric) holds the headline numbers only, under the keys
they have in metrics/<recipe>.details.json, which holds everything (issue #17)."""

from __future__ import annotations

import json
from pathlib import Path

from dinoalign.evaluate.headline import details_path, headline
from dinoalign.evaluate.outputs import numeric_metrics, write_outputs
from dinoalign.evaluate.run import Evaluation


def _retrieval(clip: bool) -> dict:
    block = {d: {**{f"r{k}": k / 20 for k in (1, 5, 10)}, **{f"chance_r{k}": k / 600 for k in (1, 5, 10)}}
             for d in ("i2t", "t2i")}
    block.update(chance_r1=1 / 600, num_images=600, num_texts=1800)
    if clip:
        block["clip"] = {d: dict(block[d]) for d in ("i2t", "t2i")}
        block["percent_of_clip"] = {d: {f"r{k}": 100.0 for k in (1, 5, 10)} for d in ("i2t", "t2i")}
    return block


def _evaluation(recipe: str) -> dict:
    """An evaluation of the demo world's layout (run.py): seen on top, ``heldout``, ``info``."""
    def block() -> dict:
        seg = ({"skipped": "projector has no dense head"} if recipe == "projector" else
               {"miou": 0.4, "chance_miou": 0.01, "pixel_accuracy": 0.9, "mean_accuracy": 0.5,
                "num_images": 480, "per_class": {"background": 0.9, "red circle": None},
                "bg_threshold": 0.55, "bg_threshold_calibration": None, "background_cleaning": True,
                "pamr": False})
        return {"num_images": 480,
                "zeroshot": {"top1": 0.5, "top5": None, "mean_per_class_recall": 0.5, "chance_top1": 1 / 30,
                             "chance_top5": 1 / 6, "num_images": 300, "num_classes": 30},
                "retrieval": _retrieval(recipe == "projector"), "segmentation": seg}
    return {**block(), "heldout": block(),
            "info": {"recipe": recipe, "model": {"weights_sha256": "ab" * 32}, "seconds": 3.5}}


def test_headline_keeps_the_headline_numbers_under_their_keys() -> None:
    for recipe, count in (("talk2dino", 14), ("projector", 20)):
        full = _evaluation(recipe)
        head = headline(full)
        flat = numeric_metrics(head)
        # top-5 is null (NaN) here: kept as a null, so it is no column of numeric_metrics
        assert head["zeroshot"] == {"top1": 0.5, "top5": None} and len(flat) == count - 2
        assert all(value == numeric_metrics(full)[key] for key, value in flat.items())
        assert not [k for k in flat if "chance" in k or "per_class" in k or "num_" in k or "clip.i2t" in k.replace("percent_of_clip", "")]
        assert "info" not in head and ("segmentation" in head) == (recipe != "projector")
        assert head["heldout"]["retrieval"]["t2i"] == {"r1": 0.05, "r5": 0.25}


def test_write_outputs_writes_the_headline_metric_and_the_details_beside_it(tmp_path: Path) -> None:
    full = _evaluation("talk2dino")
    full["zeroshot"]["top1"] = float("nan")
    write_outputs(Evaluation(metrics=full), tmp_path / "talk2dino.json", tmp_path / "plots")
    details = json.loads(details_path(tmp_path, "talk2dino").read_text())
    assert details["info"]["model"]["weights_sha256"] == "ab" * 32 and details["zeroshot"]["top1"] is None
    assert details["segmentation"]["bg_threshold"] == 0.55  # what the inference commands read
    assert json.loads((tmp_path / "talk2dino.json").read_text()) == headline(details)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "talk2dino.details.json", "talk2dino.json"]


def test_each_recipes_promotion_metric_is_a_headline_number() -> None:
    """`dvc metrics diff` shows the number that decides each recipe's promotion."""
    from dinoalign.evaluate.headline import HEADLINE
    from dinoalign.recipes import RECIPES
    from dinoalign.train.config import recipe_names

    assert {RECIPES.get(n).promotion_metric for n in recipe_names()} <= {".".join(p) for p in HEADLINE}

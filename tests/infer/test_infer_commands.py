"""The inference commands on demo models: segment, classify, index + retrieve, models:/
URIs, and their errors. Each answer is checked against another path to the same number
(the evaluate stage's predictions, a brute-force search over the feature store)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_testing import DemoModels
from PIL import Image

from dinoalign.data.prepare import read_pairs
from dinoalign.embed.store import load_image_features
from dinoalign.stages.evaluate import load_aligned_model


def _run(models: DemoModels, capsys, *args: str) -> tuple[int, dict | str]:
    """``dinoalign *args``: (exit code, the JSON it printed or its error message)."""
    capsys.readouterr()
    code = models.main(*args)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def _classify(model: str, image: str, classes: str, *extra: str) -> list[str]:
    """The argv of ``dinoalign classify``: ``model`` on ``image`` against the comma-separated
    ``classes``, then ``extra`` options."""
    return ["classify", "--model", model, "--image", image, "--classes", classes, *extra]


def _evaluated_test_image(
    models: DemoModels, recipe: str, subset: str = "seen"
) -> tuple[dict, Path]:
    """A single-object test image the evaluate stage predicted, and its saved label map."""
    with open(models.root / "plots" / recipe / "zeroshot_predictions.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["subset"] == subset)
    pairs = {r["uid"]: r for r in read_pairs(models.features.pairs_dir).to_pylist()}
    return {
        **pairs[row["uid"]],
        **row,
    }, models.root / "plots" / recipe / "predictions" / subset / f"{row['uid']}.png"


@pytest.mark.parametrize("recipe", ["talk2dino", "dinotxt"])
def test_segment_gives_the_evaluate_stages_label_map(
    evaluated_demo: DemoModels, tmp_path: Path, capsys, recipe: str
) -> None:
    row, evaluated = _evaluated_test_image(evaluated_demo, recipe)
    classes = evaluated_demo.features.world["classes"]
    code, result = _run(
        evaluated_demo,
        capsys,
        "segment",
        "--model",
        str(evaluated_demo.model_dir(recipe)),
        "--image",
        row["image_uri"],
        "--classes",
        ",".join(classes),
        "--out",
        str(tmp_path / "mask.png"),
        "--overlay",
        str(tmp_path / "overlay.png"),
    )
    assert code == 0, result
    with Image.open(tmp_path / "mask.png") as mask:
        assert mask.mode == "P"
        labels = np.asarray(mask)
    # same classes, templates, windows and threshold (0 = background, c+1 = class c)
    np.testing.assert_array_equal(labels, np.asarray(Image.open(evaluated)))
    assert (
        result["labels"]["0"] == "background" and result["labels"][str(len(classes))] == classes[-1]
    )
    assert sum(result["pixel_fraction"].values()) == pytest.approx(1.0)
    # the threshold the evaluate stage used for these weights, read from its metrics
    metrics = evaluated_demo.root / "metrics" / f"{recipe}.details.json"
    assert result["bg_threshold_from"].startswith(str(metrics))
    with Image.open(tmp_path / "overlay.png") as overlay:  # the image above its legend
        assert overlay.width >= labels.shape[1] and overlay.height > labels.shape[0]


def test_classify_ranks_like_the_evaluate_stage(evaluated_demo: DemoModels, capsys) -> None:
    row, _ = _evaluated_test_image(evaluated_demo, "talk2dino")
    classes = evaluated_demo.features.world["classes"]
    code, result = _run(
        evaluated_demo,
        capsys,
        *_classify(
            str(evaluated_demo.model_dir("talk2dino")),
            row["image_uri"],
            ",".join(classes),
            "--top-k",
            str(len(classes)),
        ),
    )
    assert code == 0, result
    predictions = result["predictions"]
    assert (
        predictions[0]["class"] == row["predicted"]
    )  # images from pixels here, from the store there
    assert [p["class"] for p in predictions] != classes and sorted(
        p["class"] for p in predictions
    ) == sorted(classes)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    # issue #17: the softmax at talk2dino's own trained scale 1/τ (τ = 0.07, fixed), not CLIP's 100
    assert result["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    expected = torch.softmax(result["logit_scale"] * torch.tensor(scores, dtype=torch.float64), 0)
    assert [p["probability"] for p in predictions] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("recipe", ["talk2dino", "projector"])
def test_index_and_retrieve_find_the_brute_force_top_k(
    demo_models: DemoModels, tmp_path: Path, capsys, recipe: str
) -> None:
    index_dir = tmp_path / "index"
    code, built = _run(
        demo_models,
        capsys,
        "index",
        "--model",
        str(demo_models.model_dir(recipe)),
        "--out",
        str(index_dir),
    )
    assert code == 0, built
    assert built["items"] == 676 and built["vectors_per_item"] == (
        3 if recipe == "talk2dino" else 1
    )
    text = "a red circle above a blue square"
    code, found = _run(
        demo_models,
        capsys,
        "retrieve",
        "--model",
        str(demo_models.model_dir(recipe)),
        "--index",
        str(index_dir),
        "--text",
        text,
        "-k",
        "5",
    )
    assert code == 0, found
    # brute force over the feature store with the recipe's own pair score
    model = load_aligned_model(
        demo_models.params(), demo_models.features.root, str(demo_models.model_dir(recipe)), "cpu"
    )
    column = "head_embeddings" if recipe == "talk2dino" else "token_mean"
    store = load_image_features(str(demo_models.features.features_dir), [column])
    scores = model.scores(
        model.encode_texts([text]), {column: torch.from_numpy(store[column].astype(np.float32))}
    )[0]
    best = torch.argsort(scores, descending=True)[:5].tolist()
    assert [r["uid"] for r in found["results"]] == [store["uid"][i] for i in best]
    assert [r["score"] for r in found["results"]] == pytest.approx(
        [float(scores[i]) for i in best], abs=1e-5
    )
    assert [r["rank"] for r in found["results"]] == [1, 2, 3, 4, 5]
    assert all(Path(r["image_uri"]).is_file() for r in found["results"])
    pairs = {r["uid"]: r for r in read_pairs(demo_models.features.pairs_dir).to_pylist()}
    assert [r["captions"] for r in found["results"]] == [pairs[r["uid"]]["captions"] for r in found["results"]]


def test_a_registered_model_uri_works_like_its_folder(demo_models: DemoModels, capsys) -> None:
    import mlflow

    from dinoalign.serve import log_model
    from dinoalign.tracking import MODEL_ARTIFACT, register_model

    mlflow.set_tracking_uri(f"sqlite:///{demo_models.root / 'mlruns.db'}")
    mlflow.set_experiment("serve-test")
    with mlflow.start_run():  # logged and registered as the align stage does it
        logged = log_model(demo_models.model_dir("projector"), demo_models.params(),
                           demo_models.root, MODEL_ARTIFACT)
        register_model("projector", "dinoalign", logged.model_uri)
    mlflow.set_tracking_uri(None)
    image = read_pairs(demo_models.features.pairs_dir).to_pylist()[0]["image_uri"]
    answers = [
        _run(demo_models, capsys, *_classify(model, image, "red circle,blue square"))[1]
        for model in (
            "models:/dinoalign-projector@candidate",
            str(demo_models.model_dir("projector")),
        )
    ]
    assert answers[0]["predictions"] == answers[1]["predictions"]
    code, message = _run(
        demo_models, capsys, *_classify("models:/dinoalign-projector@champion", image, "red circle")
    )
    assert code == 2 and "could not resolve 'models:/dinoalign-projector@champion'" in message


def test_clear_errors(demo_models: DemoModels, tmp_path: Path, capsys) -> None:
    model = str(demo_models.model_dir("talk2dino"))
    image = read_pairs(demo_models.features.pairs_dir).to_pylist()[0]["image_uri"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(image).read_bytes()[:300])
    cases = [
        (_classify(str(tmp_path / "none"), image, "red circle"), "no trained model at"),
        (_classify(model, str(broken), "red circle"), "cannot use image"),
        (_classify(model, str(tmp_path / "absent.png"), "red circle"), "missing"),
        (
            _classify(model, image, "red circle,cat"),
            "unknown classes for this talk2dino model: 'cat' (cat)",
        ),
        (_classify(model, image, "red circle,,blue square"), "empty class name"),
        (_classify(model, image, "red circle,Red Circle"), "given twice"),
        (
            [
                "segment",
                "--model",
                str(demo_models.model_dir("projector")),
                "--image",
                image,
                "--classes",
                "red circle",
                "--out",
                str(tmp_path / "m.png"),
            ],
            "projector has no dense head",
        ),
        (
            ["retrieve", "--model", model, "--index", str(tmp_path), "--text", "a red circle"],
            "is not an index folder",
        ),
        (
            ["retrieve", "--model", model, "--index", str(tmp_path), "--text", "  "],
            "--text is empty",
        ),
    ]
    for args, message in cases:
        code, err = _run(demo_models, capsys, *args)
        assert code == 2 and message in err, (args, err)
    assert not (tmp_path / "m.png").exists()
    code, result = _run(
        demo_models, capsys, *_classify(model, image, "red circle,cat", "--allow-unknown")
    )
    assert code == 0 and {p["class"] for p in result["predictions"]} == {"red circle", "cat"}
    index_dir = tmp_path / "idx"
    assert (
        _run(
            demo_models,
            capsys,
            "index",
            "--model",
            model,
            "--out",
            str(index_dir),
            "--split",
            "val",
        )[0]
        == 0
    )
    code, err = _run(
        demo_models,
        capsys,
        "retrieve",
        "--model",
        str(demo_models.model_dir("projector")),
        "--index",
        str(index_dir),
        "--text",
        "a red circle",
    )
    assert code == 2 and "was built with another model" in err

"""The evaluate stage on the demo world (real prepare/teacher/embed outputs, seeded
untrained models): every metric of metrics/<recipe>.details.json against an independent
computation, metrics/<recipe>.json its headline subset, the plots and MLflow records, the registered-dataset path, and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from pipeline_testing import DemoModels
from PIL import Image

from dinoalign.backbones.text import build_text_encoder
from dinoalign.config import ConfigError
from dinoalign.data.images import image_limits, load_image, load_mask
from dinoalign.data.prepare import read_pairs, split_digest
from dinoalign.embed.store import load_image_features
from dinoalign.evaluate.headline import headline
from dinoalign.evaluate.templates import TALK2DINO_TEMPLATES, resolve_templates
from dinoalign.recipes import load_recipe
from dinoalign.stages.evaluate import load_aligned_model
from dinoalign.tracking import logged_model_id

MAX_IMAGES = 24  # evaluate.max_images of the demo_models overrides


def _metrics(models: DemoModels, recipe: str) -> dict:
    return json.loads((models.root / "metrics" / f"{recipe}.details.json").read_text())


def _subset_rows(models: DemoModels, subset: str) -> list[dict]:
    """The test rows the stage evaluated for ``subset``: world.json's held-out uids decide
    the subset, uid order, the first MAX_IMAGES."""
    heldout = set(models.features.world["heldout_uids"]["test"])
    rows = [r for r in read_pairs(models.features.pairs_dir).to_pylist() if r["split"] == "test"]
    rows = [
        r
        for r in sorted(rows, key=lambda r: r["uid"])
        if (r["uid"] in heldout) == (subset == "heldout")
    ]
    return rows[:MAX_IMAGES]


def _block(metrics: dict, subset: str) -> dict:
    return metrics if subset == "seen" else metrics["heldout"]


def _recall_by_brute_force(scores: np.ndarray, owner: list[int], k: int) -> tuple[float, float]:
    """scores T×M (captions × images): (image→text R@k, text→image R@k) by loops. A
    query hits when fewer than k negatives score at least as high as its best positive
    (ties count against: the demo world repeats captions, so caption scores do tie)."""
    n_texts, n_images = scores.shape

    def hit(row: np.ndarray, positive: list[bool]) -> bool:
        best = max(v for v, p in zip(row, positive) if p)
        return sum(1 for v, p in zip(row, positive) if not p and v >= best) < k

    i2t = np.mean(
        [hit(scores[:, i], [owner[t] == i for t in range(n_texts)]) for i in range(n_images)]
    )
    t2i = np.mean(
        [hit(scores[t], [owner[t] == i for i in range(n_images)]) for t in range(n_texts)]
    )
    return float(i2t), float(t2i)


def _psi(state: dict, text: torch.Tensor) -> torch.Tensor:
    """talk2dino's ψ(t) = W2·tanh(W1·t + b1) + b2 from the saved weights, normalised."""
    hidden = torch.tanh(text @ state["proj_in.weight"].T + state["proj_in.bias"])
    return F.normalize(hidden @ state["proj_out.weight"].T + state["proj_out.bias"], dim=-1)


@pytest.mark.parametrize("subset", ["seen", "heldout"])
def test_talk2dino_zeroshot_and_retrieval_match_a_by_hand_computation(
    evaluated_demo: DemoModels, subset: str
) -> None:
    models = evaluated_demo
    block = _block(_metrics(models, "talk2dino"), subset)
    rows = _subset_rows(models, subset)
    uids = [r["uid"] for r in rows]
    heads = torch.from_numpy(
        load_image_features(str(models.features.features_dir), ["head_embeddings"], uids)[
            "head_embeddings"
        ]
    )
    heads = F.normalize(heads.float(), dim=-1)  # M×H×D, rows in uid order = rows order
    state = safetensors.torch.load_file(str(models.model_dir("talk2dino") / "model.safetensors"))
    tower = build_text_encoder("open_clip", f"local-dir:{models.features.clip_dir}")
    classes = models.features.world["classes"]

    # zero-shot: raw CLIP features averaged over the 7 templates, then ψ; best head per image
    raw = torch.stack(
        [tower.encode([t.replace("{}", c) for t in TALK2DINO_TEMPLATES]).mean(0) for c in classes]
    )
    class_hat = _psi(state, raw)
    single = [i for i, r in enumerate(rows) if r["label"] is not None]
    labels = np.array([classes.index(rows[i]["label"]) for i in single])
    scores = np.array(
        [
            [
                max(float(class_hat[c] @ heads[i, h]) for h in range(heads.shape[1]))
                for c in range(len(classes))
            ]
            for i in single
        ]
    )
    order = np.argsort(-scores, axis=1)
    assert block["zeroshot"]["num_images"] == len(single) > 0
    assert block["zeroshot"]["top1"] == pytest.approx(np.mean(order[:, 0] == labels))
    assert block["zeroshot"]["top5"] == pytest.approx(
        np.mean([labels[j] in order[j, :5] for j in range(len(single))])
    )
    recalls = [np.mean(order[labels == c, 0] == c) for c in np.unique(labels)]
    assert block["zeroshot"]["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    assert block["zeroshot"]["chance_top1"] == pytest.approx(1 / 30) and block["zeroshot"][
        "chance_top5"
    ] == pytest.approx(5 / 30)

    # retrieval: every caption of these images, scored by its best head
    captions = [c for r in rows for c in r["captions"]]
    owner = [i for i, r in enumerate(rows) for _ in r["captions"]]
    text_hat = _psi(state, tower.encode(captions))
    pair_scores = torch.einsum("td,mhd->tmh", text_hat, heads).amax(-1).numpy()
    retrieval = block["retrieval"]
    assert retrieval["num_images"] == len(rows) and retrieval["num_texts"] == len(captions)
    for k in (1, 5, 10):
        i2t, t2i = _recall_by_brute_force(pair_scores, owner, k)
        assert retrieval["i2t"][f"r{k}"] == pytest.approx(i2t)
        assert retrieval["t2i"][f"r{k}"] == pytest.approx(t2i)
    assert retrieval["chance_r1"] == pytest.approx(1 / len(rows))
    assert retrieval["t2i"]["chance_r5"] == pytest.approx(5 / len(rows))


def test_projector_retrieval_and_its_percentage_of_clip_by_hand(evaluated_demo: DemoModels) -> None:
    models = evaluated_demo
    retrieval = _metrics(models, "projector")["retrieval"]
    rows = _subset_rows(models, "seen")
    uids = [r["uid"] for r in rows]
    feats = load_image_features(
        str(models.features.features_dir), ["token_mean", "clip_image"], uids
    )
    projector = load_recipe(str(models.model_dir("projector")))
    with torch.no_grad():
        image = F.normalize(
            projector.projector(torch.from_numpy(feats["token_mean"])), dim=-1
        ).numpy()
    clip_image = F.normalize(torch.from_numpy(feats["clip_image"]), dim=-1).numpy()
    captions = [c for r in rows for c in r["captions"]]
    owner = [i for i, r in enumerate(rows) for _ in r["captions"]]
    text = F.normalize(
        build_text_encoder("open_clip", f"local-dir:{models.features.clip_dir}").encode(captions),
        dim=-1,
    ).numpy()
    for k in (1, 5, 10):
        mine = _recall_by_brute_force(text @ image.T, owner, k)
        clip = _recall_by_brute_force(text @ clip_image.T, owner, k)
        for direction, ours, theirs in zip(("i2t", "t2i"), mine, clip):
            assert retrieval[direction][f"r{k}"] == pytest.approx(ours)
            assert retrieval["clip"][direction][f"r{k}"] == pytest.approx(theirs)
            percent = retrieval["percent_of_clip"][direction][f"r{k}"]
            assert percent == (pytest.approx(100 * ours / theirs) if theirs else None)
    # the teacher CLIP learnt the demo world: its own retrieval is far above chance
    assert retrieval["clip"]["t2i"]["r5"] > 3 * retrieval["t2i"]["chance_r5"]


@pytest.mark.parametrize("subset", ["seen", "heldout"])
def test_projector_zeroshot_beside_its_teacher_clip_by_hand(evaluated_demo: DemoModels, subset: str) -> None:
    """The projector's zero-shot against CLIP text is read against the teacher CLIP's own
    images classified by the same class texts (CLIP protocol: each template normalised,
    averaged, renormalised), on the same single-object images."""
    models = evaluated_demo
    zeroshot = _block(_metrics(models, "projector"), subset)["zeroshot"]
    rows = _subset_rows(models, subset)
    single = [i for i, r in enumerate(rows) if r["label"] is not None]
    classes = models.features.world["classes"]
    labels = np.array([classes.index(rows[i]["label"]) for i in single])
    uids = [rows[i]["uid"] for i in single]
    clip_image = F.normalize(
        torch.from_numpy(load_image_features(str(models.features.features_dir), ["clip_image"], uids)["clip_image"]),
        dim=-1,
    )
    tower = build_text_encoder("open_clip", f"local-dir:{models.features.clip_dir}")
    templates = resolve_templates(models.params().evaluate.zeroshot_templates)
    class_emb = torch.stack(
        [F.normalize(F.normalize(tower.encode([t.replace("{}", c) for t in templates]), dim=-1).mean(0), dim=-1)
         for c in classes]
    )
    order = torch.argsort(clip_image @ class_emb.T, dim=1, descending=True).numpy()
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([labels[j] in order[j, :5] for j in range(len(single))])
    assert zeroshot["clip"]["top1"] == pytest.approx(top1) and zeroshot["clip"]["top5"] == pytest.approx(top5)
    assert zeroshot["percent_of_clip"]["top1"] == (pytest.approx(100 * zeroshot["top1"] / top1) if top1 else None)
    if subset == "seen":  # the teacher learnt the world: its own zero-shot is far above chance
        assert top1 > 3 * zeroshot["chance_top1"]
    for recipe in ("talk2dino", "dinotxt"):  # only the recipe that maps into CLIP space has a reference
        assert "clip" not in _block(_metrics(models, recipe), subset)["zeroshot"]


@pytest.mark.parametrize("recipe", ["talk2dino", "dinotxt"])
def test_segmentation_miou_equals_a_hand_built_confusion_matrix(
    evaluated_demo: DemoModels, recipe: str
) -> None:
    models = evaluated_demo
    metrics = _metrics(models, recipe)
    names = ["background", *models.features.world["classes"]]
    for subset in ("seen", "heldout"):
        seg = _block(metrics, subset)["segmentation"]
        matrix = np.zeros((len(names), len(names)), dtype=np.int64)
        for row in _subset_rows(models, subset):
            gt = load_mask(row["mask_uri"]).astype(np.int64)
            pred = np.asarray(
                Image.open(
                    models.root / "plots" / recipe / "predictions" / subset / f"{row['uid']}.png"
                )
            )
            assert pred.shape == gt.shape
            for g, p in zip(gt.ravel(), pred.ravel()):
                matrix[g, p] += 1
        ious = {}
        for c, name in enumerate(names):
            tp, fp, fn = (
                matrix[c, c],
                matrix[:, c].sum() - matrix[c, c],
                matrix[c, :].sum() - matrix[c, c],
            )
            ious[name] = tp / (tp + fp + fn) if tp + fp + fn else None
        assert seg["per_class"] == pytest.approx(ious)
        assert seg["miou"] == pytest.approx(np.mean([v for v in ious.values() if v is not None]))
        share = matrix.sum(1) / matrix.sum()
        assert seg["chance_miou"] == pytest.approx(np.mean(share / (1 + (len(names) - 1) * share)))
        assert seg["num_images"] == MAX_IMAGES
        assert seg["background_cleaning"] is (recipe == "talk2dino") and seg["bg_threshold"] == 0.5


def test_metrics_json_plots_and_mlflow_records(evaluated_demo: DemoModels) -> None:
    from mlflow import MlflowClient

    models = evaluated_demo
    for recipe in DemoModels.RECIPES:
        metrics = _metrics(models, recipe)
        assert json.loads((models.root / "metrics" / f"{recipe}.json").read_text()) == headline(metrics)
        assert metrics["info"]["subsets"] == {"seen": MAX_IMAGES, "heldout": MAX_IMAGES}
        assert metrics["info"]["model"]["recipe"] == recipe
        weights = (models.model_dir(recipe) / "model.safetensors").read_bytes()
        assert metrics["info"]["model"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
        plots = models.root / "plots" / recipe
        predictions = (plots / "zeroshot_predictions.csv").read_text().splitlines()
        single = sum(
            r["label"] is not None for s in ("seen", "heldout") for r in _subset_rows(models, s)
        )
        assert predictions[0] == "subset,uid,actual,predicted" and len(predictions) == 1 + single
        if recipe == "projector":
            assert metrics["segmentation"] == {"skipped": "projector has no dense head"}
            assert not (plots / "examples").exists()
        else:
            assert sorted(p.name for p in (plots / "examples").iterdir()) == [
                "heldout-00.png",
                "heldout-01.png",
                "seen-00.png",
                "seen-01.png",
            ]
            per_class = (plots / "per_class_iou.csv").read_text().splitlines()
            assert per_class[0] == "class,seen,heldout" and len(per_class) == 32
            assert all(
                v is None or 0 <= v <= 1 for v in metrics["segmentation"]["per_class"].values()
            )
            with Image.open(plots / "segmentation_confusion_seen.png") as img:
                assert img.size[0] == img.size[1] > 31
        client = MlflowClient(f"sqlite:///{models.root / 'mlruns.db'}")
        run = client.get_run(metrics["info"]["mlflow"]["run_id"])
        assert run.data.tags["mlflow.runName"] == f"evaluate@{recipe}"
        assert run.data.tags["dinoalign.model_sha256"] == metrics["info"]["model"]["weights_sha256"]
        assert run.data.metrics["zeroshot.top1"] == pytest.approx(metrics["zeroshot"]["top1"])
        assert run.data.metrics["heldout.retrieval.t2i.r5"] == pytest.approx(
            metrics["heldout"]["retrieval"]["t2i"]["r5"]
        )
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert f"{recipe}.json" in artifacts and (recipe == "projector") != (
            "examples" in artifacts
        )
        # the evaluation split as the run's dataset, its digest the split's uids
        (evaluated,) = run.inputs.dataset_inputs
        assert (evaluated.dataset.name, evaluated.dataset.digest) == (
            "pairs:test", split_digest(read_pairs(models.features.pairs_dir), "test"))

    # issue #16: the metrics reach the registered version of the weights they measured (the
    # evaluated_demo fixture registered dinotxt's only): its tags and its logged model
    (version,) = client.search_model_versions("name = 'dinoalign-dinotxt'")
    dinotxt = _metrics(models, "dinotxt")
    assert version.tags["dinoalign.eval.zeroshot.top1"] == f"{dinotxt['zeroshot']['top1']:.6f}"
    assert version.tags["dinoalign.eval.run_id"] == dinotxt["info"]["mlflow"]["run_id"]
    logged = {m.key: m.value for m in client.get_logged_model(logged_model_id(version.source)).metrics}
    assert logged["heldout.retrieval.t2i.r5"] == pytest.approx(dinotxt["heldout"]["retrieval"]["t2i"]["r5"])
    assert [m.name for m in client.search_registered_models()] == ["dinoalign-dinotxt"]


@pytest.mark.parametrize(
    "recipe, columns",
    [
        ("talk2dino", ("head_embeddings",)),
        ("dinotxt", ("tokens_vision",)),
        ("projector", ("token_mean",)),
    ],
)
def test_images_take_the_embed_stages_path(
    demo_models: DemoModels, recipe: str, columns: tuple[str, ...]
) -> None:
    """Features computed from the images match the feature store: evaluation, the
    inference commands and training see the same preprocessing and backbone."""
    params = demo_models.params()
    model = load_aligned_model(params, demo_models.features.root, str(demo_models.model_dir(recipe)), "cpu")
    rows = _subset_rows(demo_models, "seen")[:4]
    images = [
        load_image(r["image_uri"], **image_limits(params.data))
        for r in rows
    ]
    online = model.image_batch(images)
    stored = model.store_batch(str(demo_models.features.features_dir), [r["uid"] for r in rows])
    for column in columns:
        # dinotxt's cached tokens are fp16 in the store
        tolerance = 2e-3 if recipe == "dinotxt" else 1e-4
        torch.testing.assert_close(online[column], stored[column], rtol=tolerance, atol=tolerance)


def _folder_segmentation(root: Path) -> None:
    """A generic images + labels + class-names layout; sizes that are no multiple of 14."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\nred circle\nblue square\n")
    for i, (h, w) in enumerate([(90, 130), (101, 77)]):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 3, (h, w)).astype(np.uint8)
        label[:5] = 255
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")


def _class_folders(root: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("red circle", "blue square"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
                root / name / f"{i}.jpg"
            )


def _karpathy(root: Path) -> None:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    images = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        images.append(
            {
                "filename": f"{i}.jpg",
                "split": "test",
                "sentences": [{"raw": f"a red circle {i}"}, {"raw": "a blue square"}],
            }
        )
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))


@pytest.mark.parametrize(
    "recipe, dataset, make, options, task",
    [
        (
            "talk2dino",
            "folder",
            _folder_segmentation,
            "{image_suffix: .png, has_background: true}",
            "segmentation",
        ),
        ("dinotxt", "imagenet_folder", _class_folders, "{}", "zeroshot"),
        ("projector", "karpathy", _karpathy, "{json_file: dataset_flickr8k.json}", "retrieval"),
    ],
)
def test_registered_datasets_are_evaluated_by_their_task(
    demo_models: DemoModels,
    tmp_path: Path,
    recipe: str,
    dataset: str,
    make,
    options: str,
    task: str,
) -> None:
    make(tmp_path / "data")
    out = tmp_path / "out"
    assert (
        demo_models.main(
            "evaluate",
            f"evaluate.recipes=[{recipe}]",
            f"evaluate.dataset={dataset}",
            f"evaluate.root={tmp_path / 'data'}",
            f"evaluate.dataset_options={options}",
            f"paths.metrics={out}",
            f"paths.plots={out / 'plots'}",
        )
        == 0
    )
    metrics = json.loads((out / f"{recipe}.details.json").read_text())
    assert (
        metrics["info"]["task"] == task.replace("zeroshot", "classification")
        and "heldout" not in metrics
    )
    assert [k for k in ("zeroshot", "retrieval", "segmentation") if k in metrics] == [task]
    if task == "segmentation":
        seg = metrics["segmentation"]
        assert (
            set(seg["per_class"]) == {"background", "red circle", "blue square"}
            and seg["num_images"] == 2
        )
        predictions = sorted((out / "plots" / recipe / "predictions" / "all").glob("*.png"))
        matrix = np.zeros((3, 3), dtype=np.int64)
        for pred_path in predictions:
            gt = np.asarray(Image.open(tmp_path / "data" / "labels" / pred_path.name)).astype(
                np.int64
            )
            pred = np.asarray(Image.open(pred_path)).astype(np.int64)
            keep = gt != 255
            np.add.at(matrix, (gt[keep], pred[keep]), 1)
        iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
        assert len(predictions) == 2 and seg["miou"] == pytest.approx(np.nanmean(iou))
    elif task == "zeroshot":
        rows = (out / "plots" / recipe / "zeroshot_predictions.csv").read_text().splitlines()[1:]
        hits = [r.split(",")[2] == r.split(",")[3] for r in rows]
        assert metrics["zeroshot"]["num_images"] == len(rows) == 4
        assert (
            metrics["zeroshot"]["top1"] == pytest.approx(np.mean(hits))
            and metrics["zeroshot"]["chance_top1"] == 0.5
        )
    else:
        retrieval = metrics["retrieval"]
        assert retrieval["num_images"] == 3 and retrieval["num_texts"] == 6
        assert set(retrieval["percent_of_clip"]) == {"i2t", "t2i"}
        assert (
            retrieval["t2i"]["chance_r1"] == pytest.approx(1 / 3) and retrieval["t2i"]["r5"] == 1.0
        )


def test_background_threshold_chosen_on_val_is_recorded_and_used(
    demo_models: DemoModels, tmp_path: Path
) -> None:
    from dinoalign.evaluate.demo import DemoSegmentation, load_demo
    from dinoalign.evaluate.metrics import ConfusionMatrix
    from dinoalign.evaluate.segmentation import make_predictor

    out = tmp_path / "out"
    overrides = (
        "evaluate.recipes=[talk2dino]",
        "evaluate.bg_threshold_split=val",
        "evaluate.bg_threshold_images=8",
        f"paths.metrics={out}",
        f"paths.plots={out / 'plots'}",
        "evaluate.max_images=6",
    )
    assert demo_models.main("evaluate", *overrides) == 0
    metrics = json.loads((out / "talk2dino.details.json").read_text())
    seg, heldout = metrics["segmentation"], metrics["heldout"]["segmentation"]
    calibration = seg["bg_threshold_calibration"]
    assert calibration["split"] == "val" and calibration["images"] == 8
    assert heldout["bg_threshold"] == seg["bg_threshold"] != 0.5  # not the params' value
    # the recorded val mIoU is that of the recorded threshold on the first 8 val images
    params = demo_models.params(*overrides)
    root = demo_models.features.root
    model = load_aligned_model(params, root, str(demo_models.model_dir("talk2dino")), "cpu")
    val, _ = load_demo(demo_models.features.pairs_dir, "synthetic", "val", root)
    dataset = DemoSegmentation(val["seen"].head(8), image_limits(params.data))
    names = list(dataset.class_names[1:])
    classes = model.class_embeddings(names, params.evaluate.dense_templates)
    cfg = dataclasses.replace(params.evaluate.segmentation, bg_threshold=seg["bg_threshold"])
    predict = make_predictor(model.dense_logits_fn(classes, True), dataset, cfg)
    confusion = ConfusionMatrix(len(dataset.class_names))
    for image, label, _uid in dataset:
        confusion.update(predict(image), torch.from_numpy(label))
    assert calibration["miou"] == pytest.approx(confusion.miou())
    with pytest.raises(ConfigError, match="must be chosen on other images"):
        demo_models.params("evaluate.bg_threshold_split=test")


def test_clear_errors_for_missing_or_mismatched_models_and_bad_settings(
    demo_models: DemoModels, tmp_path: Path, capsys
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    # InferenceErrors: one line and exit 2 from `dinoalign evaluate` (they were tracebacks)
    capsys.readouterr()
    assert demo_models.main("evaluate", "evaluate.recipes=[talk2dino]", f"paths.models={empty}") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dinoalign evaluate: no trained model at ") and "talk2dino" in err
    assert "lacks config.json, model.safetensors" in err
    shutil.copytree(demo_models.model_dir("dinotxt"), empty / "talk2dino")
    assert demo_models.main("evaluate", "evaluate.recipes=[talk2dino]", f"paths.models={empty}") == 2
    assert "holds a dinotxt model, not talk2dino" in capsys.readouterr().err
    assert demo_models.main("evaluate", "evaluate.dataset=voc12") == 2
    assert "did you mean 'voc21'" in capsys.readouterr().err.lower()
    with pytest.raises(ConfigError, match="needs evaluate.root"):
        demo_models.params("evaluate.dataset=voc21")
    with pytest.raises(ConfigError, match="unknown template set"):
        demo_models.params("evaluate.dense_templates=imagenet")

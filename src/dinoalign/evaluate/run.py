"""Evaluating one trained recipe: :func:`evaluate_model` gives every metric of an
:class:`~dinoalign.model.AlignedModel` on ``evaluate.dataset`` (the demo world's test
split, or a registered dataset) and the material for its plots, as an :class:`Evaluation`.
It takes the ``evaluate`` section and the :class:`EvaluationInputs` (locations and image
bounds) that the evaluate stage (:mod:`dinoalign.stages.evaluate`) resolves from the
params; the stage writes the result with :mod:`dinoalign.evaluate.outputs`, and
``dinoalign retrain`` compares models with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinoalign.evaluate.config import DEMO_DATASET, EvaluateConfig
from dinoalign.evaluate.demo import DemoImages, DemoSegmentation, load_demo
from dinoalign.model import AlignedModel
from dinoalign.evaluate.retrieval import (
    percent_of_reference,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
)
from dinoalign.evaluate.segmentation import (
    SegmentationConfig,
    calibrate_bg_threshold,
    evaluate_segmentation,
    make_predictor,
    scored_class_names,
)
from dinoalign.evaluate.visualize import (
    class_palette,
    overlay,
    panels,
    with_legend,
)
from dinoalign.evaluate.zeroshot import classification_metrics, zeroshot_logits
from dinoalign.storage import under_root

STAGE = "evaluate"
PREDICTIONS_CSV = "zeroshot_predictions.csv"
PER_CLASS_CSV = "per_class_iou.csv"
EXAMPLES_DIR = "examples"
TOP_LEVEL_SUBSET = "seen"  # the demo's top-level blocks; "heldout" gets its own block


@dataclasses.dataclass(frozen=True)
class EvaluationInputs:
    """What an evaluation reads besides the model and the ``evaluate`` section, resolved
    once at the boundary (:func:`dinoalign.stages.evaluate.evaluation_inputs`)."""

    pairs: Path  # paths.pairs: the demo world's manifest (images, captions, labels, masks)
    demo_source: str  # data.synthetic.source: the folder of world.json under ``pairs``
    features: str  # paths.features: the embed stage's store, a local path or an s3:// URI
    plots: Path  # paths.plots: ``<plots>/<recipe>/predictions`` with ``save_predictions``
    image_limits: dict[str, Any]  # load_image's bounds (data.*, from image_limits)
    root: Path  # the checkout: manifest URIs and ``evaluate.root`` are relative to it


@dataclasses.dataclass
class Evaluation:
    """Everything the evaluation of one recipe produced: ``metrics`` (the JSON) and the
    material for the plots, per subset (``seen``/``heldout`` on the demo, ``all`` for a
    registered dataset)."""

    metrics: dict[str, Any]
    predictions: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    per_class_iou: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    confusion: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    class_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # confusion rows
    examples: dict[str, Image.Image] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(model: AlignedModel, cfg: EvaluateConfig, inputs: EvaluationInputs) -> Evaluation:
    """All the metrics of ``model`` on ``cfg.dataset`` (the demo world, or a registered
    dataset whose task decides what is measured). The backbone, CLIP and image size
    recorded in ``info`` are those of the model's frozen towers."""
    towers = model.towers
    info = {
        "recipe": model.name,
        "dataset": cfg.dataset,
        "model": dataclasses.asdict(model.info) if model.info else None,
        "backbone": dataclasses.asdict(towers.backbone),
        "backbone_random_init": not towers.backbone.pretrained and not towers.backbone.weights,
        "backbone_description": model.backbone_description,  # e.g. tiny self-supervised (demo)
        "clip": dataclasses.asdict(towers.clip),
        "img_size": towers.img_size,
        "zeroshot_templates": cfg.zeroshot_templates,
        "dense_templates": cfg.dense_templates,
        "max_images": cfg.max_images,
    }
    if cfg.dataset == DEMO_DATASET:
        evaluation = _evaluate_demo(model, cfg, inputs)
    else:
        evaluation = _evaluate_dataset(model, cfg, inputs)
    evaluation.metrics["info"] = {**info, **evaluation.metrics.get("info", {})}
    return evaluation


def _evaluate_demo(model: AlignedModel, cfg: EvaluateConfig, inputs: EvaluationInputs) -> Evaluation:
    predictions_dir = inputs.plots / model.name / "predictions"
    subsets, world = load_demo(inputs.pairs, inputs.demo_source, cfg.split, inputs.root)
    class_names = list(world["classes"])
    features_uri = inputs.features
    use_store = model.store_has_columns(features_uri)
    zeroshot_classes = model.class_embeddings(class_names, cfg.zeroshot_templates)
    head = _demo_dense_head(model, cfg, inputs) if model.recipe.has_dense_head else None
    evaluation = Evaluation(metrics={})
    blocks: dict[str, dict[str, Any]] = {}
    for subset, images in subsets.items():
        images = images.head(cfg.max_images)
        if not len(images):
            blocks[subset] = {"skipped": f"no {subset} images in the {cfg.split} split"}
            continue
        batch = (
            model.store_batch(features_uri, images.uids)
            if use_store
            else _online_batch(model, images, inputs.image_limits, cfg.batch_size)
        )
        block: dict[str, Any] = {"num_images": len(images)}
        reference = None
        if model.recipe.has_clip_reference:
            reference = _clip_image_features(
                model, images, features_uri, inputs.image_limits, cfg.batch_size, use_store
            )
        single = np.flatnonzero(images.labels >= 0)
        if len(single):
            logits = model.scores(zeroshot_classes, _rows(batch, single)).T
            labels = torch.from_numpy(images.labels[single])
            block["zeroshot"] = classification_metrics(logits, labels)
            if reference is not None:  # the teacher CLIP's own images against the same class texts
                block["zeroshot"].update(_clip_zeroshot(block["zeroshot"], reference[single], zeroshot_classes, labels))
            predicted = logits.argmax(dim=1).tolist()
            evaluation.predictions += [
                (subset, images.uids[i], class_names[images.labels[i]], class_names[p])
                for i, p in zip(single.tolist(), predicted)
            ]
        block["retrieval"] = retrieval_block(model, batch, images.captions, cfg.ks, reference)
        if head is not None:
            dataset = DemoSegmentation(images, inputs.image_limits)
            seg, confusion, examples = segmentation_block(model, dataset, head, cfg, subset, predictions_dir)
            block["segmentation"] = seg
            evaluation.per_class_iou[subset] = seg["per_class"]
            evaluation.confusion[subset] = confusion
            evaluation.class_names[subset] = list(dataset.class_names)
            evaluation.examples.update(examples)
        else:
            block["segmentation"] = {"skipped": f"{model.name} has no dense head"}
        blocks[subset] = block
    evaluation.metrics = {**blocks[TOP_LEVEL_SUBSET], "heldout": blocks["heldout"]}
    evaluation.metrics["info"] = {
        "split": cfg.split,
        "subsets": {s: len(v.head(cfg.max_images)) for s, v in subsets.items()},
        "top_level": "images whose objects are all seen compositions (heldout: the others)",
        "heldout_compositions": world["heldout_compositions"],
        "image_features": features_uri
        if use_store
        else "computed from the images (feature store lacks the columns)",
    }
    return evaluation


def _clip_zeroshot(
    own: dict[str, Any], clip_images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """The teacher CLIP's zero-shot on the same images and class embeddings (CLIP text, as
    the projector's), and the recipe's as a percentage of it: the ceiling a recipe that
    maps into CLIP image space is read against, as retrieval's ``percent_of_clip``."""
    clip = classification_metrics(zeroshot_logits(clip_images, classes), labels)
    keys = ("top1", "top5", "mean_per_class_recall")
    return {
        "clip": {k: clip[k] for k in keys},
        "percent_of_clip": {k: (100.0 * own[k] / clip[k] if clip[k] else None) for k in keys},
    }


def _demo_dense_head(model: AlignedModel, cfg: EvaluateConfig, inputs: EvaluationInputs) -> DenseHead:
    """The dense head on the demo's labels; with ``bg_threshold_split`` its background
    threshold is the one with the best mIoU on that split's images."""
    split = cfg.bg_threshold_split
    reference, _ = load_demo(inputs.pairs, inputs.demo_source, split or cfg.split, inputs.root)
    dataset = DemoSegmentation(reference["seen"], inputs.image_limits)
    head = DenseHead.build(model, dataset, cfg)
    if split is None or head.cfg.bg_threshold is None:
        return head
    return head.calibrated(dataset, cfg.bg_threshold_images, split, model.device)


def _evaluate_dataset(model: AlignedModel, cfg: EvaluateConfig, inputs: EvaluationInputs) -> Evaluation:
    from dinoalign.evaluate.datasets import EVAL_DATASETS

    predictions_dir = inputs.plots / model.name / "predictions"
    dataset = EVAL_DATASETS.build(
        cfg.dataset, under_root(str(cfg.root), inputs.root), **cfg.dataset_options
    )
    count = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    metrics: dict[str, Any] = {
        "num_images": count,
        "info": {"task": dataset.task, "root": cfg.root},
    }
    evaluation = Evaluation(metrics=metrics)
    if dataset.task == "segmentation":
        head = DenseHead.build(model, dataset, cfg)
        seg, confusion, examples = segmentation_block(model, dataset, head, cfg, "all", predictions_dir)
        metrics["segmentation"] = seg
        evaluation.per_class_iou["all"] = seg["per_class"]
        evaluation.confusion["all"] = confusion
        evaluation.class_names["all"] = list(dataset.class_names)
        evaluation.examples.update(examples)
        return evaluation
    images = (dataset[i][0] for i in range(count))
    if dataset.task == "classification":
        classes = model.class_embeddings(dataset.class_names, cfg.zeroshot_templates)
        labels = torch.tensor([dataset.samples[i][1] for i in range(count)])
        logits = model.score_batches(classes, _online_batches(model, images, cfg.batch_size)).T
        metrics["zeroshot"] = classification_metrics(logits, labels)
        evaluation.predictions = [
            ("all", dataset.samples[i][0], dataset.class_names[int(a)], dataset.class_names[int(p)])
            for i, (a, p) in enumerate(zip(labels.tolist(), logits.argmax(dim=1).tolist()))
        ]
        return evaluation
    captions = [dataset.samples[i][1] for i in range(count)]
    text = model.encode_texts([c for caps in captions for c in caps])
    scores = model.score_batches(text, _online_batches(model, images, cfg.batch_size))
    reference = None
    if model.recipe.has_clip_reference:
        reference = torch.cat(
            [
                model.clip_image_features(chunk)
                for chunk in _chunks((dataset[i][0] for i in range(count)), cfg.batch_size)
            ]
        )
    metrics["retrieval"] = retrieval_block(
        model, None, captions, cfg.ks, reference, scores=scores, text=text
    )
    return evaluation


# ----------------------------------------------------------------------------- blocks


def retrieval_block(
    model: AlignedModel,
    batch: Mapping[str, torch.Tensor] | None,
    captions: Sequence[Sequence[str]],
    ks: Sequence[int],
    clip_images: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
) -> dict[str, Any]:
    """R@k both ways over the images of ``batch`` and all their ``captions`` (scores from
    the recipe's own similarity, T×M, unless given); with ``clip_images`` (M×E, the
    teacher CLIP's image embeddings, projector only) CLIP's own retrieval on the same
    split and the recipe's recalls as a percentage of it."""
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    if text is None:
        text = model.encode_texts([c for caps in captions for c in caps])
    if scores is None:
        scores = model.scores(text, batch)
    raw = retrieval_metrics_from_similarity(scores, owner, ks)
    block = format_retrieval(raw, ks)
    if clip_images is not None:
        # the projector's text side is CLIP's own text tower: the same text embeddings
        clip_raw = retrieval_metrics(clip_images, text, owner, ks)
        block["clip"] = format_retrieval(clip_raw, ks)
        pct = percent_of_reference(raw, clip_raw)
        block["percent_of_clip"] = {
            d: {f"r{k}": pct[f"{d}_R@{k}_pct"] for k in ks} for d in ("i2t", "t2i")
        }
    return block


def format_retrieval(raw: Mapping[str, float], ks: Sequence[int]) -> dict[str, Any]:
    """The library's flat ``i2t_R@k`` keys -> ``{"i2t": {"r1": .., "chance_r1": ..}, ...}``.
    ``chance_r1`` = 1/#images: a random ranking's R@1 is the same in both directions."""
    block: dict[str, Any] = {
        d: {
            **{f"r{k}": raw[f"{d}_R@{k}"] for k in ks},
            **{f"chance_r{k}": raw[f"chance_{d}_R@{k}"] for k in ks},
        }
        for d in ("i2t", "t2i")
    }
    block["chance_r1"] = 1.0 / raw["num_images"]
    block["num_images"] = int(raw["num_images"])
    block["num_texts"] = int(raw["num_texts"])
    return block


@dataclasses.dataclass(frozen=True)
class DenseHead:
    """What segmentation needs of a model on one label set: its ``logits_fn`` over the
    scored class names, the settings, and whether background cleaning is on."""

    logits_fn: Any
    cfg: SegmentationConfig
    background_cleaning: bool
    calibration: dict[str, Any] | None = None

    @classmethod
    def build(cls, model: AlignedModel, dataset: Any, cfg: EvaluateConfig) -> DenseHead:
        """Class embeddings of ``dataset``'s scored class names (``dense_templates``) and
        ``model``'s dense scores; a recipe with background cleaning (talk2dino) cleans
        where :meth:`EvaluateConfig.cleans_background` says so."""
        seg_cfg = cfg.segmentation_for(model.name)
        names = scored_class_names(dataset, seg_cfg)
        clean = cfg.cleans_background(dataset.has_background) and model.recipe.has_background_cleaning
        classes = model.class_embeddings(names, cfg.dense_templates)
        return cls(model.dense_logits_fn(classes, clean, cfg.cleaning_lambda), seg_cfg, clean)

    def calibrated(self, dataset: Any, max_images: int, split: str, device: Any) -> DenseHead:
        """This head with the background threshold that maximises mIoU on ``dataset``
        (another split than the one evaluated)."""
        threshold, grid = calibrate_bg_threshold(
            dataset, self.logits_fn, self.cfg, max_images=max_images, device=device
        )
        calibration = {
            "split": split,
            "images": min(max_images, len(dataset)),
            "miou": grid[threshold],
            "candidates": len(grid),
        }
        cfg = dataclasses.replace(self.cfg, bg_threshold=threshold)
        return dataclasses.replace(self, cfg=cfg, calibration=calibration)


def segmentation_block(
    model: AlignedModel,
    dataset: Any,
    head: DenseHead,
    cfg: EvaluateConfig,
    subset: str,
    predictions_dir: Path,
) -> tuple[dict[str, Any], list[list[int]], dict[str, Image.Image]]:
    """(metrics, pixel confusion matrix, example overlays) of ``model`` on a segmentation
    dataset (items: image, label, name; ``class_names``; ``has_background``); with
    ``cfg.save_predictions``, every label map as a PNG in ``predictions_dir/subset``."""
    predictor = make_predictor(head.logits_fn, dataset, head.cfg, model.device)
    save_dir = str(predictions_dir / subset) if cfg.save_predictions else None
    raw = evaluate_segmentation(dataset, predictor, save_dir, cfg.max_images)
    block = {
        "miou": raw["mIoU"],
        "chance_miou": raw["chance_mIoU"],
        "pixel_accuracy": raw["pixel_accuracy"],
        "mean_accuracy": raw["mean_accuracy"],
        "num_images": raw["num_images"],
        "per_class": raw["per_class_iou"],
        "bg_threshold": head.cfg.bg_threshold if dataset.has_background else None,
        "bg_threshold_calibration": head.calibration if dataset.has_background else None,
        "background_cleaning": head.background_cleaning,
        "pamr": head.cfg.pamr,
    }
    examples = {}
    palette = class_palette(dataset.class_names, background=dataset.has_background)
    keep = (0,) if dataset.has_background else ()
    for i in range(min(cfg.num_examples, int(raw["num_images"]))):
        image, label, _name = dataset[i]
        pred = predictor(image).cpu().numpy()
        picture = panels(
            [
                image,
                overlay(image, label, palette, keep=keep),
                overlay(image, pred, palette, keep=keep),
            ],
            ["image", "ground truth", "prediction"],
        )
        present = sorted(set(np.unique(label).tolist()) | set(np.unique(pred).tolist()))
        examples[f"{subset}-{i:02d}.png"] = with_legend(
            picture, dataset.class_names, palette, present
        )
    return block, raw["confusion_matrix"], examples


# ----------------------------------------------------------------------------- features


def _rows(batch: Mapping[str, torch.Tensor], index: np.ndarray) -> dict[str, torch.Tensor]:
    rows = torch.from_numpy(index)
    return {k: v[rows] for k, v in batch.items()}


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _online_batches(
    model: AlignedModel, images: Iterator[np.ndarray], size: int
) -> Iterator[dict[str, torch.Tensor]]:
    for chunk in _chunks(images, size):
        yield model.image_batch(chunk)


def _load_demo_images(images: DemoImages, limits: Mapping[str, Any]) -> Iterator[np.ndarray]:
    from dinoalign.data.images import load_image

    for uri in images.image_uris:
        yield load_image(uri, **limits)


def _online_batch(
    model: AlignedModel, images: DemoImages, limits: Mapping[str, Any], batch_size: int
) -> dict[str, torch.Tensor]:
    parts = list(_online_batches(model, _load_demo_images(images, limits), batch_size))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _clip_image_features(
    model: AlignedModel,
    images: DemoImages,
    features_uri: str,
    limits: Mapping[str, Any],
    batch_size: int,
    use_store: bool,
) -> torch.Tensor:
    """The teacher CLIP's image embeddings of the demo images: the embed stage's
    ``clip_image`` column when it is there, else computed the same way."""
    from dinoalign.embed.store import FeatureStore, load_image_features

    manifest = FeatureStore(features_uri).read_manifest() if use_store else None
    if manifest is not None and "clip_image" in manifest["spec"]["columns"]:
        loaded = load_image_features(features_uri, ["clip_image"], images.uids)
        row = {u: i for i, u in enumerate(loaded["uid"].tolist())}
        return torch.from_numpy(
            loaded["clip_image"][[row[u] for u in images.uids]].astype(np.float32)
        )
    chunks = _chunks(_load_demo_images(images, limits), batch_size)
    return torch.cat([model.clip_image_features(chunk) for chunk in chunks])



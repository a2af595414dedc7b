"""Open-vocabulary segmentation inference and its evaluation, as mmseg / TCL / Talk2DINO:

1. resize so that the short side is ``short_side`` (long side at most ``max_long_side``),
2. slide ``crop``-sized windows with ``stride`` over it (mmseg ``slide_inference``:
   the last row / column of windows is clamped to the border), score each window with
   the model's ``logits_fn`` (B×N at its patch grid, bilinearly upsampled to the window
   with ``window_align_corners``, True as Talk2DINO's ``DINOText.generate_masks``),
   optionally refine each window with PAMR, sum the windows and divide by the number of
   windows covering each pixel,
3. resize the scores bilinearly to the original image size (``output_align_corners``,
   False as mmseg's ``EncoderDecoder`` that the official evaluation runs in),
4. with a background threshold, prepend a constant channel at that value (label 0),
5. argmax; then accumulate a confusion matrix over the whole dataset.

``logits_fn`` sees the raw RGB crop (float, 0–255, B×3×h×w) and does its own
normalisation; PAMR sees the same crop. :func:`calibrate_bg_threshold` picks the
threshold of step 4 on a held-apart split when a model's score scale is not known.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dinoalign.evaluate.config import SegmentationConfig
from dinoalign.evaluate.datasets.base import IGNORE_INDEX, SegmentationDataset
from dinoalign.evaluate.metrics import ConfusionMatrix, chance_miou
from dinoalign.evaluate.pamr import PAMR
from dinoalign.progress import Progress
from dinoalign.storage import write_atomic

LogitsFn = Callable[[Tensor], Tensor]
"""Crop B×3×h×w (float RGB 0–255) -> class scores B×N×h'×w' (any grid, e.g. patches)."""

RefineFn = Callable[[Tensor, Tensor], Tensor]
"""(crop B×3×h×w, scores B×N×h×w) -> refined scores B×N×h×w (e.g. :class:`PAMR`)."""

Predictor = Callable[[np.ndarray], Tensor]
"""Image uint8 H×W×3 -> label map H×W (int64)."""


def resized_size(height: int, width: int, short: int, max_long: int) -> tuple[int, int]:
    """mmcv ``imrescale`` size: one factor, min(short/short side, max_long/long side),
    rounded half up."""
    factor = min(short / min(height, width), max_long / max(height, width))
    # at least one pixel a side: a thin strip under the long-side cap must not vanish
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def short_side_resize(image: Tensor, short: int = 448, max_long: int = 2048) -> Tensor:
    """Bilinear resize of B×C×H×W so that the short side is ``short`` unless the long side
    would exceed ``max_long`` (then the long side is ``max_long``); aspect ratio kept."""
    size = resized_size(image.shape[-2], image.shape[-1], short, max_long)
    return F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)


def window_boxes(
    height: int, width: int, crop: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every sliding window, mmseg ``slide_inference`` order and
    clamping: windows start every ``stride`` pixels; the last ones end at the border; an
    image smaller than ``crop`` is one window of its own size."""
    if stride < 1 or crop < 1:
        raise ValueError("crop and stride must be positive")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride + crop, height)
            x2 = min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def sliding_window_logits(
    image: Tensor,
    logits_fn: LogitsFn,
    num_classes: int,
    crop: int = 448,
    stride: int = 224,
    align_corners: bool = True,
    refine_fn: RefineFn | None = None,
) -> Tensor:
    """Scores B×N×H×W for ``image`` B×3×H×W: per window ``logits_fn`` (upsampled bilinearly
    to the window with ``align_corners``, then ``refine_fn`` if given), summed and divided
    by overlap counts."""
    batch, _, height, width = image.shape
    scores = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    counts = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in window_boxes(height, width, crop, stride):
        window = image[:, :, y1:y2, x1:x2]
        window_scores = logits_fn(window)
        if window_scores.ndim != 4 or window_scores.shape[:2] != (batch, num_classes):
            raise ValueError(
                f"logits_fn returned shape {tuple(window_scores.shape)} for a {batch}-image "
                f"window; expected {batch}×{num_classes}×h×w"
            )
        window_scores = F.interpolate(
            window_scores.float(),
            size=(y2 - y1, x2 - x1),
            mode="bilinear",
            align_corners=align_corners,
        )
        if refine_fn is not None:
            window_scores = refine_fn(window, window_scores)
        scores[:, :, y1:y2, x1:x2] += window_scores
        counts[:, :, y1:y2, x1:x2] += 1
    return scores / counts


def segment(
    image: Tensor,
    logits_fn: LogitsFn,
    num_classes: int,
    cfg: SegmentationConfig = SegmentationConfig(),
    bg_threshold: float | None = None,
) -> Tensor:
    """Label maps B×H×W (int64) for ``image`` B×3×H×W (RGB 0–255). With ``bg_threshold``
    the ``num_classes`` scores are foreground classes 1..N and label 0 wins wherever no
    score exceeds the threshold."""
    return labels_from_scores(segment_scores(image, logits_fn, num_classes, cfg), bg_threshold)


def segment_scores(
    image: Tensor, logits_fn: LogitsFn, num_classes: int, cfg: SegmentationConfig
) -> Tensor:
    """Class scores B×N×H×W at the size of ``image`` B×3×H×W (RGB 0–255): steps 1–3 of
    the module docstring (resize, sliding windows with optional PAMR, resize back)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be B×3×H×W, got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    resized = short_side_resize(image, cfg.short_side, cfg.max_long_side)
    refine = PAMR(cfg.pamr_iterations, cfg.pamr_dilations) if cfg.pamr else None
    scores = sliding_window_logits(
        resized, logits_fn, num_classes, cfg.crop, cfg.stride, cfg.window_align_corners, refine
    )
    return F.interpolate(
        scores, size=(height, width), mode="bilinear", align_corners=cfg.output_align_corners
    )


def labels_from_scores(scores: Tensor, bg_threshold: float | None = None) -> Tensor:
    """Steps 4–5: scores B×N×H×W -> labels B×H×W (int64). With ``bg_threshold`` a constant
    channel at that value is prepended (label 0, the background; it wins ties) and the
    classes become 1..N."""
    if bg_threshold is not None:
        background = scores.new_full((scores.shape[0], 1, *scores.shape[2:]), bg_threshold)
        scores = torch.cat([background, scores], dim=1)
    return scores.argmax(1)


def calibrate_bg_threshold(
    dataset: SegmentationDataset,
    logits_fn: LogitsFn,
    cfg: SegmentationConfig,
    candidates: int = 41,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[float, dict[float, float]]:
    """The background threshold with the best dataset mIoU on ``dataset`` (a dataset with
    a background class, e.g. a validation split), among ``candidates`` quantiles (1 %–99 %)
    of the best foreground score per pixel; returns (threshold, {candidate: mIoU}).

    A pixel is background exactly when the threshold is at least its best class score
    (the background channel wins ties), so one pass keeps each pixel's best score and
    class and every candidate is scored from them without running the model again."""
    if not dataset.has_background:
        raise ValueError("the background threshold needs a dataset with a background class")
    num_scored = len(scored_class_names(dataset, dataclasses.replace(cfg, bg_threshold=0.0)))
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count < 1:
        raise ValueError("no image to calibrate the background threshold on")
    best_scores, best_labels, targets = [], [], []
    tick = Progress("evaluate: background threshold calibration", count)
    for index in range(count):
        image, label, _name = dataset[index]
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None]
        with torch.no_grad():
            top = segment_scores(pixels.float(), logits_fn, num_scored, cfg)[0].max(0)
        best_scores.append(top.values.cpu().reshape(-1))
        best_labels.append(top.indices.cpu().reshape(-1) + 1)
        targets.append(torch.from_numpy(label).reshape(-1))
        tick(index + 1)
    score, label, target = torch.cat(best_scores), torch.cat(best_labels), torch.cat(targets)
    grid = torch.quantile(
        score[torch.randperm(score.numel(), generator=torch.Generator().manual_seed(0))[:100_000]],
        torch.linspace(0.01, 0.99, candidates),
    ).tolist()
    results: dict[float, float] = {}
    for threshold in grid:
        confusion = ConfusionMatrix(len(dataset.class_names), IGNORE_INDEX)
        confusion.update(torch.where(score > threshold, label, 0), target)
        results[threshold] = confusion.miou()
    best = max(results, key=lambda t: (results[t], -t))
    return best, results


def scored_class_names(dataset: SegmentationDataset, cfg: SegmentationConfig) -> list[str]:
    """The class names ``logits_fn`` must score, in order: all of the dataset's, except
    the background class when it comes from the threshold instead of a text prompt."""
    if dataset.has_background and cfg.bg_threshold is not None:
        return list(dataset.class_names[1:])
    return list(dataset.class_names)


def make_predictor(
    logits_fn: LogitsFn,
    dataset: SegmentationDataset,
    cfg: SegmentationConfig,
    device: torch.device | str = "cpu",
) -> Predictor:
    """A :data:`Predictor` for ``dataset``'s labels from a ``logits_fn`` that scores
    :func:`scored_class_names` (in that order); images are moved to ``device``, where
    ``logits_fn`` must return its scores."""
    num_scored = len(scored_class_names(dataset, cfg))
    threshold = cfg.bg_threshold if dataset.has_background else None

    def predict(image: np.ndarray) -> Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        batch = pixels.permute(2, 0, 1)[None].float()
        with torch.no_grad():
            return segment(batch, logits_fn, num_scored, cfg, threshold)[0]

    return predict


def evaluate_segmentation(
    dataset: SegmentationDataset,
    predictor: Predictor,
    save_dir: str | None = None,
    max_images: int | None = None,
) -> dict[str, float | int | dict[str, float] | list[list[int]]]:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy over ``dataset`` (one
    confusion matrix for all pixels, returned too as ``confusion_matrix``: rows ground
    truth, columns prediction), next to the chance mIoU of a uniformly random labelling
    of the same ground truth. ``save_dir`` (path or URI): predicted label maps as
    ``<save_dir>/<name>.png`` (8-bit class ids). ``max_images``: the first N only."""
    num_classes = len(dataset.class_names)
    if num_classes > IGNORE_INDEX:
        raise ValueError(
            f"{num_classes} classes do not fit in 8-bit label maps with ignore {IGNORE_INDEX}"
        )
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    tick = Progress("evaluate: segmentation", count)
    for index in range(count):
        image, label, name = dataset[index]
        pred = predictor(image).cpu()
        confusion.update(pred, torch.from_numpy(label))
        if save_dir is not None:
            save_label_png(pred, f"{save_dir.rstrip('/')}/{name}.png")
        tick(index + 1)
    iou = confusion.iou()
    return {
        "mIoU": confusion.miou(),
        "pixel_accuracy": confusion.pixel_accuracy(),
        "mean_accuracy": confusion.mean_accuracy(),
        "chance_mIoU": chance_miou(confusion.gt_pixel_counts()),
        "num_images": count,
        "per_class_iou": {n: float(v) for n, v in zip(dataset.class_names, iou.tolist())},
        "confusion_matrix": confusion.matrix.tolist(),
    }


def save_label_png(label: Tensor, uri: str) -> None:
    """Write an H×W label map of ids < 256 as an 8-bit greyscale PNG (path or URI)."""
    array = label.numpy()
    if array.min(initial=0) < 0 or array.max(initial=0) > 255:
        raise ValueError("label ids must lie in [0, 255] to be saved as an 8-bit PNG")
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    write_atomic(uri, buffer.getvalue())  # whole or not at all, local or remote

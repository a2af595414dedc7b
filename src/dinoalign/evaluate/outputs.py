"""What the evaluate stage writes for one recipe, from an
:class:`~dinoalign.evaluate.run.Evaluation`.

``metrics/<recipe>.json``, the DVC metric: the headline numbers only
(:mod:`dinoalign.evaluate.headline`). ``metrics/<recipe>.details.json``, a plain DVC out
read by the report, ``dinoalign summary`` and the inference commands: everything (chance
next to every number; NaN is written as null)::

    zeroshot      top1, top5, mean_per_class_recall, chance_top1, chance_top5,
                  num_images, num_classes; projector on the demo: clip.{top1,top5,
                  mean_per_class_recall} (the teacher CLIP's images against the same class
                  texts) and percent_of_clip.{...}
    retrieval     i2t.{r1,r5,r10,chance_r1,...}, t2i.{...}, chance_r1 (= 1/#images in both
                  directions), num_images, num_texts; projector: clip.{i2t,t2i} (the teacher
                  CLIP's own scores) and percent_of_clip.{i2t,t2i}.{r1,...}
    segmentation  miou, chance_miou, per_class {name: IoU or null}, pixel_accuracy,
                  mean_accuracy, num_images, bg_threshold (+ bg_threshold_calibration when
                  chosen on another split), background_cleaning, pamr (the projector,
                  without a dense head: {"skipped": reason})
    heldout       the same blocks for the demo world's test images with a held-out
                  composition (the top level holds the images with seen compositions only)
    info          recipe, dataset, model (reference, weights sha256, config), frozen
                  towers, settings; mlflow (run id, experiment id, tracking URI)

``plots/<recipe>/``: ``zeroshot_predictions.csv`` (subset, uid, actual, predicted: DVC's
confusion template), ``per_class_iou.csv`` (class, IoU per subset), ``examples/*.png``
(image | ground truth | prediction, a colour-named class in its colour),
``segmentation_confusion_<subset>.png`` (row-normalised pixel confusion, class names on
the axes, a colour scale) and, with ``save_predictions``, ``predictions/<subset>/<name>.png``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoalign.evaluate.headline import DETAILS_SUFFIX, headline
from dinoalign.evaluate.run import EXAMPLES_DIR, PER_CLASS_CSV, PREDICTIONS_CSV, STAGE, TOP_LEVEL_SUBSET, Evaluation
from dinoalign.evaluate.visualize import confusion_chart, png_bytes
from dinoalign.storage import atomic_path, write_atomic


def jsonable(value: Any) -> Any:
    """Nested metrics with NaN/inf floats as None and tensors/numpy scalars as Python."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of nested ``metrics`` flattened to MLflow metric names
    (``zeroshot.top1``, ``heldout.segmentation.per_class.red circle``); ``info`` skipped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not prefix and key == "info":
            continue
        name = re.sub(r"[^\w\-. :/]", "_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name + "."))
        elif (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            out[name] = float(value)
    return out


def write_outputs(evaluation: Evaluation, metrics_path: Path, plots_dir: Path) -> None:
    """``metrics_path`` (the headline numbers), its details file beside it and the plots
    under ``plots_dir`` (module docstring); each metrics file is written whole and renamed
    into place."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    if evaluation.predictions:
        _write_csv(
            plots_dir / PREDICTIONS_CSV,
            ["subset", "uid", "actual", "predicted"],
            evaluation.predictions,
        )
    if evaluation.per_class_iou:
        subsets = list(evaluation.per_class_iou)
        names = list(evaluation.per_class_iou[subsets[0]])
        rows = [[n, *(_csv_number(evaluation.per_class_iou[s][n]) for s in subsets)] for n in names]
        _write_csv(plots_dir / PER_CLASS_CSV, ["class", *subsets], rows)
    for subset, matrix in evaluation.confusion.items():
        labels = evaluation.class_names.get(subset) or [str(i) for i in range(len(matrix))]
        write_atomic(plots_dir / f"segmentation_confusion_{subset}.png",
                     confusion_chart(np.asarray(matrix), labels, f"pixel confusion ({subset})"))
    for name, picture in evaluation.examples.items():
        write_atomic(plots_dir / EXAMPLES_DIR / name, png_bytes(picture))
    metrics = jsonable(evaluation.metrics)
    write_atomic(metrics_path.with_suffix(DETAILS_SUFFIX), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_atomic(metrics_path, json.dumps(headline(metrics), indent=2, sort_keys=True) + "\n")


def _csv_number(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6f}"


def _write_csv(path: Path, header: list[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def summary_line(recipe: str, metrics: Mapping[str, Any]) -> str:
    """One line per reported block: each number with its chance level."""
    lines = []
    top = TOP_LEVEL_SUBSET if "heldout" in metrics else "all"
    for where, block in ((top, metrics), ("heldout", metrics.get("heldout", {}))):
        parts = []
        if "zeroshot" in block:
            z = block["zeroshot"]
            parts.append(f"zero-shot top-1 {z['top1']:.3f} (chance {z['chance_top1']:.3f}"
                         + (f", teacher CLIP {z['clip']['top1']:.3f})" if "clip" in z else ")"))
        if "retrieval" in block:
            r = block["retrieval"]
            parts.append(
                f"R@1 i2t {r['i2t']['r1']:.3f} t2i {r['t2i']['r1']:.3f} (chance {r['chance_r1']:.3f})"
            )
        seg = block.get("segmentation", {})
        if "miou" in seg:
            parts.append(f"mIoU {_fmt(seg['miou'])} (chance {_fmt(seg['chance_miou'])})")
        if parts:
            lines.append(f"{STAGE}@{recipe} [{where}]: " + ", ".join(parts))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

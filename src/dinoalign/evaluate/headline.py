"""The evaluate stage's two metrics files, without torch (the report and ``dinoalign
summary`` read them).

``metrics/<recipe>.json`` is the DVC metric: the :data:`HEADLINE` numbers only, under the
same keys as in the details file, so that ``dvc exp show`` fits a terminal and ``dvc
metrics diff`` stays short. ``metrics/<recipe>.details.json`` holds the whole evaluation
(:mod:`dinoalign.evaluate.outputs` has its layout): chance levels, counts, per-class IoU,
settings and provenance. A headline key such as ``retrieval.t2i.r5`` means the same
number in both files and in ``retrain.metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

DETAILS_SUFFIX = ".details.json"

# The headline numbers, as key paths into the top-level block and into ``heldout``: at most
# 20 DVC metric columns per recipe (the projector's), 14 for the others.
HEADLINE: tuple[tuple[str, ...], ...] = (
    ("zeroshot", "top1"),
    ("zeroshot", "top5"),
    *(("retrieval", d, f"r{k}") for d in ("i2t", "t2i") for k in (1, 5)),
    *(("retrieval", "percent_of_clip", d, f"r{k}") for d in ("i2t", "t2i") for k in (1, 5)),
    ("segmentation", "miou"),
)


def details_path(metrics_dir: str | Path, recipe: str) -> Path:
    """``<metrics_dir>/<recipe>.details.json``: every number of an evaluation, its chance
    levels, per-class IoU, settings and provenance (``info``)."""
    return Path(metrics_dir) / f"{recipe}{DETAILS_SUFFIX}"


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`HEADLINE` entries of the full ``metrics`` that are present (a null, a NaN
    written as null, is kept), nested as there: ``headline(m)["heldout"]["zeroshot"]["top1"]
    is m["heldout"]["zeroshot"]["top1"]``."""
    out = _pick(metrics)
    if isinstance(metrics.get("heldout"), Mapping) and (heldout := _pick(metrics["heldout"])):
        out["heldout"] = heldout
    return out


def _pick(block: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in HEADLINE:
        node: Any = block
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            target = out
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = node
    return out

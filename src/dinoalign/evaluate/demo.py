"""The demo world as an evaluation set: one split of the pairs manifest, split into the
images that show only seen colour-shape compositions and those that hold a held-out one.

- zero-shot classification: the single-object images (their ``label``) over the world's
  whole class vocabulary (``world.json`` ``classes``, held-out compositions included);
- retrieval: every image with all of its captions;
- segmentation: the masks of ``mask_uri`` (0 = background, ``c + 1`` = class ``c``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinoalign.data.images import load_image, load_mask
from dinoalign.data.prepare import read_pairs
from dinoalign.data.synthetic import load_world
from dinoalign.errors import DataError

BACKGROUND = "background"
SUBSETS = ("seen", "heldout")


@dataclasses.dataclass(frozen=True)
class DemoImages:
    """Images of one subset, sorted by uid. ``labels[i]``: class index of a single-object
    image, -1 for the others. URIs are absolute paths or remote URIs."""

    subset: str
    uids: list[str]
    image_uris: list[str]
    mask_uris: list[str | None]
    captions: list[list[str]]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.uids)

    def head(self, n: int | None) -> DemoImages:
        """The first ``n`` images (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return dataclasses.replace(
            self,
            uids=self.uids[:n],
            image_uris=self.image_uris[:n],
            mask_uris=self.mask_uris[:n],
            captions=self.captions[:n],
            labels=self.labels[:n],
        )


def load_demo(
    pairs_dir: Path, source: str, split: str, root: Path
) -> tuple[dict[str, DemoImages], dict[str, Any]]:
    """``({"seen": ..., "heldout": ...}, world.json)`` for ``split`` of the manifest in
    ``pairs_dir``; the world description is read from ``pairs_dir/<source>/world.json``."""
    world = load_world(pairs_dir / source)
    class_names = tuple(world["classes"])
    heldout_uids = set(world["heldout_uids"].get(split, []))
    rows = sorted(
        (r for r in read_pairs(pairs_dir).to_pylist() if r["split"] == split),
        key=lambda r: r["uid"],
    )
    if not rows:
        raise DataError(f"the pairs manifest in {pairs_dir} has no {split!r} images to evaluate")
    unknown = sorted(
        {r["label"] for r in rows if r["label"] is not None and r["label"] not in class_names}
    )
    if unknown:
        raise DataError(
            f"labels {unknown[:5]} of {pairs_dir} are not classes of {source}/world.json"
        )
    subsets = {}
    for subset in SUBSETS:
        keep = [r for r in rows if (r["uid"] in heldout_uids) == (subset == "heldout")]
        subsets[subset] = DemoImages(
            subset=subset,
            uids=[r["uid"] for r in keep],
            image_uris=[_resolve(r["image_uri"], root) for r in keep],
            mask_uris=[_resolve(r["mask_uri"], root) if r["mask_uri"] else None for r in keep],
            captions=[list(r["captions"]) for r in keep],
            labels=np.asarray(
                [class_names.index(r["label"]) if r["label"] else -1 for r in keep], dtype=np.int64
            ),
            class_names=class_names,
        )
    return subsets, world


def _resolve(uri: str, root: Path) -> str:
    """Manifest URIs are stored repo-relative when they lie inside the repo."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str(root / uri)


class DemoSegmentation(Sequence):
    """The segmentation view of :class:`DemoImages` (what
    :func:`dinoalign.evaluate.segmentation.evaluate_segmentation` reads): items
    ``(image uint8 H×W×3, label int64 H×W, uid)``; class 0 is the background."""

    task = "segmentation"
    has_background = True

    def __init__(self, images: DemoImages, image_limits: dict[str, Any]) -> None:
        without_mask = [u for u, m in zip(images.uids, images.mask_uris) if m is None]
        if without_mask:
            raise DataError(
                f"{len(without_mask)} demo images have no mask_uri (e.g. {without_mask[0]})"
            )
        self.images = images
        self.class_names = (BACKGROUND, *images.class_names)
        self._decode = dict(image_limits)  # load_image's bounds (params.data)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:  # type: ignore[override]
        image = load_image(self.images.image_uris[index], **self._decode)
        label = load_mask(str(self.images.mask_uris[index])).astype(np.int64)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"mask {self.images.mask_uris[index]} is {label.shape}, its image {image.shape[:2]}"
            )
        if label.max(initial=0) >= len(self.class_names):
            raise DataError(
                f"mask {self.images.mask_uris[index]} has ids beyond the {len(self.class_names)} classes"
            )
        return image, label, self.images.uids[index]

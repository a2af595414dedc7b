"""The ``curate`` section of params.yaml, and the checks it runs when params load.

Import-light (no numpy, no FAISS): :mod:`dinoalign.config` imports it for every command.
The curation itself is :mod:`.curation`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dinoalign.errors import ConfigError

FAISS_MAX_POINTS_PER_CENTROID = 256  # FAISS's own default
LEAF_STRATEGIES = ("closest", "random")
COMBINE_MODES = ("image", "text", "intersection", "all")


def check_level_params(
    levels: Sequence[int], resample_steps: Sequence[int], resample_points: Sequence[int]
) -> None:
    """Raise a ValueError that says what to change unless the per-level lists fit."""
    if not levels:
        raise ConfigError("curate.levels is empty: give the clusters per level, e.g. [64, 8]")
    if len(resample_steps) != len(levels) or len(resample_points) != len(levels):
        raise ConfigError(
            f"curate.resample_steps ({len(resample_steps)} values) and "
            f"curate.resample_points ({len(resample_points)} values) need one value per "
            f"level of curate.levels ({len(levels)} levels: {list(levels)})"
        )
    if any(k < 1 for k in levels):
        raise ConfigError(f"curate.levels must all be >= 1, got {list(levels)}")
    if any(r < 0 for r in resample_steps):
        raise ConfigError(f"curate.resample_steps must be >= 0, got {list(resample_steps)}")
    if any(s < 1 for s in resample_points):
        raise ConfigError(f"curate.resample_points must be >= 1, got {list(resample_points)}")


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    """The ``curate`` section of params.yaml (defaults: the demo world, ~3000 pairs).

    - ``levels``: clusters per level, finest first (real data: e.g. [20000, 2000, 200]).
    - ``resample_steps`` (r), ``resample_points`` (s): one per level; the paper takes s ≈
      half the mean cluster size of the level.
    - ``kmeans_iters``: Lloyd iterations per k-means run; ``max_points_per_centroid``:
      FAISS trains on at most this many items per cluster (recorded in the stats).
    - ``target_size``: T pairs for the image-side sampling; ``leaf_strategy``: "closest"
      or "random".
    - ``feature``: the image feature column of the embed store to cluster; the stage
      reads it, e.g. ``embed.store.load_image_features(uri, [cfg.feature])``.
    - ``text_vocab``: entries, or the path/URI of a file with one per line; None turns
      text balancing off. ``text_threshold``: t. ``keep_unmatched``: keep pairs whose
      captions match no entry.
    - ``dedup_threshold``: cosine distance below which pairs are near-duplicates (None:
      no deduplication). Its scale depends on the feature space: the demo's random-init
      backbone crowds all images into a narrow cone (nearest-neighbour cls distances of
      unrelated demo images start at ~0.0004, median 0.003), hence the tiny default.
      ``dedup_nprobe``: level-1 clusters searched per pair.
    - ``combine``: "image", "text", "intersection" or "all" (see the module docstring).
    """

    levels: list[int] = dataclasses.field(default_factory=lambda: [64, 8])
    resample_steps: list[int] = dataclasses.field(default_factory=lambda: [3, 3])
    resample_points: list[int] = dataclasses.field(default_factory=lambda: [20, 4])
    kmeans_iters: int = 20
    max_points_per_centroid: int = FAISS_MAX_POINTS_PER_CENTROID
    seed: int = 123
    target_size: int = 2000
    leaf_strategy: str = "closest"
    feature: str = "cls"
    text_vocab: list[str] | str | None = None
    text_threshold: float = 100.0
    keep_unmatched: bool = True
    dedup_threshold: float | None = 0.0003
    dedup_nprobe: int = 4
    combine: str = "image"

    def __post_init__(self) -> None:
        check_level_params(self.levels, self.resample_steps, self.resample_points)
        if self.leaf_strategy not in LEAF_STRATEGIES:
            raise ConfigError(
                f"curate.leaf_strategy={self.leaf_strategy!r}: use one of {LEAF_STRATEGIES}"
            )
        if self.combine not in COMBINE_MODES:
            raise ConfigError(f"curate.combine={self.combine!r}: use one of {COMBINE_MODES}")
        if self.combine in ("text", "intersection") and self.text_vocab is None:
            raise ConfigError(
                f"curate.combine={self.combine!r} needs curate.text_vocab (a list of "
                "entries or a file with one per line), or set curate.combine=image"
            )
        if self.target_size < 0:
            raise ConfigError(f"curate.target_size must be >= 0, got {self.target_size}")
        if self.kmeans_iters < 1 or self.max_points_per_centroid < 1 or self.dedup_nprobe < 1:
            raise ConfigError(
                "curate.kmeans_iters, curate.max_points_per_centroid and curate.dedup_nprobe "
                "must be >= 1"
            )
        if self.text_threshold <= 0:
            raise ConfigError(f"curate.text_threshold must be > 0, got {self.text_threshold}")
        if self.dedup_threshold is not None and not 0.0 < self.dedup_threshold < 2.0:
            raise ConfigError(
                f"curate.dedup_threshold={self.dedup_threshold} is not a cosine distance in "
                "(0, 2); use e.g. 0.01, or null to skip deduplication"
            )

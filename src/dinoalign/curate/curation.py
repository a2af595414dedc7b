"""The curation of the curate stage (RECIPES.md "Curation"): balance the image-text pairs on
the image side and the text side, and drop near-duplicates.

``curate(uids, embeddings, captions, cfg)`` runs, on rows sorted by uid:

1. hierarchical k-means with resampling on the L2-normalised image embeddings
   (:mod:`.kmeans`), which gives every pair a cluster id per level;
2. near-duplicate removal by cosine distance (:mod:`.dedup`), searched within the
   ``dedup_nprobe`` nearest level-1 clusters of each pair;
3. among the survivors, balanced hierarchical sampling to ``target_size`` pairs
   (:mod:`.sampling`) → ``kept_image``;
4. among the survivors, MetaCLIP-style text balancing over ``text_vocab``
   (:mod:`.text_balance`) → ``kept_text``;
5. ``kept`` = ``combine`` of the two: "image", "text", "intersection" (both), or "all"
   (every survivor: the uncurated baseline, deduplicated).

The result is a deterministic function of (uids, embeddings, captions, cfg) on a given
FAISS device: row order does not matter, and random choices are hashes of (seed, uid).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from dinoalign.curate.config import CurateConfig
from dinoalign.curate.dedup import Deduplication, deduplicate
from dinoalign.curate.kmeans import ClusterHierarchy, faiss_uses_gpu, hierarchical_kmeans
from dinoalign.curate.sampling import balanced_sample
from dinoalign.curate.text_balance import TextBalance, balance_text, load_vocab


@dataclasses.dataclass(frozen=True)
class CurationResult:
    """``table``: one row per input pair sorted by uid, with ``uid``, ``cluster_l1`` …
    ``cluster_lL`` (int32) and the bool columns ``kept_image``, ``kept_text``,
    ``kept_dedup``, ``kept``. ``stats``: JSON-ready numbers to log and plot.
    ``hierarchy``: the k-means levels (centroids, to assign new data later)."""

    table: pa.Table
    stats: dict[str, Any]
    hierarchy: ClusterHierarchy

    @property
    def curated_uids(self) -> list[str]:
        """The kept uids, sorted."""
        return self.table.filter(self.table.column("kept")).column("uid").to_pylist()


def cluster_column(level: int) -> str:
    """Name of the cluster-id column of ``level`` (1 = finest)."""
    return f"cluster_l{level}"


def curate(
    uids: Sequence[str],
    embeddings: np.ndarray,
    captions: Sequence[Sequence[str]],
    cfg: CurateConfig,
) -> CurationResult:
    """Curate N pairs: ``uids`` (unique), ``embeddings`` N×D image features (any norm),
    ``captions`` one list of captions per pair. Steps in the module docstring."""
    _check_inputs(uids, embeddings, captions)
    order = np.argsort(np.asarray(uids), kind="stable")
    sorted_uids = [uids[i] for i in order.tolist()]
    sorted_captions = [list(captions[i]) for i in order.tolist()]
    points = np.asarray(embeddings, dtype=np.float32)[order]  # a copy: normalised in place
    _l2_normalise_rows(points, sorted_uids)

    hierarchy = hierarchical_kmeans(
        points,
        cfg.levels,
        cfg.resample_steps,
        cfg.resample_points,
        cfg.kmeans_iters,
        cfg.seed,
        cfg.max_points_per_centroid,
    )
    dedup = (
        None
        if cfg.dedup_threshold is None
        else deduplicate(
            points,
            sorted_uids,
            cfg.dedup_threshold,
            hierarchy.levels[0].centroids,
            cfg.dedup_nprobe,
        )
    )
    kept_dedup = np.ones(len(points), dtype=bool) if dedup is None else dedup.kept
    kept_image = balanced_sample(
        hierarchy, cfg.target_size, kept_dedup, cfg.leaf_strategy, sorted_uids, cfg.seed
    )
    text = (
        None
        if cfg.text_vocab is None
        else balance_text(
            sorted_uids,
            sorted_captions,
            load_vocab(cfg.text_vocab),
            cfg.text_threshold,
            cfg.keep_unmatched,
            cfg.seed,
            eligible=kept_dedup,
        )
    )
    kept_text = kept_dedup.copy() if text is None else text.kept
    kept = {
        "image": kept_image,
        "text": kept_text,
        "intersection": kept_image & kept_text,
        "all": kept_dedup,
    }[cfg.combine]

    point_clusters = hierarchy.point_clusters()
    masks = {
        "kept_image": kept_image,
        "kept_text": kept_text,
        "kept_dedup": kept_dedup,
        "kept": kept,
    }
    stats = {
        "n_input": len(points),
        "n_kept": int(kept.sum()),
        "combine": cfg.combine,
        "target_size": cfg.target_size,
        "removed": {
            "dedup": int((~kept_dedup).sum()),
            "image_balancing": int((kept_dedup & ~kept_image).sum()),
            "text_balancing": int((kept_dedup & ~kept_text).sum()),
            "total": int((~kept).sum()),
        },
        "kmeans": _kmeans_stats(hierarchy, point_clusters, kept),
        "dedup": _dedup_stats(dedup, cfg.dedup_threshold),
        "text": _text_stats(text, kept, cfg),
    }
    return CurationResult(
        table=_curation_table(sorted_uids, point_clusters, masks), stats=stats, hierarchy=hierarchy
    )


def _curation_table(
    sorted_uids: list[str], point_clusters: np.ndarray, masks: dict[str, np.ndarray]
) -> pa.Table:
    """uid, one int32 cluster column per level (N×L ``point_clusters``), the bool masks."""
    columns: dict[str, pa.Array] = {"uid": pa.array(sorted_uids, type=pa.string())}
    for depth in range(point_clusters.shape[1]):
        columns[cluster_column(depth + 1)] = pa.array(point_clusters[:, depth], type=pa.int32())
    for name, mask in masks.items():
        columns[name] = pa.array(mask, type=pa.bool_())
    return pa.table(columns)


def _check_inputs(
    uids: Sequence[str], embeddings: np.ndarray, captions: Sequence[Sequence[str]]
) -> None:
    if np.ndim(embeddings) != 2:
        raise ValueError(f"embeddings must be N×D, got shape {np.shape(embeddings)}")
    n = len(embeddings)
    if n == 0:
        raise ValueError("nothing to curate: no embeddings")
    if len(uids) != n or len(captions) != n:
        raise ValueError(
            f"{len(uids)} uids, {n} embeddings and {len(captions)} caption lists: "
            "give one of each per pair, in the same order"
        )
    if len(set(uids)) != n:
        repeated = next(uid for uid, count in Counter(uids).items() if count > 1)
        raise ValueError(f"uid {repeated!r} appears more than once: uids must be unique")
    single = next((i for i, pair in enumerate(captions) if isinstance(pair, str)), None)
    if single is not None:
        raise TypeError(
            f'captions[{single}] is a string; give a list of captions per pair, e.g. [["a cat"]]'
        )
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf: fix or drop those rows first")


def _l2_normalise_rows(embeddings: np.ndarray, uids: Sequence[str]) -> None:
    """Divide the rows of N×D by their norms, in place; zero rows are an error."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(
            f"{zero.size} embeddings are all zeros (e.g. uid {uids[zero[0]]}): drop those pairs"
        )
    embeddings /= norms


def _kmeans_stats(
    hierarchy: ClusterHierarchy, point_clusters: np.ndarray, kept: np.ndarray
) -> dict[str, Any]:
    """Per level: the FAISS sample counts and the cluster sizes in points, before/after."""
    levels = []
    for depth, level in enumerate(hierarchy.levels):
        sizes_before = np.bincount(point_clusters[:, depth], minlength=level.k)
        sizes_after = np.bincount(point_clusters[kept, depth], minlength=level.k)
        levels.append(
            {
                "level": depth + 1,
                "k_requested": level.k_requested,
                "k": level.k,
                "n_items": len(level.assignment),
                "faiss_points": level.faiss_points,
                "resample_pool_sizes": level.pool_sizes,
                "empty_clusters": int((sizes_before == 0).sum()),
                "sizes_before": sizes_before.tolist(),
                "sizes_after": sizes_after.tolist(),
            }
        )
    return {
        "device": "gpu" if faiss_uses_gpu() else "cpu",
        "warnings": hierarchy.warnings,
        "levels": levels,
    }


def _dedup_stats(dedup: Deduplication | None, threshold: float | None) -> dict[str, Any]:
    if dedup is None:
        return {"threshold": None}
    return {
        "threshold": threshold,
        "near_duplicate_pairs": dedup.n_pairs,
        "groups": dedup.n_groups(),
        "removed": int((~dedup.kept).sum()),
    }


def _text_stats(text: TextBalance | None, kept: np.ndarray, cfg: CurateConfig) -> dict[str, Any]:
    """Per entry: captions that match it among all pairs (before) and kept pairs (after)."""
    if text is None:
        return {"enabled": False}
    unmatched = text.unmatched()
    everything = np.ones(len(kept), dtype=bool)
    return {
        "enabled": True,
        "threshold": cfg.text_threshold,
        "keep_unmatched": cfg.keep_unmatched,
        "caption_counts_before": dict(
            zip(text.entries, text.entry_caption_counts(everything).tolist())
        ),
        "caption_counts_after": dict(zip(text.entries, text.entry_caption_counts(kept).tolist())),
        "unmatched_pairs_before": int(unmatched.sum()),
        "unmatched_pairs_after": int((unmatched & kept).sum()),
    }

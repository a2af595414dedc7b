"""Hierarchical k-means with resampling steps, on FAISS.

The method of Vo et al. 2024, "Automatic data curation for self-supervised learning: a
clustering-based approach". Level 1 clusters the N points into k₁ clusters; level ℓ
clusters the k_{ℓ−1} centroids of level ℓ−1 into k_ℓ clusters, so the top level holds a
few broad concepts and the leaves many fine ones. Each level runs:

1. k-means with k-means++ initialisation (``kmeans_iters`` Lloyd iterations);
2. ``r`` resampling steps: take the ``s`` items closest to every current centroid (the
   whole cluster when it is smaller; ties to the earlier row), run k-means (k-means++
   again) on that pool, and re-assign every item to the new centroids. The pool holds
   about as many items per cluster, so dense regions stop pulling centroids towards
   themselves and the centroids spread over the support of the data instead of following
   its density. (As in the paper's code: a fresh k-means on the pool, not a warm start,
   which would stay at the current fixed point.)

FAISS runs on the GPU when ``faiss.get_num_gpus() > 0``. FAISS trains on at most
``max_points_per_centroid · k`` items (it subsamples beyond that); the number it used is
recorded for every run (``KMeansLevel.faiss_points``) rather than left silent.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import faiss
import numpy as np

from dinoalign.curate.config import FAISS_MAX_POINTS_PER_CENTROID, check_level_params


def faiss_sample_count(n_items: int, k: int, max_points_per_centroid: int) -> int:
    """Number of items FAISS k-means trains on: it subsamples to k·max_points_per_centroid."""
    return min(n_items, k * max_points_per_centroid)


def faiss_uses_gpu() -> bool:
    return faiss.get_num_gpus() > 0


def train_kmeans(
    items: np.ndarray,
    k: int,
    iters: int,
    seed: int,
    max_points_per_centroid: int = FAISS_MAX_POINTS_PER_CENTROID,
) -> np.ndarray:
    """FAISS k-means (k-means++ init) of ``items`` (n×D float32) → centroids k×D float32."""
    kmeans = faiss.Kmeans(
        items.shape[1],
        k,
        niter=iters,
        seed=seed,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        max_points_per_centroid=max_points_per_centroid,
        # Small pools (upper levels, resampling) are legitimate here; FAISS would print a
        # warning to stderr for every run with fewer than 39 items per centroid.
        min_points_per_centroid=1,
        gpu=faiss_uses_gpu(),
    )
    kmeans.train(items)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign(items: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each item: (cluster ids n int64, squared L2 distances n float32).

    ``items``: n×D float32, ``centroids``: k×D float32. Exact search (FAISS flat index).
    """
    index: Any = faiss.IndexFlatL2(centroids.shape[1])
    if faiss_uses_gpu():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    sq_distances, labels = index.search(items, 1)
    return labels[:, 0].astype(np.int64), sq_distances[:, 0]


def rank_within_groups(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """0-based rank of each item inside its group, ordered by ``keys`` ascending.

    ``groups``: n ints, ``keys``: n numbers. Ties keep the input order (lexsort is
    stable), so with uid-sorted rows ties go to the smaller uid.
    """
    order = np.lexsort((keys, groups))
    sorted_groups = groups[order]
    group_starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
    ranks = np.empty(len(groups), dtype=np.int64)
    ranks[order] = np.arange(len(groups)) - group_starts
    return ranks


@dataclasses.dataclass(frozen=True)
class KMeansLevel:
    """One level of the hierarchy.

    ``centroids``: k×D float32. ``assignment``: n int64, the cluster of each item of this
    level (the N points at level 1, the centroids of level ℓ−1 above). ``sq_distances``:
    n float32, squared L2 distance of each item to its centroid. ``faiss_points``: the
    number of items FAISS trained on, for the first run then each resampling run;
    ``pool_sizes``: the size of each resampling pool (before FAISS's subsampling).
    """

    centroids: np.ndarray
    assignment: np.ndarray
    sq_distances: np.ndarray
    k_requested: int
    faiss_points: list[int]
    pool_sizes: list[int]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


@dataclasses.dataclass(frozen=True)
class ClusterHierarchy:
    """The result of :func:`hierarchical_kmeans`; ``warnings`` lists clamped levels."""

    levels: list[KMeansLevel]
    warnings: list[str]

    def point_clusters(self) -> np.ndarray:
        """Cluster id of every point at every level: N×L int64 (column ℓ−1 = level ℓ)."""
        columns = [self.levels[0].assignment]
        for level in self.levels[1:]:
            columns.append(level.assignment[columns[-1]])
        return np.stack(columns, axis=1)


def hierarchical_kmeans(
    points: np.ndarray,
    levels: Sequence[int],
    resample_steps: Sequence[int],
    resample_points: Sequence[int],
    iters: int,
    seed: int,
    max_points_per_centroid: int = FAISS_MAX_POINTS_PER_CENTROID,
) -> ClusterHierarchy:
    """Hierarchical k-means of ``points`` (N×D, L2-normalised by the caller).

    ``levels``: clusters per level (k₁ > k₂ > …); ``resample_steps`` (r) and
    ``resample_points`` (s): one value per level (r = 0 skips resampling). A level asked
    for more clusters than it has items (k > N at level 1, k_ℓ > k_{ℓ−1} above) is clamped
    to the number of items, with a warning that is also recorded in the result.
    Deterministic for a given ``seed`` on a given device.
    """
    check_level_params(levels, resample_steps, resample_points)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"points must be a non-empty N×D array, got shape {points.shape}")
    items = np.ascontiguousarray(points, dtype=np.float32)
    built: list[KMeansLevel] = []
    notes: list[str] = []
    for depth, (k_requested, steps, pool_per_cluster) in enumerate(
        zip(levels, resample_steps, resample_points)
    ):
        k = min(k_requested, len(items))
        if k < k_requested:
            note = (
                f"level {depth + 1}: asked for {k_requested} clusters of {len(items)} items; "
                f"clamped to {k}. Lower curate.levels[{depth}] to at most {len(items)}."
            )
            warnings.warn(note, stacklevel=2)
            notes.append(note)
        built.append(
            _kmeans_level(
                items,
                k,
                k_requested,
                steps,
                pool_per_cluster,
                iters,
                seed + depth,
                max_points_per_centroid,
            )
        )
        items = built[-1].centroids
    return ClusterHierarchy(levels=built, warnings=notes)


def _kmeans_level(
    items: np.ndarray,
    k: int,
    k_requested: int,
    resample_steps: int,
    resample_points: int,
    iters: int,
    seed: int,
    max_points_per_centroid: int,
) -> KMeansLevel:
    """k-means++ then ``resample_steps`` resampling steps on ``items`` (n×D)."""
    centroids = train_kmeans(items, k, iters, seed, max_points_per_centroid)
    faiss_points = [faiss_sample_count(len(items), k, max_points_per_centroid)]
    pool_sizes: list[int] = []
    assignment, sq_distances = assign(items, centroids)
    for _ in range(resample_steps):
        in_pool = rank_within_groups(assignment, sq_distances) < resample_points
        pool = items[in_pool]
        centroids = train_kmeans(pool, k, iters, seed, max_points_per_centroid)
        pool_sizes.append(len(pool))
        faiss_points.append(faiss_sample_count(len(pool), k, max_points_per_centroid))
        assignment, sq_distances = assign(items, centroids)
    return KMeansLevel(
        centroids=centroids,
        assignment=assignment,
        sq_distances=sq_distances,
        k_requested=k_requested,
        faiss_points=faiss_points,
        pool_sizes=pool_sizes,
    )

"""Near-duplicate removal by embedding cosine distance (FAISS range search).

Two samples are near-duplicates when the cosine distance of their L2-normalised
embeddings is below ``threshold`` (cosine similarity > 1 − threshold). Samples are
visited in uid order; a sample is removed when an earlier sample that is itself kept
lies within the threshold. So each group keeps its smallest uid, and chains do not
propagate: with a≈b and b≈c but a≉c, only b goes (c is no near-duplicate of anything
kept).

Without centroids the search is exact over all pairs (O(N²·D), fine up to ~10⁵ points).
With the level-1 k-means centroids, FAISS searches an inverted-file index that compares
each sample only with the members of its ``nprobe`` nearest clusters (as SemDeDup does
within clusters): near-duplicates nearly always share a cluster, and ``nprobe`` > 1
catches pairs that straddle a cluster border. The range search runs on the CPU (FAISS has
no GPU range search).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import faiss
import numpy as np


@dataclasses.dataclass(frozen=True)
class Deduplication:
    """``kept``: N bool. ``duplicate_of``: N int64, the row of the kept sample that removed
    each removed sample, −1 for kept ones. ``n_pairs``: near-duplicate pairs found."""

    kept: np.ndarray
    duplicate_of: np.ndarray
    n_pairs: int

    def n_groups(self) -> int:
        """Kept samples that removed at least one near-duplicate."""
        return int(np.unique(self.duplicate_of[self.duplicate_of >= 0]).size)


def deduplicate(
    embeddings: np.ndarray,
    uids: Sequence[str],
    threshold: float,
    centroids: np.ndarray | None = None,
    nprobe: int = 1,
) -> Deduplication:
    """Remove near-duplicates of ``embeddings`` (N×D, rows L2-normalised), keeping the
    smallest uid of each group. ``centroids`` (k×D) switch to the inverted-file search
    over the ``nprobe`` nearest clusters."""
    if not 0.0 < threshold < 2.0:
        raise ValueError(
            f"dedup threshold is a cosine distance in (0, 2), got {threshold}; "
            "use e.g. 0.01 for near-identical embeddings"
        )
    if len(uids) != len(embeddings):
        raise ValueError(f"{len(uids)} uids for {len(embeddings)} embeddings")
    items = np.ascontiguousarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(items, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("dedup needs L2-normalised embeddings: divide each row by its norm")
    ranks = _uid_ranks(uids)
    earlier, later = _near_pairs(items, 1.0 - threshold, centroids, nprobe, ranks)
    return _greedy_in_uid_order(earlier, later, ranks)


def _uid_ranks(uids: Sequence[str]) -> np.ndarray:
    """N int64: position of each uid in sorted order."""
    ranks = np.empty(len(uids), dtype=np.int64)
    ranks[np.argsort(np.asarray(uids), kind="stable")] = np.arange(len(uids))
    return ranks


def _near_pairs(
    items: np.ndarray,
    min_similarity: float,
    centroids: np.ndarray | None,
    nprobe: int,
    ranks: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs with cosine similarity > ``min_similarity``, as two arrays of rows
    (the smaller-uid row first), each pair once."""
    dim = items.shape[1]
    index: Any
    if centroids is None:
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatL2(dim)
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        # A quantizer that already holds its nlist centroids makes the index trained.
        index = faiss.IndexIVFFlat(quantizer, dim, len(centroids), faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, len(centroids))
    index.add(items)
    limits, _, neighbours = index.range_search(items, min_similarity)
    queries = np.repeat(np.arange(len(items)), np.diff(limits).astype(np.int64))
    not_self = queries != neighbours
    queries, neighbours = queries[not_self], neighbours[not_self]
    query_first = ranks[queries] < ranks[neighbours]
    earlier = np.where(query_first, queries, neighbours)
    later = np.where(query_first, neighbours, queries)
    # The search is symmetric only when exact; with nprobe it may find a pair one way.
    unique = np.unique(np.stack([earlier, later], axis=1), axis=0)
    return unique[:, 0], unique[:, 1]


def _greedy_in_uid_order(
    earlier: np.ndarray, later: np.ndarray, ranks: np.ndarray
) -> Deduplication:
    """Visit samples by uid; a kept sample removes its not-yet-removed later neighbours."""
    duplicate_of = np.full(len(ranks), -1, dtype=np.int64)
    order = np.lexsort((ranks[later], ranks[earlier]))
    earlier, later = earlier[order], later[order]
    _, group_starts = np.unique(ranks[earlier], return_index=True)
    group_ends = np.r_[group_starts[1:], len(earlier)]
    for start, end in zip(group_starts, group_ends):
        representative = earlier[start]
        if duplicate_of[representative] >= 0:
            continue
        neighbours = later[start:end]
        duplicate_of[neighbours[duplicate_of[neighbours] < 0]] = representative
    return Deduplication(kept=duplicate_of < 0, duplicate_of=duplicate_of, n_pairs=len(earlier))

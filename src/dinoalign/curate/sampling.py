"""Balanced hierarchical sampling from a cluster hierarchy (Vo et al. 2024).

The target size T is split over the top-level clusters by water-filling: every cluster
gets the same share x, except those with fewer than x points, which give all they have;
the leftover is spread so that the shares sum to T exactly. Each cluster's share is then
water-filled over its children, down to the leaves, where the points closest to the
leaf centroid (or a uniformly random subset) are taken. Rare concepts are kept whole and
frequent ones are cut down to the same size.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from dinoalign.curate.config import LEAF_STRATEGIES
from dinoalign.curate.kmeans import ClusterHierarchy, rank_within_groups


def water_fill(sizes: np.ndarray, target: int) -> np.ndarray:
    """Split ``target`` over bins of capacity ``sizes`` (m ints ≥ 0) as evenly as possible.

    Returns m ints ``a`` with ``a ≤ sizes`` and ``a.sum() == min(target, sizes.sum())``:
    ``a = min(x, sizes)`` for the largest cap x with Σ min(x, sizes) ≤ target, plus one
    for the ``target − Σ min(x, sizes)`` bins (fewer than the bins above x) with the most
    spare capacity (largest size first, then lowest index), so the split is deterministic.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0:
        raise ValueError(f"target size must be >= 0, got {target}")
    if sizes.size and sizes.min() < 0:
        raise ValueError(f"bin sizes must be >= 0, got min {sizes.min()}")
    if target >= sizes.sum():
        return sizes.copy()
    n_bins = len(sizes)
    ascending = np.sort(sizes)
    full_below = np.concatenate([[0], np.cumsum(ascending)])  # Σ of the j smallest bins
    # filled_at_cap[j]: the total when the cap equals the j-th smallest size; nondecreasing.
    filled_at_cap = full_below[:-1] + (n_bins - np.arange(n_bins)) * ascending
    n_full = int(np.searchsorted(filled_at_cap, target, side="right"))
    # The n_full smallest bins are full; the rest share what is left at cap x < their size.
    cap = (target - full_below[n_full]) // (n_bins - n_full)
    shares = np.minimum(sizes, cap)
    leftover = target - int(shares.sum())
    above_cap = np.flatnonzero(sizes > cap)
    by_spare = above_cap[np.lexsort((above_cap, -sizes[above_cap]))]
    shares[by_spare[:leftover]] += 1
    return shares


def uid_uniforms(uids: Sequence[str], seed: int, stream: str) -> np.ndarray:
    """A uniform number in [0, 1) per uid, from a hash of (stream, seed, uid): n float64.

    A sample's draw depends on nothing but its uid, the seed and the stream, so it does
    not change when other samples are added, removed or reordered. Each use names its
    own ``stream`` so that, e.g., the leaf sampling and the text balancing draws are
    independent of each other.
    """
    prefix = f"{stream}:{seed}:".encode()
    draws = [
        int.from_bytes(hashlib.blake2b(prefix + uid.encode(), digest_size=8).digest(), "big")
        >> 11  # keep 53 bits: exactly representable as float64
        for uid in uids
    ]
    return np.asarray(draws, dtype=np.float64) * 2.0**-53


def hierarchical_shares(
    hierarchy: ClusterHierarchy, leaf_sizes: np.ndarray, target: int
) -> np.ndarray:
    """How many points to take from each leaf: k₁ int64 summing to min(target, Σ sizes).

    ``leaf_sizes``: k₁ eligible points per level-1 cluster. The target is water-filled
    over the top-level clusters (sizes in points), then each cluster's share over its
    children, down to level 1.
    """
    sizes_per_level = [np.asarray(leaf_sizes, dtype=np.int64)]
    for level in hierarchy.levels[1:]:
        children_sizes = sizes_per_level[-1]
        sizes_per_level.append(
            np.bincount(level.assignment, weights=children_sizes, minlength=level.k).astype(
                np.int64
            )
        )
    shares = water_fill(sizes_per_level[-1], target)
    for depth in range(len(hierarchy.levels) - 1, 0, -1):
        parent_of_child = hierarchy.levels[depth].assignment
        child_sizes = sizes_per_level[depth - 1]
        child_shares = np.zeros_like(child_sizes)
        children_by_parent = np.argsort(parent_of_child, kind="stable")
        bounds = np.searchsorted(parent_of_child[children_by_parent], np.arange(len(shares) + 1))
        for parent, share in enumerate(shares):
            children = children_by_parent[bounds[parent] : bounds[parent + 1]]
            child_shares[children] = water_fill(child_sizes[children], int(share))
        shares = child_shares
    return shares


def balanced_sample(
    hierarchy: ClusterHierarchy,
    target: int,
    eligible: np.ndarray,
    strategy: str,
    uids: Sequence[str],
    seed: int,
) -> np.ndarray:
    """Select min(target, eligible.sum()) points balanced over the hierarchy: N bool.

    ``eligible``: N bool, the points that may be taken (e.g. survivors of deduplication).
    ``strategy``: "closest" takes the points nearest their leaf centroid (ties: input
    order), "random" a uniformly random subset drawn from :func:`uid_uniforms`.
    """
    if strategy not in LEAF_STRATEGIES:
        raise ValueError(f"leaf strategy {strategy!r} is not one of {LEAF_STRATEGIES}")
    leaf_level = hierarchy.levels[0]
    if len(eligible) != len(leaf_level.assignment) or len(uids) != len(eligible):
        raise ValueError(
            f"eligible ({len(eligible)}) and uids ({len(uids)}) must have one entry per "
            f"clustered point ({len(leaf_level.assignment)})"
        )
    candidates = np.flatnonzero(eligible)
    leaves = leaf_level.assignment[candidates]
    shares = hierarchical_shares(hierarchy, np.bincount(leaves, minlength=leaf_level.k), target)
    if strategy == "closest":
        keys = leaf_level.sq_distances[candidates]
    else:
        keys = uid_uniforms([uids[i] for i in candidates.tolist()], seed, stream="leaf")
    taken = rank_within_groups(leaves, keys) < shares[leaves]
    selected = np.zeros(len(eligible), dtype=bool)
    selected[candidates[taken]] = True
    return selected

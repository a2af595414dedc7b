from __future__ import annotations

import numpy as np
import pytest

from curate_mixture import make_mixture
from dinoalign.curate.kmeans import ClusterHierarchy, KMeansLevel, hierarchical_kmeans
from dinoalign.curate.sampling import (
    balanced_sample,
    hierarchical_shares,
    uid_uniforms,
    water_fill,
)


@pytest.mark.parametrize(
    ("sizes", "target", "expected"),
    [
        ([5, 1, 10, 3], 12, [4, 1, 4, 3]),  # cap 4 fits exactly
        ([5, 1, 10, 3], 13, [4, 1, 5, 3]),  # cap 4 + one left: the largest bin takes it
        ([3, 3, 3], 4, [2, 1, 1]),  # tie on size: the lowest index first
        ([3, 3, 3], 5, [2, 2, 1]),
        ([2, 5], 100, [2, 5]),  # T > N: everything
        ([2, 5], 7, [2, 5]),  # T == N
        ([2, 5], 0, [0, 0]),  # T == 0
        ([0, 0, 4], 3, [0, 0, 3]),  # empty bins
        ([7], 3, [3]),
        ([], 0, []),
        ([], 5, []),
    ],
)
def test_water_fill_by_hand(sizes, target, expected):
    assert water_fill(np.array(sizes, dtype=np.int64), target).tolist() == expected


def _water_fill_by_raising_the_cap(sizes: np.ndarray, target: int) -> np.ndarray:
    """Reference: raise the cap one unit at a time, then hand out the rest."""
    if target >= sizes.sum():
        return sizes.copy()
    cap = 0
    while np.minimum(sizes, cap + 1).sum() <= target:
        cap += 1
    shares = np.minimum(sizes, cap)
    for i in sorted(np.flatnonzero(sizes > cap), key=lambda i: (-sizes[i], i)):
        if shares.sum() == target:
            break
        shares[i] += 1
    return shares


def test_water_fill_matches_the_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 40, size=rng.integers(1, 12))
        target = int(rng.integers(0, sizes.sum() + 10))
        shares = water_fill(sizes, target)
        assert shares.sum() == min(target, sizes.sum())
        assert np.all(shares <= sizes)
        assert np.array_equal(shares, _water_fill_by_raising_the_cap(sizes, target))


def test_water_fill_rejects_negative_input():
    with pytest.raises(ValueError, match="target"):
        water_fill(np.array([1, 2]), -1)
    with pytest.raises(ValueError, match="sizes"):
        water_fill(np.array([1, -2]), 1)


def _two_level_tree(leaf_sq_distances: list[list[float]]) -> ClusterHierarchy:
    """Leaves 0, 1 under parent 0 and leaves 2, 3 under parent 1; points listed per leaf."""
    leaf_of_point = np.concatenate([[leaf] * len(d) for leaf, d in enumerate(leaf_sq_distances)])
    dim = 2
    leaves = KMeansLevel(
        centroids=np.zeros((4, dim), np.float32),
        assignment=leaf_of_point.astype(np.int64),
        sq_distances=np.concatenate(leaf_sq_distances).astype(np.float32),
        k_requested=4,
        faiss_points=[],
        pool_sizes=[],
    )
    parents = KMeansLevel(
        centroids=np.zeros((2, dim), np.float32),
        assignment=np.array([0, 0, 1, 1]),
        sq_distances=np.zeros(4, np.float32),
        k_requested=2,
        faiss_points=[],
        pool_sizes=[],
    )
    return ClusterHierarchy(levels=[leaves, parents], warnings=[])


def test_shares_are_water_filled_top_down_by_hand():
    hierarchy = _two_level_tree([[0.0] * 10, [0.0] * 2, [0.0] * 6, [0.0] * 6])
    # top: sizes [12, 12], T=10 -> [5, 5]; parent 0: [10, 2] -> [3, 2];
    # parent 1: [6, 6] -> cap 2 + one left to the lower index -> [3, 2]
    shares = hierarchical_shares(hierarchy, np.array([10, 2, 6, 6]), 10)
    assert shares.tolist() == [3, 2, 3, 2]


def test_closest_strategy_takes_the_points_nearest_each_leaf_centroid():
    distances = [[0.9, 0.1, 0.5, 0.3], [0.2, 0.4], [0.7, 0.6, 0.8], [0.1]]
    hierarchy = _two_level_tree(distances)
    uids = [f"u{i:02d}" for i in range(10)]
    # top sizes [6, 4], T=6 -> [3, 3]; parent 0: [4, 2] -> [2, 1]; parent 1: [3, 1] -> [2, 1]
    selected = balanced_sample(hierarchy, 6, np.ones(10, bool), "closest", uids, seed=0)
    # leaf 0 rows 0..3 -> 0.1 (row 1), 0.3 (row 3); leaf 1 rows 4, 5 -> row 4;
    # leaf 2 rows 6..8 -> 0.6 (row 7), 0.7 (row 6); leaf 3 row 9
    assert np.flatnonzero(selected).tolist() == [1, 3, 4, 6, 7, 9]


def test_only_eligible_points_are_sampled():
    hierarchy = _two_level_tree([[0.1, 0.2, 0.3], [0.1], [0.1, 0.2], [0.1, 0.2]])
    eligible = np.array([False, True, True, True, True, False, True, True])
    uids = [f"u{i}" for i in range(8)]
    for target in (0, 3, 6, 50):
        selected = balanced_sample(hierarchy, target, eligible, "random", uids, seed=1)
        assert selected.sum() == min(target, eligible.sum())
        assert not (selected & ~eligible).any()


def test_random_strategy_is_seeded_and_differs_from_closest():
    points, _, _ = make_mixture([300, 100], dim=8, noise=0.3, seed=0)
    uids = [f"{i:04d}" for i in range(len(points))]
    hierarchy = hierarchical_kmeans(points, [8, 2], [0, 0], [1, 1], iters=10, seed=0)
    everyone = np.ones(len(points), bool)
    first = balanced_sample(hierarchy, 100, everyone, "random", uids, seed=5)
    again = balanced_sample(hierarchy, 100, everyone, "random", uids, seed=5)
    other_seed = balanced_sample(hierarchy, 100, everyone, "random", uids, seed=6)
    closest = balanced_sample(hierarchy, 100, everyone, "closest", uids, seed=5)
    assert first.sum() == 100
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, closest)
    # both strategies take the same number per leaf: only the choice inside a leaf differs
    leaves = hierarchy.levels[0].assignment
    assert np.array_equal(
        np.bincount(leaves[first], minlength=8), np.bincount(leaves[closest], minlength=8)
    )


def test_unknown_strategy_is_explained():
    hierarchy = _two_level_tree([[0.1], [0.1], [0.1], [0.1]])
    with pytest.raises(ValueError, match="closest"):
        balanced_sample(hierarchy, 1, np.ones(4, bool), "nearest", ["a", "b", "c", "d"], seed=0)


def _kl_from_uniform(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    p = p[p > 0]
    return float((p * np.log(p * len(counts))).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_sampling_is_far_more_uniform_than_random_sampling(seed):
    sizes = [2400, 1200, 600, 300, 150, 80, 40, 30]  # 80:1 between largest and smallest
    points, labels, _ = make_mixture(sizes, dim=16, noise=0.05, seed=seed)
    uids = [f"{i:05d}" for i in range(len(points))]
    target = 240
    hierarchy = hierarchical_kmeans(points, [32, 8], [3, 3], [5, 2], iters=20, seed=seed)
    balanced = balanced_sample(hierarchy, target, np.ones(len(points), bool), "closest", uids, seed)
    random_rows = np.random.default_rng(seed).choice(len(points), target, replace=False)

    balanced_counts = np.bincount(labels[balanced], minlength=len(sizes))
    random_counts = np.bincount(labels[random_rows], minlength=len(sizes))
    assert balanced_counts.sum() == target
    # random: ~120 from the largest, ~1 from the smallest; KL ~0.7 nats
    assert _kl_from_uniform(random_counts) > 0.5
    assert _kl_from_uniform(balanced_counts) < 0.05
    assert balanced_counts.max() / max(balanced_counts.min(), 1) <= 2.0
    assert random_counts.max() / max(random_counts.min(), 1) >= 40


def test_uid_uniforms_are_uniform_stable_and_per_uid():
    uids = [f"uid-{i}" for i in range(20000)]
    draws = uid_uniforms(uids, seed=3, stream="text")
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01  # sd of the mean: 0.289/sqrt(20000) = 0.002
    assert abs((draws < 0.25).mean() - 0.25) < 0.015
    # a uid's draw does not depend on the other uids or their order
    assert np.array_equal(uid_uniforms(uids[::-1][:10], 3, "text"), draws[::-1][:10])
    assert not np.array_equal(uid_uniforms(uids[:10], 4, "text"), draws[:10])
    assert not np.array_equal(uid_uniforms(uids[:10], 3, "leaf"), draws[:10])

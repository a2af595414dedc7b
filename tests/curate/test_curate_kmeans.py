from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from curate_mixture import make_mixture
from dinoalign.curate.kmeans import (
    faiss_sample_count,
    hierarchical_kmeans,
    rank_within_groups,
    train_kmeans,
)


@pytest.mark.parametrize(("n", "k", "max_per_centroid"), [(3000, 10, 50), (3000, 10, 300)])
def test_faiss_sample_count_matches_what_faiss_reports(capfd, n, k, max_per_centroid):
    points = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    kmeans = faiss.Kmeans(
        8, k, niter=1, seed=1, max_points_per_centroid=max_per_centroid, verbose=True
    )
    kmeans.train(points)
    reported = re.search(r"Clustering (\d+) points", capfd.readouterr().out)
    assert reported is not None
    assert faiss_sample_count(n, k, max_per_centroid) == int(reported.group(1))


def test_hierarchy_records_the_faiss_sample_counts():
    points, _, _ = make_mixture([600, 300, 100], dim=8, noise=0.1, seed=0)
    hierarchy = hierarchical_kmeans(
        points,
        [20, 4],
        resample_steps=[2, 0],
        resample_points=[5, 1],
        iters=5,
        seed=0,
        max_points_per_centroid=30,
    )
    level1, level2 = hierarchy.levels
    assert level1.faiss_points[0] == 20 * 30  # 1000 points subsampled to k·30
    assert len(level1.pool_sizes) == 2
    assert all(pool <= 20 * 5 for pool in level1.pool_sizes)
    assert level1.faiss_points[1:] == level1.pool_sizes  # pools are below k·30
    assert level2.faiss_points == [20] and level2.pool_sizes == []


def test_rank_within_groups_by_hand():
    groups = np.array([1, 0, 1, 0, 1])
    keys = np.array([0.5, 0.2, 0.1, 0.2, 0.5])
    # group 0: rows 1, 3 tie on 0.2 -> input order; group 1: row 2 (0.1), then rows 0, 4 tie
    assert rank_within_groups(groups, keys).tolist() == [1, 0, 0, 1, 2]


def test_assignments_are_nearest_centroids_and_levels_compose():
    points, _, _ = make_mixture([300, 200, 100, 50], dim=8, noise=0.2, seed=1)
    hierarchy = hierarchical_kmeans(points, [12, 3], [1, 1], [5, 2], iters=10, seed=0)
    items = points
    for level in hierarchy.levels:
        sq = ((items[:, None, :] - level.centroids[None, :, :]) ** 2).sum(-1)
        assert np.array_equal(level.assignment, sq.argmin(1))
        np.testing.assert_allclose(level.sq_distances, sq.min(1), atol=1e-4)
        items = level.centroids
    clusters = hierarchy.point_clusters()
    assert clusters.shape == (len(points), 2)
    assert np.array_equal(clusters[:, 0], hierarchy.levels[0].assignment)
    assert np.array_equal(clusters[:, 1], hierarchy.levels[1].assignment[clusters[:, 0]])


def test_a_resampling_step_reclusters_the_closest_points():
    points, _, _ = make_mixture([400, 100, 30], dim=8, noise=0.2, seed=2)
    k, s, iters, seed = 6, 7, 10, 3
    hierarchy = hierarchical_kmeans(points, [k], [1], [s], iters=iters, seed=seed)

    first = train_kmeans(points, k, iters, seed)
    sq = ((points[:, None, :] - first[None, :, :]) ** 2).sum(-1)
    nearest = sq.argmin(1)
    pool_rows = []
    for c in range(k):
        members = np.flatnonzero(nearest == c)
        pool_rows.extend(members[np.argsort(sq[members, c], kind="stable")[:s]])
    expected = train_kmeans(points[np.sort(pool_rows)], k, iters, seed)

    assert hierarchy.levels[0].pool_sizes == [len(pool_rows)]
    np.testing.assert_allclose(hierarchy.levels[0].centroids, expected, atol=1e-5)


def test_resampling_moves_centroids_from_dense_to_sparse_clusters():
    """The paper's point: plain k-means spends most centroids on the dense cluster."""
    sizes = [2400, 1200, 600, 300, 150, 80, 40, 30]
    in_largest = {0: 0, 5: 0}
    for seed in range(5):
        points, _, means = make_mixture(sizes, dim=16, noise=0.05, seed=seed)
        for steps in in_largest:
            level = hierarchical_kmeans(points, [32], [steps], [5], iters=20, seed=seed).levels[0]
            nearest_mean = ((level.centroids[:, None] - means[None]) ** 2).sum(-1).argmin(1)
            in_largest[steps] += int((nearest_mean == 0).sum())
    # 2400 of 4800 points: plain k-means puts ~14 of 32 centroids there, resampling ~9.
    assert in_largest[5] <= 0.75 * in_largest[0]


def test_same_seed_gives_identical_hierarchies():
    points, _, _ = make_mixture([500, 100], dim=8, noise=0.3, seed=4)
    runs = [
        hierarchical_kmeans(points, [10, 3], [2, 1], [5, 2], iters=10, seed=7) for _ in range(2)
    ]
    for a, b in zip(runs[0].levels, runs[1].levels):
        assert np.array_equal(a.centroids, b.centroids)
        assert np.array_equal(a.assignment, b.assignment)


def test_more_clusters_than_items_is_clamped_with_a_recorded_warning():
    points, _, _ = make_mixture([6, 4], dim=4, noise=0.3, seed=5)
    with pytest.warns(UserWarning, match="clamped"):
        hierarchy = hierarchical_kmeans(points, [16, 20], [0, 0], [1, 1], iters=5, seed=0)
    assert [level.k for level in hierarchy.levels] == [10, 10]
    assert [level.k_requested for level in hierarchy.levels] == [16, 20]
    assert len(hierarchy.warnings) == 2 and "curate.levels[0]" in hierarchy.warnings[0]
    # every point its own cluster when k == n
    assert sorted(hierarchy.levels[0].assignment.tolist()) == list(range(10))


@pytest.mark.parametrize(
    ("levels", "steps", "points", "message"),
    [
        ([], [], [], "empty"),
        ([8, 2], [1], [4, 2], "one value per level"),
        ([8, 0], [1, 1], [4, 2], ">= 1"),
        ([8], [-1], [4], "resample_steps"),
        ([8], [1], [0], "resample_points"),
    ],
)
def test_bad_level_parameters_are_explained(levels, steps, points, message):
    data = np.ones((20, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        hierarchical_kmeans(data, levels, steps, points, iters=5, seed=0)

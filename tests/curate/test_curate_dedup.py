from __future__ import annotations

import numpy as np
import pytest

from dinoalign.curate.dedup import deduplicate
from dinoalign.curate.kmeans import hierarchical_kmeans


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _planted(seed: int) -> tuple[np.ndarray, list[str], dict[int, list[int]]]:
    """600 distinct points plus 1–3 near-copies of 40 of them, uids in random order.

    Returns (embeddings, uids, {original row: rows of its copies})."""
    rng = np.random.default_rng(seed)
    originals = _unit(rng.standard_normal((600, 32)))
    copies_of: dict[int, list[int]] = {}
    rows = [originals]
    next_row = len(originals)
    for original in rng.choice(600, 40, replace=False):
        n_copies = int(rng.integers(1, 4))
        # ~0.002 cosine distance from the original; distinct points are ~1 apart
        rows.append(_unit(originals[original] + 0.01 * rng.standard_normal((n_copies, 32))))
        copies_of[int(original)] = list(range(next_row, next_row + n_copies))
        next_row += n_copies
    embeddings = np.concatenate(rows)
    uids = [f"{u:06x}" for u in rng.permutation(len(embeddings))]
    return embeddings, uids, copies_of


@pytest.mark.parametrize("search", ["exact", "clusters"])
def test_removes_the_planted_near_duplicates_and_nothing_else(search):
    embeddings, uids, copies_of = _planted(seed=0)
    centroids = None
    if search == "clusters":
        centroids = (
            hierarchical_kmeans(embeddings, [24], [0], [1], iters=10, seed=0).levels[0].centroids
        )
    result = deduplicate(embeddings, uids, threshold=0.02, centroids=centroids, nprobe=3)

    expected_removed = set()
    for original, copies in copies_of.items():
        group = [original, *copies]
        keeper = min(group, key=lambda row: uids[row])
        expected_removed |= set(group) - {keeper}
        assert all(result.duplicate_of[row] == keeper for row in set(group) - {keeper})
    assert set(np.flatnonzero(~result.kept).tolist()) == expected_removed
    assert result.n_groups() == len(copies_of)


def test_chains_do_not_propagate():
    angles = np.radians([0.0, 5.0, 10.0])  # neighbours 5° apart, ends 10° apart
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    threshold = 0.01  # 1 − cos 5° = 0.0038 < 0.01 < 1 − cos 10° = 0.0152
    result = deduplicate(embeddings, ["a", "b", "c"], threshold)
    assert result.kept.tolist() == [True, False, True]
    assert result.n_pairs == 2
    # b has the smallest uid: it is kept and removes both neighbours
    result = deduplicate(embeddings, ["b", "a", "c"], threshold)
    assert result.kept.tolist() == [False, True, False]
    assert result.duplicate_of.tolist() == [1, -1, 1]


def test_identical_rows_keep_the_smallest_uid():
    embeddings = _unit(np.array([[1.0, 2.0], [1.0, 2.0], [-2.0, 1.0], [1.0, 2.0]]))
    result = deduplicate(embeddings, ["z", "m", "q", "c"], threshold=1e-3)
    assert result.kept.tolist() == [False, False, True, True]
    assert result.duplicate_of.tolist() == [3, 3, -1, -1]
    assert result.n_pairs == 3 and result.n_groups() == 1


def test_nothing_is_removed_without_near_duplicates():
    embeddings = _unit(np.random.default_rng(1).standard_normal((300, 16)))
    result = deduplicate(embeddings, [str(i) for i in range(300)], threshold=0.05)
    assert result.kept.all() and result.n_pairs == 0


def test_bad_inputs_are_explained():
    embeddings = _unit(np.eye(3))
    with pytest.raises(ValueError, match="normalised"):
        deduplicate(embeddings * 2, ["a", "b", "c"], threshold=0.1)
    with pytest.raises(ValueError, match="cosine distance"):
        deduplicate(embeddings, ["a", "b", "c"], threshold=0.0)
    with pytest.raises(ValueError, match="uids"):
        deduplicate(embeddings, ["a", "b"], threshold=0.1)

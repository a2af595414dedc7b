"""Synthetic data for the curation tests: unequal Gaussian clusters on the unit sphere.

A plain module, not a conftest: a conftest.py here would shadow the top-level
``tests/conftest.py`` for ``from pipeline_testing import tiny_overrides`` (conftests outside
packages all import as the module ``conftest``).
"""

from __future__ import annotations

import numpy as np

Mixture = tuple[np.ndarray, np.ndarray, np.ndarray]


def make_mixture(sizes: list[int], dim: int, noise: float, seed: int) -> Mixture:
    """(points N×dim float32 L2-normalised, true cluster label N, cluster means k×dim)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((len(sizes), dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    points = means[labels] + noise * rng.standard_normal((len(labels), dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels, means.astype(np.float32)

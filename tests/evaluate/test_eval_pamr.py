"""PAMR against a pixel-by-pixel loop implementation of the reference formula."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoalign.evaluate.pamr import PAMR

EIGHT = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _loop_pamr(
    image: np.ndarray, masks: np.ndarray, num_iter: int, dilations: list[int]
) -> np.ndarray:
    """Araslanov & Roth's PAMR written out per pixel, neighbours clamped to the border."""
    b_size, channels, h, w = image.shape

    def at(a: np.ndarray, b: int, c: int, i: int, j: int) -> float:
        return float(a[b, c, min(max(i, 0), h - 1), min(max(j, 0), w - 1)])

    neighbours = [(dy * d, dx * d) for d in dilations for dy, dx in EIGHT]
    window = [(dy * d, dx * d) for d in dilations for dy, dx in EIGHT + [(0, 0)]]
    affinity = np.zeros((b_size, len(neighbours), h, w))
    for b in range(b_size):
        for i in range(h):
            for j in range(w):
                sigma = [
                    statistics.stdev(at(image, b, c, i + dy, j + dx) for dy, dx in window)
                    for c in range(channels)
                ]
                logits = []
                for dy, dx in neighbours:
                    per_channel = [
                        -abs(at(image, b, c, i, j) - at(image, b, c, i + dy, j + dx))
                        / (1e-8 + 0.1 * sigma[c])
                        for c in range(channels)
                    ]
                    logits.append(sum(per_channel) / channels)
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                affinity[b, :, i, j] = [v / sum(weights) for v in weights]
    for _ in range(num_iter):
        refined = np.zeros_like(masks)
        for b in range(b_size):
            for n in range(masks.shape[1]):
                for i in range(h):
                    for j in range(w):
                        refined[b, n, i, j] = sum(
                            affinity[b, p, i, j] * at(masks, b, n, i + dy, j + dx)
                            for p, (dy, dx) in enumerate(neighbours)
                        )
        masks = refined
    return masks


@pytest.mark.parametrize(
    "shape, num_iter, dilations",
    [((2, 3, 6, 7), 3, [1, 2, 4]), ((1, 3, 5, 6), 10, [1, 2, 4, 8, 12, 24])],
)
def test_pamr_matches_the_per_pixel_formula(shape, num_iter, dilations):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=gen) * 255
    masks = torch.rand(shape[0], 2, shape[2], shape[3], generator=gen)
    got = PAMR(num_iter, dilations)(image, masks)
    expected = _loop_pamr(image.double().numpy(), masks.double().numpy(), num_iter, dilations)
    assert got.shape == masks.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pamr_upsamples_masks_align_corners_and_keeps_class_sums():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 9, 11, generator=gen)
    coarse = torch.rand(1, 4, 3, 4, generator=gen).softmax(1)
    upsampled = F.interpolate(coarse, size=(9, 11), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(
        PAMR(num_iter=0)(image, coarse).numpy(), upsampled.numpy(), atol=1e-6
    )
    refined = PAMR()(image, coarse)
    # affinities are a softmax over neighbours, so per-pixel class sums stay 1
    np.testing.assert_allclose(refined.sum(1).numpy(), np.ones((1, 9, 11)), atol=1e-5)


def test_pamr_snaps_noisy_masks_to_image_regions():
    gen = torch.Generator().manual_seed(2)
    region = torch.zeros(1, 1, 24, 24)
    region[..., 12:] = 1.0  # right half is one object
    image = (region * 200 + torch.rand(1, 3, 24, 24, generator=gen) * 10).expand(1, 3, 24, 24)
    truth = torch.cat([1 - region, region], 1)
    noisy = truth + 0.9 * torch.randn(1, 2, 24, 24, generator=gen)
    before = (noisy.argmax(1) == truth.argmax(1)).float().mean()
    after = (PAMR()(image, noisy).argmax(1) == truth.argmax(1)).float().mean()
    assert before < 0.9
    assert after > 0.97


def test_pamr_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dilations"):
        PAMR(dilations=[0, 1])
    with pytest.raises(ValueError, match="same B"):
        PAMR()(torch.rand(2, 3, 4, 4), torch.rand(1, 2, 4, 4))

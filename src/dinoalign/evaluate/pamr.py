"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as used by TCL,
FreeDA and Talk2DINO: 10 iterations over the 8 neighbours at dilations 1, 2, 4, 8, 12, 24.

Same arithmetic as the reference implementation (``visinf/1-stage-wseg``,
``models/mods/pamr.py``), written with shifted views of a replicate-padded tensor instead
of fixed 3×3 convolution kernels, and accumulating the propagation neighbour by neighbour
so that memory stays at a few copies of B×N×H×W (the reference materialises B×N×48×H×W):

- per image channel, σ = unbiased standard deviation over the 3×3 neighbourhood *including
  the centre* at every dilation (9·|dilations| values, centre counted once per dilation);
- affinity to neighbour j: −|x − x_j| / (1e-8 + 0.1·σ), averaged over the image channels,
  softmax over the 8·|dilations| neighbours;
- each iteration: masks ← Σ_j affinity_j · masks(neighbour j);
- borders: a neighbour outside the image is the nearest border pixel (replicate padding).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (dy, dx) of the 8 neighbours in raster order, then the centre for the σ neighbourhood
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_WITH_CENTRE = _NEIGHBOURS + ((0, 0),)


def _shifted(padded: Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> Tensor:
    """View of ``x[.., i+dy, j+dx]`` (clamped at the border) from ``padded`` =
    replicate-pad(x, pad); … ×H×W."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


class PAMR(nn.Module):
    """``PAMR(num_iter, dilations)(image B×C×H×W, masks B×N×h×w) -> B×N×H×W``.

    ``masks`` are first resized to the image size (bilinear, ``align_corners=True``, as
    the reference does). The image is any per-channel affine scaling of RGB (raw 0–255 or
    normalised: σ-normalised affinities do not depend on it). No parameters are learnt.
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError(f"num_iter must be >= 0, got {num_iter}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
        self.num_iter = int(num_iter)
        self.dilations = tuple(int(d) for d in dilations)

    def affinity(self, image: Tensor) -> Tensor:
        """Softmax-normalised affinities of each pixel to its 8·|dilations| neighbours,
        B×P×H×W (P ordered by dilation, then raster order of the 8 neighbours)."""
        _, _, height, width = image.shape
        image = image.float()
        pad = max(self.dilations)
        padded = F.pad(image, [pad] * 4, mode="replicate")

        def views(offsets: Sequence[tuple[int, int]]) -> list[Tensor]:
            return [
                _shifted(padded, pad, dy * d, dx * d, height, width)
                for d in self.dilations
                for dy, dx in offsets
            ]

        # two-pass (unbiased) σ over the neighbourhoods: stable where the image is flat
        window = views(_WITH_CENTRE)
        mean = sum(window) / len(window)
        var = sum((v - mean).square() for v in window) / (len(window) - 1)
        scale = 1e-8 + 0.1 * var.sqrt()  # B×C×H×W
        # per neighbour, averaged over image channels: B×H×W each
        logits = [(-(image - v).abs() / scale).mean(1) for v in views(_NEIGHBOURS)]
        return torch.stack(logits, dim=1).softmax(dim=1)

    def forward(self, image: Tensor, masks: Tensor) -> Tensor:
        if image.ndim != 4 or masks.ndim != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(
                f"expected image B×C×H×W and masks B×N×h×w with the same B; got "
                f"{tuple(image.shape)} and {tuple(masks.shape)}"
            )
        height, width = image.shape[-2:]
        masks = F.interpolate(
            masks.float(), size=(height, width), mode="bilinear", align_corners=True
        )
        affinity = self.affinity(image)
        pad = max(self.dilations)
        offsets = [(dy * d, dx * d) for d in self.dilations for dy, dx in _NEIGHBOURS]
        for _ in range(self.num_iter):
            padded = F.pad(masks, [pad] * 4, mode="replicate")
            refined = torch.zeros_like(masks)
            for j, (dy, dx) in enumerate(offsets):
                refined += affinity[:, j : j + 1] * _shifted(padded, pad, dy, dx, height, width)
            masks = refined
        return masks

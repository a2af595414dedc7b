"""FLOP accounting for the GPU throughput figures: how much arithmetic one backbone forward
is, and what fraction of an accelerator's peak a measured images/s reaches.

FLOPs count 2 per multiply-add (the convention of spec sheets and of
``torch.utils.flop_counter``). A sibling module of the benchmark scripts (``from flops
import ...``: running ``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s.
# Matched against ``torch.cuda.get_device_name()`` in order, first hit wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM5 / HBM3
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Spec-sheet dense bf16 peak of a CUDA device by its name (None when unknown)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def counted_flops(module: nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs`` as torch's FlopCounterMode
    counts them (matrix products, convolutions and attention kernels; elementwise ops,
    norms and softmax are not counted: they are a few per cent of a ViT)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def vit_forward_flops(
    *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_prefix_tokens: int,
    mlp_ratio: float = 4.0, swiglu: bool = False, in_chans: int = 3,
) -> int:
    """Nominal FLOPs of one image through a plain ViT encoder (patch embedding + ``depth``
    blocks of attention and MLP), the matrix products only.

    Per block with N tokens of width D and MLP width M: qkv 6·N·D², scores and weighted sum
    4·N²·D, output projection 2·N·D², MLP 4·N·D·M (6·N·D·M for SwiGLU's three matrices).
    """
    patches = (img_size // patch_size) ** 2
    n = patches + num_prefix_tokens
    d = embed_dim
    m = int(mlp_ratio * d)
    embed = 2 * patches * in_chans * patch_size**2 * d
    mlp = (6 if swiglu else 4) * n * d * m
    block = 8 * n * d * d + 4 * n * n * d + mlp
    return embed + depth * block

"""Batched calls into the model-side encoders that the evaluations take as callables."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

ImageEncoder = Callable[[list[np.ndarray]], Tensor]
"""Images (uint8 H×W×3, sizes may differ) -> B×E embeddings; the model does its own
resizing and normalisation."""

TextEncoder = Callable[[list[str]], Tensor]
"""Strings -> T×E embeddings."""


def embed_in_batches(items: Iterable, encode: Callable[[list], Tensor], batch_size: int) -> Tensor:
    """``encode`` applied to consecutive batches of ``items``, concatenated (N×E, float32 on
    the CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks: list[Tensor] = []
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            chunks.append(_encode_checked(encode, batch))
            batch = []
    if batch:
        chunks.append(_encode_checked(encode, batch))
    if not chunks:
        raise ValueError("nothing to embed: the input is empty")
    return torch.cat(chunks)


def _encode_checked(encode: Callable[[list], Tensor], batch: Sequence) -> Tensor:
    with torch.no_grad():
        out = torch.as_tensor(encode(list(batch)))
    if out.ndim != 2 or out.shape[0] != len(batch):
        raise ValueError(
            f"encoder returned shape {tuple(out.shape)} for a batch of {len(batch)}; "
            "it must return one embedding row per input (B×E)"
        )
    return out.detach().float().cpu()

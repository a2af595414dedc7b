"""The official Talk2DINO ``ProjectionLayer`` state-dict layout (lorebianchi98/Talk2DINO
src/model.py: ``linear_layer`` W1 [D, T], ``hidden_layers.0`` W2 [D, D]) and ψ by hand,
shared by the recipe and the release-import tests."""

from __future__ import annotations

import math

import torch


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def released_state(
    text_dim: int, vision_dim: int, mlp: bool, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "linear_layer.weight": torch.randn(vision_dim, text_dim, generator=g),
        "linear_layer.bias": torch.randn(vision_dim, generator=g),
    }
    if mlp:
        state["hidden_layers.0.weight"] = torch.randn(vision_dim, vision_dim, generator=g)
        state["hidden_layers.0.bias"] = torch.randn(vision_dim, generator=g)
    return state


def psi_by_hand(state: dict[str, torch.Tensor], t: list[float]) -> list[float]:
    """W2·tanh(W1·t + b1) + b2 (or W1·t + b1 without hidden layer), one vector, in floats."""
    w1, b1 = state["linear_layer.weight"].tolist(), state["linear_layer.bias"].tolist()
    hidden = [_dot(row, t) + b for row, b in zip(w1, b1)]
    if "hidden_layers.0.weight" not in state:
        return hidden
    w2, b2 = state["hidden_layers.0.weight"].tolist(), state["hidden_layers.0.bias"].tolist()
    return [_dot(row, [math.tanh(h) for h in hidden]) + b for row, b in zip(w2, b2)]

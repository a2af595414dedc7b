"""The frozen-module behaviour shared by the vision backbone and the text encoders."""

from __future__ import annotations

from torch import nn


class FrozenModule(nn.Module):
    """A module whose parameters never train: ``freeze()`` once after building the weights;
    ``train()`` keeps it in eval mode so that dropout and drop-path stay off even when a
    recipe puts its whole model (trainable heads + this) into training mode."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

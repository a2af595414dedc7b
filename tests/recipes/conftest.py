"""Tiny recipe configs, seeded models and random batches shared by the recipe tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import open_clip
import pytest
import torch
from torch import Tensor

from dinoalign.recipes import DinoTxtConfig, ProjectorConfig, Recipe, Talk2DINOConfig, build

HEADS, GRID = 3, (3, 3)
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "small", "large", "above", "below"]


class TinyRecipes:
    """Tiny configs of the three recipes and valid random inputs for them."""

    configs: ClassVar[dict[str, Any]] = {
        "talk2dino": Talk2DINOConfig(text_dim=12, vision_dim=8),
        "dinotxt": DinoTxtConfig(
            vision_dim=16,
            vision_heads=2,
            num_registers=2,
            text_width=16,
            text_layers=1,
            text_heads=2,
            context_length=16,
            drop_path=0.0,
        ),
        "projector": ProjectorConfig(
            vision_dim=8, embed_dim=6, hidden_dim=16, depth=2, bottleneck_dim=12
        ),
    }

    def model(self, name: str, seed: int = 0) -> Recipe:
        torch.manual_seed(seed)
        return build(name, self.configs[name])

    def batch(self, name: str, batch_size: int = 4, seed: int = 0) -> dict[str, Tensor]:
        cfg, g = self.configs[name], torch.Generator().manual_seed(seed)
        num_patches = GRID[0] * GRID[1]
        if name == "talk2dino":
            return {
                "text": torch.randn(batch_size, cfg.text_dim, generator=g),
                "head_embeddings": torch.randn(batch_size, HEADS, cfg.vision_dim, generator=g),
                "patches": torch.randn(batch_size, num_patches, cfg.vision_dim, generator=g),
                "attn_logits": torch.randn(batch_size, HEADS, num_patches, generator=g),
            }
        if name == "dinotxt":
            num_tokens = 1 + cfg.num_registers + num_patches
            return {
                "tokens_vision": torch.randn(batch_size, num_tokens, cfg.vision_dim, generator=g),
                "tokens": self.tokenize(self.captions(batch_size, g)),
            }
        return {
            "token_mean": torch.randn(batch_size, cfg.vision_dim, generator=g),
            "clip_image": torch.randn(batch_size, cfg.embed_dim, generator=g),
        }

    def class_texts(self, name: str, n: int = 5, seed: int = 1) -> Tensor | list[str]:
        """What ``encode_text`` of recipe ``name`` takes, for ``n`` classes."""
        cfg, g = self.configs[name], torch.Generator().manual_seed(seed)
        if name == "dinotxt":
            return self.captions(n, g)
        width = cfg.text_dim if name == "talk2dino" else cfg.embed_dim
        return torch.randn(n, width, generator=g)

    def tokenize(self, texts: list[str]) -> Tensor:
        cfg = self.configs["dinotxt"]
        return open_clip.get_tokenizer(cfg.tokenizer, context_length=cfg.context_length)(texts)

    @staticmethod
    def captions(n: int, g: torch.Generator) -> list[str]:
        picks = torch.randint(len(WORDS), (n, 4), generator=g).tolist()
        return ["a " + " ".join(WORDS[i] for i in row) for row in picks]


@pytest.fixture
def tiny() -> TinyRecipes:
    return TinyRecipes()


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine a
    second thread spinning against other jobs slows these tests down many times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Projector: regress the CLIP image embedding from a frozen DINOv2 global feature, so
that CLIP's own (untouched) text tower can query DINOv2 images.

Batch keys: ``token_mean`` B×D (DINOv2 mean of all tokens incl. CLS), ``clip_image``
B×E (the teacher's image embedding of the same image, the target), and for
``encode_text`` the teacher's N×E text features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dinoalign.recipes.base import CLIP_TEXT, Recipe, ShapeSpec, check_positive, feature_width
from dinoalign.recipes._registry import RECIPES


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """ProjectorWithResiduals sizes. Tiny defaults; the original: hidden_dim 2048,
    depth 6, bottleneck_dim 1024, embed_dim 512 (CLIP ViT-B/16)."""

    name: str = "projector"
    vision_dim: int = 384  # D
    embed_dim: int = 512  # E: the teacher CLIP's embedding width
    hidden_dim: int = 256
    depth: int = 2  # residual blocks
    bottleneck_dim: int = 128

    def __post_init__(self) -> None:
        check_positive(self, "vision_dim", "embed_dim", "hidden_dim", "bottleneck_dim")
        if self.depth < 0:
            raise ValueError(f"ProjectorConfig.depth must be >= 0, got {self.depth}")


class ResidualBlock(nn.Module):
    """x + LN(Linear(GELU(LN(Linear(x))))), width W -> W."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(width, width),
            nn.LayerNorm(width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.LayerNorm(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        """B×W -> B×W."""
        return x + self.branch(x)


class ProjectorWithResiduals(nn.Module):
    """Linear D→W; depth × ResidualBlock(W); LN; Linear W→M; GELU; Linear M→E; LN(E)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.vision_dim, cfg.hidden_dim),
            *(ResidualBlock(cfg.hidden_dim) for _ in range(cfg.depth)),
            nn.LayerNorm(cfg.hidden_dim),
            nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim),
            nn.GELU(),
            nn.Linear(cfg.bottleneck_dim, cfg.embed_dim),
            nn.LayerNorm(cfg.embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """B×D -> B×E (not normalised)."""
        return self.layers(x)


@RECIPES.register("projector")
class Projector(Recipe):
    """ŷ = ProjectorWithResiduals(token_mean); loss = MSE(norm(ŷ), norm(clip_image))."""

    config_class = ProjectorConfig
    has_dense_head = False
    name = "projector"
    image_columns = ("token_mean",)
    text_input = CLIP_TEXT
    has_clip_reference = True
    promotion_metric = "retrieval.t2i.r1"

    @classmethod
    def model_fields_from_features(cls, spec: Mapping[str, Any], training: Any) -> dict[str, Any]:
        """D from ``token_mean``, E from the teacher's ``clip_image``."""
        return {
            "vision_dim": feature_width(spec, "token_mean", cls.name),
            "embed_dim": feature_width(spec, "clip_image", cls.name),
        }

    @classmethod
    def training_data(
        cls, training: Any, model_cfg: Any, source: Any, *, image_limits: dict[str, Any], seed: int
    ) -> Any:
        """One sample per image: ``token_mean`` -> ``clip_image``."""
        from dinoalign.train.data import projector_data

        return projector_data(source)

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg)
        self.projector = ProjectorWithResiduals(cfg)

    def input_spec(self) -> dict[str, ShapeSpec]:
        d, e = self.cfg.vision_dim, self.cfg.embed_dim
        return {"token_mean": ("B", d), "clip_image": ("B", e), "text": ("N", e)}

    def encode_image(self, batch: Mapping[str, Tensor]) -> Tensor:
        """B×E: norm(ŷ) from ``token_mean`` B×D."""
        return F.normalize(self.projector(self.feature(batch, "token_mean")), dim=-1)

    def encode_text(self, text: Tensor | Sequence[str]) -> Tensor:
        """N×E: the teacher CLIP's own text features, normalised (nothing is trained on
        the text side)."""
        if not isinstance(text, Tensor):
            raise TypeError(
                "projector encodes the teacher CLIP's text features (N×E tensor), not "
                "strings: run the teacher's text tower first"
            )
        return F.normalize(self.check_shape(text, "text", self.input_spec()["text"]), dim=-1)

    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """MSE over all B×E entries of norm(ŷ) − norm(y) (= (2 − 2·cos)/E per row)."""
        predicted = self.encode_image(batch)
        target = F.normalize(self.feature(batch, "clip_image"), dim=-1)
        loss = F.mse_loss(predicted, target)
        stats = {"loss": loss.item(), "cosine": (predicted * target).sum(dim=-1).mean().item()}
        return loss, stats

    def dense_logits(
        self,
        batch: Mapping[str, Tensor],
        class_text_embeddings: Tensor,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Not available: the projector maps one global feature per image and has no
        per-patch head (``has_dense_head`` is False); evaluate it on classification
        and retrieval only."""
        raise NotImplementedError(
            "projector has no dense head: it maps one global DINOv2 feature per image into "
            "CLIP space. Skip segmentation for recipes with has_dense_head=False."
        )

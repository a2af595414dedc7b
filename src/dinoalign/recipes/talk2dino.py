"""Talk2DINO: map frozen text features into the frozen DINOv2 patch space.

Only the text side is trained: ψ(t) = W2·tanh(W1·t + b1) + b2 (``projection="mlp"``,
W1: T→D, W2: D→D) or ψ(t) = W1·t + b1 (``"linear"`` ablation). Each image brings H
attention-pooled embeddings v_h = Σ_p softmax_p(attn_logits_h)[p]·patches[p] (B×H×D,
computed in ``embed``); a caption is matched to the head it fits best.

Batch keys: ``text`` B×T (frozen text features, one row per caption, image features
repeated per caption), ``head_embeddings`` B×H×D; for dense inference ``patches`` B×P×D
and, for background cleaning, ``attn_logits`` B×H×P.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoalign.recipes.base import (
    TEXT_ENCODER,
    LogitScale,
    Recipe,
    ShapeSpec,
    check_positive,
    feature_width,
    retrieval_accuracy,
    symmetric_infonce,
    to_grid,
)
from dinoalign.recipes._registry import RECIPES

PROJECTIONS = ("mlp", "linear")
# The image side ψ is trained against (the paper's ablation; lorebianchi98/Talk2DINO flags
# ``disentangled_self_attn_token`` (default), ``avg_self_attn_token``, neither = CLS) -> the
# feature-store column it reads. A single vector is one "head": best-head InfoNCE is then
# plain InfoNCE, as the official loss over a B×D image embedding.
IMAGE_FEATURES = {"heads": "head_embeddings", "averaged_attention": "head_mean_embedding", "cls": "cls"}


@dataclasses.dataclass(frozen=True)
class Talk2DINOConfig:
    """Talk2DINO text projection. Defaults: CLIP ViT-B/16 text (512) -> DINOv2 ViT-S (384)."""

    name: str = "talk2dino"
    text_dim: int = 512  # T: width of the frozen text features
    vision_dim: int = 384  # D: DINOv2 width
    projection: str = "mlp"  # "mlp" (paper) or "linear" (ablation)
    temperature: float = 0.07
    learnable_temperature: bool = False
    # heads (paper: per-head embeddings, best head per caption), averaged_attention (one
    # embedding pooled by the heads' averaged attention) or cls: IMAGE_FEATURES.
    image_feature: str = "heads"

    def __post_init__(self) -> None:
        check_positive(self, "text_dim", "vision_dim", "temperature")
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"Talk2DINOConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}"
            )
        if self.image_feature not in IMAGE_FEATURES:
            raise ValueError(
                f"Talk2DINOConfig.image_feature must be one of {tuple(IMAGE_FEATURES)}, "
                f"got {self.image_feature!r}"
            )


@RECIPES.register("talk2dino")
class Talk2DINO(Recipe):
    """ψ on the text side, best-head InfoNCE against frozen per-head image embeddings.

    Global tasks: :meth:`similarity` scores a (text, image) pair by its best head,
    max_h ⟨t̂, v̂_h⟩, as training does; use it for zero-shot and retrieval. The fixed
    B×D ``encode_image`` is norm(mean_h v̂_h) (its cosine is proportional to the mean
    over heads of the per-head cosines): a text-independent embedding for indexes and
    plots, weaker for ranking because the heads that do not show the object dilute it.
    """

    config_class = Talk2DINOConfig
    name = "talk2dino"
    image_columns = ("head_embeddings",)
    text_input = TEXT_ENCODER  # align.talk2dino.text_encoder
    averages_prompt_features = True
    has_background_cleaning = True
    promotion_metric = "segmentation.miou"

    @classmethod
    def model_fields_from_features(cls, spec: Mapping[str, Any], training: Any) -> dict[str, Any]:
        """T from the ``text_<align.talk2dino.text_encoder>`` column, D from ``head_embeddings``."""
        return {
            "text_dim": feature_width(spec, f"text_{training.text_encoder}", cls.name),
            "vision_dim": feature_width(spec, "head_embeddings", cls.name),
        }

    @classmethod
    def training_data(
        cls, training: Any, model_cfg: Any, source: Any, *, image_limits: dict[str, Any], seed: int
    ) -> Any:
        """One sample per caption: its ``text_<encoder>`` row with its image's ``head_embeddings``."""
        from dinoalign.train.data import talk2dino_data

        return talk2dino_data(training, source, IMAGE_FEATURES[model_cfg.image_feature])

    def __init__(self, cfg: Talk2DINOConfig) -> None:
        super().__init__(cfg)
        self.image_columns = (IMAGE_FEATURES[cfg.image_feature],)
        self.proj_in = nn.Linear(cfg.text_dim, cfg.vision_dim)  # W1, b1
        self.proj_out = (
            nn.Linear(cfg.vision_dim, cfg.vision_dim) if cfg.projection == "mlp" else None
        )
        self.logit_scale = LogitScale(cfg.temperature, cfg.learnable_temperature)

    def input_spec(self) -> dict[str, ShapeSpec]:
        t, d = self.cfg.text_dim, self.cfg.vision_dim
        return {
            "text": ("B", t),
            "head_embeddings": ("B", "H", d),
            "patches": ("B", "P", d),
            "attn_logits": ("B", "H", "P"),
        }

    def batch_from_features(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        """{"head_embeddings": B×H×D} from the configured column; a single vector per image
        (``image_feature`` averaged_attention or cls) is B×1×D."""
        return {"head_embeddings": as_heads(features[self.image_columns[0]])}

    def project_text(self, text_features: Tensor) -> Tensor:
        """ψ(t): N×T -> N×D (not normalised)."""
        x = self.proj_in(text_features)
        if self.proj_out is not None:
            x = self.proj_out(torch.tanh(x))
        return x

    def encode_text(self, text: Tensor | Sequence[str]) -> Tensor:
        """t̂ = norm(ψ(t)), N×D, from N×T frozen text features. For class names, average
        the raw template features first, then call this (as the paper does)."""
        if not isinstance(text, Tensor):
            raise TypeError(
                "talk2dino encodes frozen text features (N×T tensor), not strings: run the "
                "text encoder named in params (dinoalign.backbones.text) first"
            )
        return F.normalize(
            self.project_text(self.check_shape(text, "text", self.input_spec()["text"])), dim=-1
        )

    def encode_image(self, batch: Mapping[str, Tensor]) -> Tensor:
        """B×D: norm(mean_h norm(v_h)) from ``head_embeddings`` B×H×D."""
        heads = F.normalize(self.feature(batch, "head_embeddings"), dim=-1)
        return F.normalize(heads.mean(dim=1), dim=-1)

    def similarity(self, text_embeddings: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """N×B best-head scores max_h ⟨t̂_n, v̂_{b,h}⟩ from N×D ``encode_text`` outputs and
        ``head_embeddings`` B×H×D."""
        heads = F.normalize(self.feature(batch, "head_embeddings"), dim=-1)
        text_hat = text_embeddings.to(self.param_device)
        return torch.einsum("nd,bhd->nbh", text_hat, heads).amax(dim=-1)

    def index_vectors(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        """(B·H×D normalised head embeddings, H): the best inner product over an image's
        vectors is its best-head score (:meth:`similarity`). On the batch's device."""
        heads = F.normalize(batch["head_embeddings"].float(), dim=-1)
        return heads.flatten(0, 1), heads.shape[1]

    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Best-head symmetric InfoNCE.

        t̂ = norm(ψ(t)) B×D, v̂ = norm(v) B×H×D; h*(j) = argmax_h ⟨t̂_j, v̂_{j,h}⟩ picks
        each pair's head; V_sel[j] = v̂_{j,h*(j)} is image j's column for every text;
        S = T̂·V_selᵀ (B×B); loss = ½[CE(S/τ, I) + CE(Sᵀ/τ, I)].
        """
        text_hat = self.encode_text(self.feature(batch, "text"))
        heads = F.normalize(self.feature(batch, "head_embeddings"), dim=-1)
        if heads.shape[0] != text_hat.shape[0]:
            raise ValueError(
                f"talk2dino: {text_hat.shape[0]} texts but {heads.shape[0]} images; the "
                f"loader must repeat image features once per caption"
            )
        selected, best_head = select_best_heads(text_hat, heads)
        similarity = text_hat @ selected.T
        scale = self.logit_scale()
        logits = scale * similarity
        loss = symmetric_infonce(logits, logits.T)
        stats = {
            "loss": loss.item(),
            "logit_scale": scale.item(),
            "positive_cosine": similarity.diagonal().mean().item(),
            "t2i_accuracy": retrieval_accuracy(logits),
            "distinct_heads": float(best_head.unique().numel()),
        }
        return loss, stats

    def dense_logits(
        self,
        batch: Mapping[str, Tensor],
        class_text_embeddings: Tensor,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """B×N×h×w similarity map m = sigmoid(⟨norm(patches), t̂_n⟩) from ``patches``
        B×P×D and N×D ``encode_text`` outputs. Background cleaning is separate:
        :func:`background_cleaning`."""
        text_hat = self.check_shape(
            class_text_embeddings, "class_text_embeddings", ("N", self.cfg.vision_dim)
        )
        return to_grid(patch_similarity(self.feature(batch, "patches"), text_hat), grid)

    def dense_logits_from_images(
        self,
        images: Tensor,
        backbone: Any,
        class_text_embeddings: Tensor,
        clean_background: bool = False,
        cleaning_lambda: float = 0.2,
    ) -> Tensor:
        """B×N×h×w sigmoid maps of the backbone's ``patches`` B×P×D for normalised images
        B×3×H×W; with ``clean_background``, :func:`background_cleaning` (λ =
        ``cleaning_lambda``) using its ``attn_logits`` B×H×P."""
        out = backbone(images)
        if clean_background:
            cleaned = background_cleaning(
                out.patches, out.attn_logits, class_text_embeddings, cleaning_lambda
            )
            return cleaned.unflatten(-1, out.grid)
        return self.dense_logits({"patches": out.patches}, class_text_embeddings, out.grid)


def as_heads(image_features: Tensor) -> Tensor:
    """B×H×D per-head embeddings as they are, a B×D embedding as one head B×1×D."""
    return image_features if image_features.dim() == 3 else image_features.unsqueeze(1)


def select_best_heads(text_hat: Tensor, heads_hat: Tensor) -> tuple[Tensor, Tensor]:
    """For pair i, h*(i) = argmax_h ⟨t̂_i, v̂_{i,h}⟩.

    text_hat B×D, heads_hat B×H×D (both normalised) -> (V_sel B×D, h* B).
    """
    head_scores = torch.einsum("bd,bhd->bh", text_hat, heads_hat)
    best_head = head_scores.argmax(dim=1)
    selected = heads_hat[torch.arange(heads_hat.shape[0], device=heads_hat.device), best_head]
    return selected, best_head


def patch_similarity(patches: Tensor, text_hat: Tensor) -> Tensor:
    """m = sigmoid(⟨norm(x_p), t̂_n⟩): patches B×P×D, text_hat N×D -> B×N×P."""
    return torch.sigmoid(torch.einsum("bpd,nd->bnp", F.normalize(patches, dim=-1), text_hat))


def background_cleaning(
    patches: Tensor, attn_logits: Tensor, text_hat: Tensor, lam: float = 0.2
) -> Tensor:
    """Talk2DINO's background cleaning of the similarity map, for a batch of images.

    patches B×P×D (final-norm patch tokens x_p), attn_logits B×H×P (CLS→patch logits A,
    pre-softmax), text_hat N×D (normalised class embeddings t̂_n) -> B×N×P cleaned map:
      u_h = norm(Σ_p A_h[p]·x_p)                 (heads' embeddings, raw logits as weights)
      w_{n,h} = softmax_h ⟨t̂_n, u_h⟩            (how much class n trusts head h)
      c_n = softmax_p(Σ_h w_{n,h}·A_h)            (class-specific attention)
      c ← (c - min c) / max(max c, max c - min c), min and max over all classes and
          patches of the image (the official normalisation: since c is a softmax,
          c ≥ 0 and the divisor is max c, not max - min), then mapped linearly onto
          [min m, max m] of that image's map m = sigmoid(⟨norm(x_p), t̂_n⟩)
      m ← (m + λ·c)/(1 + λ)
    As the official ``DINOText.similarity_assignment_weighted`` (lorebianchi98/Talk2DINO,
    src/open_vocabulary_segmentation/models/dinotext/dinotext.py), which sees one image
    at a time; here every image of the batch is normalised on its own.
    Reshape with ``.unflatten(-1, grid)`` for the B×N×h×w map.
    """
    if (
        patches.ndim != 3
        or attn_logits.ndim != 3
        or patches.shape[:2] != (attn_logits.shape[0], attn_logits.shape[2])
    ):
        raise ValueError(
            f"background_cleaning needs patches B×P×D and attn_logits B×H×P with the same "
            f"B and P, got {tuple(patches.shape)} and {tuple(attn_logits.shape)}"
        )
    # Cached patches are fp16: compute in the class embeddings' dtype.
    patches, attn_logits = patches.to(text_hat), attn_logits.to(text_hat)
    similarity = patch_similarity(patches, text_hat)
    head_embeddings = F.normalize(torch.einsum("bhp,bpd->bhd", attn_logits, patches), dim=-1)
    head_weights = torch.einsum("nd,bhd->bnh", text_hat, head_embeddings).softmax(dim=-1)
    class_attention = torch.einsum("bnh,bhp->bnp", head_weights, attn_logits).softmax(dim=-1)
    rescaled = _rescale_per_image(class_attention, similarity)
    return (similarity + lam * rescaled) / (1.0 + lam)


def _rescale_per_image(values: Tensor, reference: Tensor) -> Tensor:
    """Per image (B×…): (v - min v) / max(max v, max v - min v), then mapped linearly
    onto ``reference``'s per-image range [min r, max r] (Talk2DINO's normalisation)."""
    dims = tuple(range(1, values.ndim))
    lo, hi = values.amin(dim=dims, keepdim=True), values.amax(dim=dims, keepdim=True)
    ref_lo, ref_hi = reference.amin(dim=dims, keepdim=True), reference.amax(dim=dims, keepdim=True)
    divisor = torch.maximum(hi, hi - lo).clamp_min(torch.finfo(values.dtype).tiny)
    return (values - lo) / divisor * (ref_hi - ref_lo) + ref_lo

"""dino.txt: a frozen DINOv2 with two trainable vision blocks, and a text transformer
trained from scratch against it (LiT-style, CLIP loss).

Vision: frozen backbone tokens [CLS, R registers, P patches] (B×(1+R+P)×D) -> 2 timm ViT
blocks of the backbone's width and heads (LayerScale 1e-5, drop-path) -> LayerNorm ->
g = concat(CLS′, mean_p patch′) ∈ R^{2D}; patch′ B×P×D are the dense features.
Text: CLIP BPE tokens (context 77, vocab 49,408) -> causal pre-LN transformer (open_clip's
``TextTransformer``, random init) pooled at EOT (the argmax token id) -> linear to 2D.

Batch keys: ``tokens_vision`` B×(1+R+P)×D (or images through :meth:`DinoTxt.forward_images`)
and ``tokens`` B×context (int64 token ids).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import open_clip
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor, nn

from dinoalign.recipes.base import (
    OWN_TEXT,
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


@dataclasses.dataclass(frozen=True)
class DinoTxtConfig:
    """dino.txt sizes. Vision fields must match the frozen backbone (default: the demo's
    ViT-S/14 with 4 registers); text defaults are tiny (the paper: 1280 wide, 24 layers,
    20 heads)."""

    name: str = "dinotxt"
    backbone: str = "vit_small_patch14_reg4_dinov2"  # frozen; rebuilt from its name, never saved
    vision_dim: int = 384
    vision_heads: int = 6
    num_registers: int = 4
    vision_blocks: int = 2
    drop_path: float = 0.1
    layerscale_init: float = 1e-5
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 77
    vocab_size: int = 49408
    tokenizer: str = "ViT-B-16"  # open_clip tokenizer name (CLIP BPE)
    temperature: float = 0.07  # initial; learnable, scale clamped at max_logit_scale
    max_logit_scale: float = 100.0
    # g = [CLS′ ; mean_p patch′] (the released model); false: g = CLS′ alone (the paper's
    # ablation; facebookresearch/dinov3 DINOTxtConfig.vision_model_use_patch_tokens).
    use_patch_tokens: bool = True

    def __post_init__(self) -> None:
        check_positive(
            self,
            "vision_dim",
            "vision_heads",
            "vision_blocks",
            "layerscale_init",
            "text_width",
            "text_layers",
            "text_heads",
            "context_length",
            "vocab_size",
            "temperature",
            "max_logit_scale",
        )
        for width, heads in (
            (self.vision_dim, self.vision_heads),
            (self.text_width, self.text_heads),
        ):
            if width % heads:
                raise ValueError(f"DinoTxtConfig: width {width} is not divisible by {heads} heads")
        if self.num_registers < 0 or not 0.0 <= self.drop_path < 1.0:
            raise ValueError(
                f"DinoTxtConfig: num_registers must be >= 0 and drop_path in [0, 1), got "
                f"{self.num_registers} and {self.drop_path}"
            )


class BackboneFeatures(Protocol):
    """What :meth:`DinoTxt.forward_images` reads from the backbone adapter's output."""

    cls: Tensor  # B×D
    registers: Tensor  # B×R×D
    patches: Tensor  # B×P×D


@RECIPES.register("dinotxt")
class DinoTxt(Recipe):
    """Trainable vision blocks + text tower on a frozen backbone, CLIP InfoNCE.

    ``encode_image`` uses all of g (2D); ``dense_logits`` compares normalised patch′
    with the second half of the text embedding (the part aligned with mean_p patch′).
    """

    config_class = DinoTxtConfig
    name = "dinotxt"
    image_columns = ("cls", "registers", "patches")  # stitched by batch_from_features
    text_input = OWN_TEXT
    promotion_metric = "zeroshot.top1"

    @classmethod
    def model_fields_from_features(cls, spec: Mapping[str, Any], training: Any) -> dict[str, Any]:
        """The frozen backbone (name, width, heads) of the manifest, R from ``registers``."""
        backbone = spec["backbone"]
        return {
            "backbone": backbone["name"],
            "vision_dim": int(backbone["embed_dim"]),
            "vision_heads": int(backbone["num_heads"]),
            "num_registers": feature_width(spec, "registers", cls.name, axis=0),
        }

    @classmethod
    def training_data(
        cls, training: Any, model_cfg: Any, source: Any, *, image_limits: dict[str, Any], seed: int
    ) -> Any:
        """One sample per image with a caption drawn per epoch; ``inputs: images`` first
        checks that the backbone rebuilt with ``seed`` is the one that made the features."""
        from dinoalign.train.data import check_backbone, dinotxt_data

        if training.inputs == "images":
            check_backbone(source.spec, seed, source.features, source.root)
        return dinotxt_data(training, model_cfg, source, image_limits=image_limits)

    @classmethod
    def batch_from_features(cls, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``tokens_vision`` B×(1+R+P)×D = [cls B×D; registers B×R×D; patches B×P×D]."""
        tokens = torch.cat(
            [features["cls"][:, None], features["registers"], features["patches"]], dim=1
        )
        return {"tokens_vision": tokens}

    def batch_from_images(self, images: Tensor, backbone: Any) -> dict[str, Tensor]:
        """``tokens_vision`` of normalised images B×3×H×W (:meth:`forward_images`)."""
        return {"tokens_vision": self.forward_images(images, backbone)}

    def __init__(self, cfg: DinoTxtConfig) -> None:
        super().__init__(cfg)
        self.vision_blocks = nn.Sequential(
            *(
                Block(
                    cfg.vision_dim,
                    cfg.vision_heads,
                    qkv_bias=True,
                    init_values=cfg.layerscale_init,
                    drop_path=cfg.drop_path,
                    norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
                )
                for _ in range(cfg.vision_blocks)
            )
        )
        self.vision_blocks.apply(init_weights_vit_timm)
        self.vision_norm = nn.LayerNorm(cfg.vision_dim, eps=1e-6)
        self.text = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.text_width,
            heads=cfg.text_heads,
            layers=cfg.text_layers,
            output_dim=self.embed_dim,
            pool_type="argmax",  # EOT has the largest id in CLIP's vocabulary
        )
        self.logit_scale = LogitScale(
            cfg.temperature, learnable=True, max_scale=cfg.max_logit_scale
        )

    @property
    def embed_dim(self) -> int:
        """E: 2D with the patch mean in g, D with CLS′ alone."""
        return (2 if self.cfg.use_patch_tokens else 1) * self.cfg.vision_dim

    def input_spec(self) -> dict[str, ShapeSpec]:
        d, r = self.cfg.vision_dim, self.cfg.num_registers
        return {"tokens_vision": ("B", f"1+{r}+P", d), "tokens": ("B", self.cfg.context_length)}

    # ------------------------------------------------------------------ vision

    def forward_images(
        self, images: Tensor, backbone: Callable[[Tensor], BackboneFeatures]
    ) -> Tensor:
        """Run the frozen ``backbone`` (the DINOv2 adapter) on B×3×H×W ``images`` without
        gradients -> B×(1+R+P)×D tokens, to put under ``batch["tokens_vision"]``. The
        backbone is not part of this module and never in its state dict."""
        with torch.no_grad():
            out = backbone(images)
        if out.registers.shape[1] != self.cfg.num_registers:
            raise ValueError(
                f"dinotxt: the backbone gives {out.registers.shape[1]} register tokens but "
                f"cfg.num_registers={self.cfg.num_registers}; set it to match {self.cfg.backbone}"
            )
        return torch.cat([out.cls.unsqueeze(1), out.registers, out.patches], dim=1)

    def vision_features(self, tokens_vision: Tensor) -> tuple[Tensor, Tensor]:
        """tokens_vision B×(1+R+P)×D -> (g B×E not normalised, patch′ B×P×D): g =
        [CLS′ ; mean_p patch′], or CLS′ alone without ``use_patch_tokens`` (as the official
        ``VisionTower`` builds its global embedding from ``use_class_token`` and
        ``use_patch_tokens``, facebookresearch/dinov3 dinov3/eval/text/vision_tower.py)."""
        x = self.vision_norm(self.vision_blocks(tokens_vision))
        patches = x[:, 1 + self.cfg.num_registers :]
        if not self.cfg.use_patch_tokens:
            return x[:, 0], patches
        return torch.cat([x[:, 0], patches.mean(dim=1)], dim=-1), patches

    def _vision_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        tokens = self.feature(batch, "tokens_vision")
        if tokens.shape[1] < 2 + self.cfg.num_registers:
            raise ValueError(
                f"dinotxt: tokens_vision has {tokens.shape[1]} tokens; expected CLS, "
                f"{self.cfg.num_registers} registers (cfg.num_registers) and at least one patch"
            )
        return tokens

    def encode_image(self, batch: Mapping[str, Tensor]) -> Tensor:
        """B×E: norm(concat(CLS′, mean_p patch′)), or norm(CLS′) without ``use_patch_tokens``."""
        return F.normalize(self.vision_features(self._vision_tokens(batch))[0], dim=-1)

    # ------------------------------------------------------------------ text

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """N strings -> N×context int64 CLIP BPE token ids (SOT ... EOT, zero padded)."""
        return _tokenizer(self.cfg.tokenizer, self.cfg.context_length)(list(texts))

    def encode_text(self, text: Tensor | Sequence[str]) -> Tensor:
        """N×E normalised text embeddings from strings or N×context token ids."""
        tokens = self.tokenize(text) if not isinstance(text, Tensor) else text
        if tokens.is_floating_point() or tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise ValueError(
                f"dinotxt.encode_text takes strings or token ids in [0, {self.cfg.vocab_size}) "
                f"from the {self.cfg.tokenizer!r} tokenizer, got {tokens.dtype} values"
            )
        tokens = self.check_shape(tokens, "tokens", self.input_spec()["tokens"])
        return F.normalize(self.text(tokens), dim=-1)

    # ------------------------------------------------------------------ loss and dense

    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """CLIP symmetric InfoNCE over the global batch.

        Local B image/text embeddings; under torch.distributed with world size W > 1 both
        are all-gathered WITH gradients to W·B columns, this rank's rows are scored
        against them and labels are offset by rank·B (every rank must hold the same B).
        The mean of the W rank losses equals the loss of the concatenated batch, and
        DDP's gradient averaging gives that loss's gradient.
        """
        image = self.encode_image(batch)
        text = self.encode_text(self.feature(batch, "tokens"))
        all_image, offset = _gather_with_grad(image)
        all_text, _ = _gather_with_grad(text)
        labels = torch.arange(image.shape[0], device=image.device) + offset
        scale = self.logit_scale()
        logits_per_text = scale * text @ all_image.T
        logits_per_image = scale * image @ all_text.T
        loss = symmetric_infonce(logits_per_text, logits_per_image, labels)
        stats = {
            "loss": loss.item(),
            "logit_scale": scale.item(),
            "t2i_accuracy": retrieval_accuracy(logits_per_text, labels),
            "i2t_accuracy": retrieval_accuracy(logits_per_image, labels),
        }
        return loss, stats

    def dense_logits(
        self,
        batch: Mapping[str, Tensor],
        class_text_embeddings: Tensor,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """B×N×h×w cosine between norm(patch′) and the normalised second half of the
        N×2D ``encode_text`` outputs (the half trained against mean_p patch′). Without
        ``use_patch_tokens`` no half was trained against patches: the whole N×D text
        embedding (trained against CLS′) is compared, which is what the ablation measures."""
        d = self.cfg.vision_dim
        text = self.check_shape(class_text_embeddings, "class_text_embeddings", ("N", self.embed_dim))
        patches = F.normalize(self.vision_features(self._vision_tokens(batch))[1], dim=-1)
        scores = torch.einsum("bpd,nd->bnp", patches, F.normalize(text[:, -d:], dim=-1))
        return to_grid(scores, grid)

    def dense_logits_from_images(
        self,
        images: Tensor,
        backbone: Any,
        class_text_embeddings: Tensor,
        clean_background: bool = False,
        cleaning_lambda: float = 0.2,
    ) -> Tensor:
        """B×N×h×w :meth:`dense_logits` of normalised images B×3×H×W through
        :meth:`forward_images`, on their patch grid (no background cleaning)."""
        tokens = self.forward_images(images, backbone)
        patch = backbone.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        return self.dense_logits({"tokens_vision": tokens}, class_text_embeddings, grid)


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(all ranks' rows of x concatenated in rank order, this rank's row offset);
    (x, 0) outside a multi-process torch.distributed run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x), dim=0), dist.get_rank() * x.shape[0]


@functools.cache
def _tokenizer(name: str, context_length: int) -> Callable[[list[str]], Tensor]:
    return open_clip.get_tokenizer(name, context_length=context_length)

"""DINO pretraining of a timm DINOv2-shaped ViT, saved as a timm-format safetensors file
that :func:`dinoalign.backbones.build_backbone` loads through ``weights=`` (the path a
user takes with a real DINOv2 file).

    images = demo_pool(SyntheticWorldConfig(image_size=112), cfg.pool_size)
    result = pretrain(params.backbone, cfg, images, out_dir=Path("artifacts/pretrain"))
    build_backbone(params.backbone.name, weights=str(result.checkpoint), ...)

The loop is facebookresearch/dino ``main_dino.py`` ``train_dino`` / ``train_one_epoch``
on one process: student = ViT + :class:`~dinoalign.pretrain.dino.DINOHead`, teacher = a
copy updated by EMA only; the student sees every crop, the teacher the two global ones;
AdamW with per-iteration cosine lr / weight-decay / momentum schedules, per-parameter
gradient clipping, the head's last layer frozen for the first epoch(s). With
``ibot_loss_weight > 0`` the step is DINOv2's (``dinov2/train/ssl_meta_arch.py``
``forward_backward``): some of the student's global crops have patches replaced by a learnt
mask token, and the shared head's outputs at those patches learn the teacher's outputs at
the same patches of the unmasked crop (:class:`~dinoalign.pretrain.dino.IBOTPatchLoss`).
The saved weights are the teacher's backbone (upstream evaluates and releases the teacher
too; the mask token is not a timm weight and is not saved). Differences:
no stochastic depth (the student is built by the same ``build_backbone`` call as the
loader, so its state dict is the file's), no fp16, and the hyper-parameters of
:class:`~dinoalign.pretrain.config.PretrainConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dinoalign.backbones.dinov2 import DinoBackbone, build_backbone
from dinoalign.pretrain.config import DESCRIPTION, PretrainConfig
from dinoalign.pretrain.dino import (
    DINOHead,
    DINOLoss,
    IBOTPatchLoss,
    MultiCrop,
    clip_gradients,
    cosine_schedule,
    ema_update,
    sample_masks,
    teacher_temp_schedule,
)
from dinoalign.storage import atomic_path

CHECKPOINT = "model.safetensors"


class DinoNet(nn.Module):
    """Backbone + DINO head on a list of crops (upstream ``utils.MultiCropWrapper``): crops
    of the same size go through the ViT in one batch; the CLS token after the final norm
    feeds the head.

    ``forward(crops, masks=None, select=None)`` returns (CLS outputs (n_crops·B)×K in the
    order of the crops, patch outputs M×K or None). ``masks`` ((2·B)×P bool over the
    first two crops, the global ones) replaces those patch embeddings by ``mask_token``
    before the positional embedding (dinov2 ``prepare_tokens_with_masks``); ``select``
    (same shape) names the patches whose final tokens also go through the head (the
    student selects the patches it masked, the teacher the same patches of its unmasked
    crops). ``mask_token`` exists only when built with ``masked=True``.
    """

    def __init__(self, vit: nn.Module, head: DINOHead, masked: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.head = head
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim)) if masked else None

    def _tokens(self, x: Tensor, masks: Tensor | None) -> Tensor:
        vit = self.vit
        if masks is None:
            return vit.forward_features(x)
        if self.mask_token is None:
            raise ValueError("masked crops need a DinoNet built with masked=True")
        x = vit.patch_embed(x)  # B×h×w×D (dynamic image size)
        x = torch.where(masks.reshape(x.shape[:-1]).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

    def forward(self, crops: list[Tensor], masks: Tensor | None = None,
                select: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        outputs, patches, start = [], None, 0
        prefix = self.vit.num_prefix_tokens
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            first = start == 0  # the global crops (upstream's first group)
            tokens = self._tokens(torch.cat(crops[start:end]), masks if first else None)
            outputs.append(tokens[:, 0])
            if first and select is not None:
                patches = tokens[: len(select), prefix:][select]
            start = end
        cls_out = self.head(torch.cat(outputs))
        return cls_out, (self.head(patches) if patches is not None else None)


@dataclasses.dataclass
class PretrainResult:
    """``backbone``: the teacher's ViT as a frozen :class:`DinoBackbone`; ``curve``: one
    row per epoch (``epoch``, ``step``, ``loss``, ``teacher_entropy``,
    ``teacher_marginal_entropy``, ``center_norm``, ``teacher_temp``, ``lr``, and with iBOT
    ``dino_loss``, ``ibot_loss``, ``teacher_patch_entropy``, ``patch_center_norm``;
    ``momentum``, ``crops_per_s``, ``seconds``); ``checkpoint``: the written file or None;
    ``log_k``: log(out_dim), the entropy of a uniform (collapsed) teacher."""

    backbone: DinoBackbone
    curve: list[dict[str, float]]
    checkpoint: Path | None
    log_k: float


def demo_pool(world: Any, n: int, split: str = "train", start: int = 0) -> np.ndarray:
    """uint8 images n×S×S×3: indices ``start`` … ``start+n-1`` of ``split`` of the demo world
    (a :class:`~dinoalign.data.config.SyntheticWorldConfig`), rendered in memory. Any
    index exists (each image is a pure function of config, split and index), so the pool
    may be larger than ``world.n_train``; the test split is refused."""
    from dinoalign.data.synthetic import render

    if split == "test":
        raise ValueError("the pretraining pool must not draw from the test split")
    return np.stack([render(world, split, i).image for i in range(start, start + n)])


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Upstream ``utils.get_params_groups``: no weight decay on biases and 1-d tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(
    backbone_cfg: Any,
    cfg: PretrainConfig,
    images: np.ndarray,
    out_dir: Path | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> PretrainResult:
    """DINO-pretrain the ViT of ``backbone_cfg`` (a ``BackboneConfig``: ``name``,
    ``img_size``, ``model_kwargs``, and ``pretrained``/``weights`` to start from other
    weights than the seeded random init) on uint8 ``images`` N×H×W×3.

    Writes ``out_dir/model.safetensors`` (timm keys of the teacher's backbone) when
    ``out_dir`` is given; ``log`` receives every epoch's curve row.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images N×H×W×3, got {images.dtype} {images.shape}")
    if len(images) < cfg.batch_size:
        raise ValueError(f"{len(images)} images are fewer than one batch ({cfg.batch_size})")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(backbone_cfg, cfg, images, out_dir, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    backbone_cfg: Any, cfg: PretrainConfig, images: np.ndarray, out_dir: Path | None,
    log: Callable[[dict[str, float]], None] | None,
) -> PretrainResult:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    frozen = build_backbone(
        backbone_cfg.name, pretrained=backbone_cfg.pretrained, weights=backbone_cfg.weights,
        img_size=backbone_cfg.img_size, model_kwargs=backbone_cfg.model_kwargs,
    )
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(cfg, name) % frozen.patch_size:
            raise ValueError(
                f"pretrain.{name} = {getattr(cfg, name)} is not a multiple of the backbone's "
                f"patch size {frozen.patch_size}"
            )
    mean, std = frozen.mean[:, None, None], frozen.std[:, None, None]
    vit = frozen.vit.requires_grad_(True).train()
    head = DINOHead(frozen.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                    norm_last_layer=cfg.norm_last_layer)
    ibot = cfg.ibot_loss_weight > 0
    student = DinoNet(vit, head, masked=ibot)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    loss_fn = DINOLoss(cfg.out_dim, cfg.n_crops, cfg.student_temp, cfg.center_momentum)
    patch_loss_fn = IBOTPatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
    grid = cfg.global_crop_size // frozen.patch_size
    optimizer = torch.optim.AdamW(_param_groups(student))
    multicrop = MultiCrop(cfg)

    pool = torch.from_numpy(images)  # N×H×W×3 uint8, converted per batch
    steps = len(images) // cfg.batch_size  # drop_last, as upstream
    lr_s = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps, warmup_epochs=cfg.warmup_epochs)
    wd_s = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps)
    m_s = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps)
    temp_s = teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                   cfg.warmup_teacher_temp_epochs, cfg.epochs)
    last_layer = set(map(id, head.last_layer_parameters()))
    curve: list[dict[str, float]] = []
    it = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(images), generator=gen)
        sums = {"loss": 0.0, "teacher_entropy": 0.0, "teacher_marginal_entropy": 0.0}
        if ibot:
            sums.update(dino_loss=0.0, ibot_loss=0.0, teacher_patch_entropy=0.0)
        for b in range(steps):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(lr_s[it])
                if i == 0:  # only the first group is regularised
                    group["weight_decay"] = float(wd_s[it])
            batch = pool[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            x = batch.permute(0, 3, 1, 2).float() / 255.0
            crops = [(c - mean) / std for c in multicrop(x, gen)]
            masks = (sample_masks(2 * len(batch), grid, grid, cfg.mask_probability, cfg.mask_ratio, gen,
                                  cfg.mask_min_patches) if ibot else None)
            with torch.no_grad():
                teacher_out, teacher_patches = teacher(crops[:2], select=masks)
            student_out, student_patches = student(crops, masks=masks, select=masks)
            temp = float(temp_s[epoch])
            loss = dino_loss = loss_fn(student_out, teacher_out, temp)
            if ibot:
                ibot_loss = patch_loss_fn(student_patches, teacher_patches, masks, temp)
                loss = dino_loss + cfg.ibot_loss_weight * ibot_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DINO loss is {loss.item()} at epoch {epoch} step {b}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                clip_gradients(student.parameters(), cfg.clip_grad)
            if epoch < cfg.freeze_last_layer:  # upstream cancel_gradients_last_layer
                for p in student.head.parameters():
                    if id(p) in last_layer:
                        p.grad = None
            optimizer.step()
            ema_update(teacher, student, float(m_s[it]))
            sums["loss"] += loss.item()
            sums["teacher_entropy"] += loss_fn.last["teacher_entropy"]
            sums["teacher_marginal_entropy"] += loss_fn.last["teacher_marginal_entropy"]
            if ibot:
                sums["dino_loss"] += dino_loss.item()
                sums["ibot_loss"] += ibot_loss.item()
                sums["teacher_patch_entropy"] += patch_loss_fn.last["teacher_patch_entropy"]
            it += 1
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "step": it,
            **{k: v / steps for k, v in sums.items()},
            "center_norm": float(loss_fn.center.norm()),
            **({"patch_center_norm": float(patch_loss_fn.center.norm())} if ibot else {}),
            "teacher_temp": float(temp_s[epoch]),
            "lr": float(lr_s[it - 1]),
            "momentum": float(m_s[it - 1]),
            "crops_per_s": steps * cfg.batch_size * cfg.n_crops / seconds,
            "seconds": seconds,
        }
        curve.append(row)
        if log is not None:
            log(row)

    teacher_vit = teacher.vit
    checkpoint = None
    if out_dir is not None:
        checkpoint = save_checkpoint(teacher_vit, Path(out_dir) / CHECKPOINT, {
            "architecture": backbone_cfg.name,
            "img_size": str(backbone_cfg.img_size),
            "model_kwargs": json.dumps(dict(backbone_cfg.model_kwargs or {}), sort_keys=True),
            "pretrain": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
            "epochs": str(cfg.epochs),
            "final_loss": f"{curve[-1]['loss']:.6f}",
        })
    return PretrainResult(DinoBackbone(teacher_vit), curve, checkpoint, float(np.log(cfg.out_dim)))


def save_checkpoint(vit: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the timm state dict of ``vit`` to ``path`` (safetensors; string metadata
    with ``format: pt`` and ``description``), whole or not at all (:func:`atomic_path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    meta = {"format": "pt", "description": DESCRIPTION, **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path

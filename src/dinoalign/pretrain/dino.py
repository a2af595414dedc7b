"""DINO self-distillation pieces (Caron et al. 2021), written after facebookresearch/dino:

- :class:`DINOHead` = ``vision_transformer.py`` ``DINOHead`` (3-layer MLP, L2-normalised
  bottleneck, weight-normalised last layer whose norm is frozen at 1 by default);
- :class:`DINOLoss` = ``main_dino.py`` ``DINOLoss`` (teacher centering + sharpening,
  cross-entropy of every student crop against each teacher crop but its own, centre EMA);
- :func:`cosine_schedule` = ``utils.py`` ``cosine_scheduler``, :func:`teacher_temp_schedule`
  = ``DINOLoss.teacher_temp_schedule``, :func:`ema_update` = the teacher update in
  ``main_dino.py`` ``train_one_epoch``, :func:`clip_gradients` = ``utils.clip_gradients``;
- :class:`MultiCrop` = ``main_dino.py`` ``DataAugmentationDINO``, batched with torch ops.

and the iBOT masked-patch term DINOv2 adds to it (Oquab et al. 2023, written after
facebookresearch/dinov2):

- :func:`block_mask` = ``dinov2/data/masking.py`` ``MaskingGenerator`` (BEiT's block-wise
  masking), :func:`sample_masks` = the masks of ``dinov2/data/collate.py``
  ``collate_data_and_cast`` (a share ``mask_probability`` of the global crops masked, their
  ratios spread over ``mask_ratio`` in equal bins, the rest unmasked, shuffled);
- :class:`IBOTPatchLoss` = ``dinov2/loss/ibot_patch_loss.py`` ``iBOTPatchLoss``
  (``softmax_center_teacher``, ``forward_masked`` with per-image weights 1/n_masked, the
  centre EMA over the masked teacher tokens).

Where this differs from upstream, and why:

- :class:`MultiCrop` has **no horizontal flip** (demo captions say left/right), **no hue
  jitter, no grayscale and no solarisation** (colour is half of every demo class; each of
  them changes or erases hue, and a student made invariant to them cannot tell a red
  square from an orange one). Brightness, contrast and saturation jitter stay: each maps a
  pixel to ``a·x + b`` with ``a > 0`` and one ``b`` for its three channels, which keeps
  hue; values are not clamped to [0, 1] afterwards, so that stays exact.
- Crops are resampled bilinearly (upstream: PIL bicubic); blur sigma is in pixels of the
  112-pixel demo images (upstream 0.1-2 at 224).
- The loss takes the teacher temperature as an argument (the caller reads it off
  :func:`teacher_temp_schedule` per epoch, as upstream's ``forward(..., epoch)`` does) and
  also returns the collapse monitors; the centre update is a plain mean (one process).
- The masks draw from a ``torch.Generator`` (upstream: Python's ``random``), so a seeded run
  is reproducible; the iBOT teacher is centred (DINOv2's ``centering: centering``, the
  default config), not Sinkhorn-Knopp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoalign.pretrain.config import PretrainConfig

# ----------------------------------------------------------------------------- head


class DINOHead(nn.Module):
    """facebookresearch/dino ``vision_transformer.DINOHead`` without batch norm:
    Linear-GELU-(Linear-GELU)×(nlayers-2)-Linear to ``bottleneck_dim``, L2 normalisation,
    then a weight-normalised Linear to ``out_dim`` without bias. ``norm_last_layer``
    freezes the weight norm ``g`` at 1 (upstream's ``weight_g.requires_grad = False``).

    The weight norm is written out (``weight_g``, ``weight_v``; W = g·v/‖v‖ per output
    row, as ``nn.utils.weight_norm(dim=0)``) so that ``copy.deepcopy`` and the EMA see
    plain parameters.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        nlayers: int = 3, norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():  # upstream _init_weights: trunc_normal(0.02), bias 0
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # upstream: weight_norm(nn.Linear(...)) keeps nn.Linear's default init for v, g = 1
        v = nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach()
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [self.weight_v, self.weight_g]

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


# ----------------------------------------------------------------------------- loss


def entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of each row of probabilities ``p`` (…×K)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


class DINOLoss(nn.Module):
    """facebookresearch/dino ``main_dino.py`` ``DINOLoss``.

    ``forward(student_out, teacher_out, teacher_temp)``: ``student_out`` (n_crops·B)×K in
    crop-major order (all images' crop 0, then crop 1, …; crops 0 and 1 are the global
    ones), ``teacher_out`` (2·B)×K on the two global crops. The teacher is centred and
    sharpened, ``softmax((t - c) / teacher_temp)``; the loss is the mean over the
    (teacher crop, student crop) pairs with different crops of the batch-mean
    ``-Σ q·log_softmax(s / student_temp)``. Afterwards the centre moves towards the
    batch mean of the raw teacher outputs: ``c ← m·c + (1-m)·mean(t)``.

    ``last`` holds the collapse monitors of the latest call (the teacher distribution
    used in the loss): ``teacher_entropy`` (mean entropy per image; → log K when the
    output collapses to uniform), ``teacher_marginal_entropy`` (entropy of the batch-mean
    distribution; → 0 when one dimension dominates every image) and ``center_norm``.
    """

    center: Tensor

    def __init__(
        self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last: dict[str, float] = {}

    def forward(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        student = (student_out / self.student_temp).chunk(self.ncrops)
        teacher_probs = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()
        teacher = teacher_probs.chunk(2)
        total = student_out.new_zeros(())
        n_terms = 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:  # skip the student crop the teacher saw itself
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        self.update_center(teacher_out)
        with torch.no_grad():
            self.last = {
                "teacher_entropy": float(entropy(teacher_probs).mean()),
                "teacher_marginal_entropy": float(entropy(teacher_probs.mean(0))),
                "center_norm": float(self.center.norm()),
            }
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        batch_center = teacher_out.detach().mean(0, keepdim=True)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class IBOTPatchLoss(nn.Module):
    """dinov2 ``iBOTPatchLoss`` (``softmax_center_teacher`` + ``forward_masked``): the
    student predicts, at each masked patch of a global crop, the teacher's centred and
    sharpened distribution for the same patch of the same (unmasked) crop.

    ``forward(student_out, teacher_out, masks, teacher_temp)``: ``student_out`` and
    ``teacher_out`` M×K for the M masked patches (in ``masks[masks]`` order), ``masks``
    (2·B)×P bool over every global crop. Each patch's cross-entropy is weighted by
    1 / (masked patches of its crop) and the sum divided by the number of crops, masked or
    not (upstream: ``masks_weight`` and ``/ student_masks_flat.shape[0]``; with DINOv2's
    ``loss_scales · ibot_loss_scale`` = 2 · 1/2 = 1 around it). The centre moves to the
    mean of the raw masked teacher outputs. ``last``: ``teacher_patch_entropy`` (mean
    entropy of the teacher's patch distributions used) and ``patch_center_norm``.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last: dict[str, float] = {}

    def forward(self, student_out: Tensor, teacher_out: Tensor, masks: Tensor,
                teacher_temp: float) -> Tensor:
        if len(student_out) == 0:
            self.last = {"teacher_patch_entropy": float("nan"),
                         "patch_center_norm": float(self.center.norm())}
            return student_out.new_zeros(())
        q = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()
        per_patch = torch.sum(-q * F.log_softmax(student_out / self.student_temp, dim=-1), dim=-1)
        weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
        loss = (per_patch * weights).sum() / masks.shape[0]
        with torch.no_grad():
            batch_center = teacher_out.detach().mean(0, keepdim=True)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.last = {"teacher_patch_entropy": float(entropy(q).mean()),
                         "patch_center_norm": float(self.center.norm())}
        return loss


# ----------------------------------------------------------------------------- masks


def _uniform(low: float, high: float, gen: torch.Generator) -> float:
    low, high = min(low, high), max(low, high)
    return low + (high - low) * float(torch.rand((), generator=gen))


def block_mask(
    height: int, width: int, n_masked: int, gen: torch.Generator, min_patches: int = 4,
    max_patches: int | None = None, min_aspect: float = 0.3,
) -> Tensor:
    """A height×width bool mask with about ``n_masked`` patches set, in rectangular blocks:
    dinov2 ``MaskingGenerator.__call__`` / ``_mask`` (BEiT). Each block has an area uniform
    in [``min_patches``, what is left (at most ``max_patches``)] and a log-uniform aspect in
    [``min_aspect``, 1/``min_aspect``]; a block must add new patches without overshooting
    what is left (10 tries); masking stops when a round of tries adds nothing, so the count
    can fall short, as upstream."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    max_patches = n_masked if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_patches)
        added = 0
        for _ in range(10):
            area = _uniform(min_patches, budget, gen)
            aspect = math.exp(_uniform(*log_aspect, gen))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = int(torch.randint(0, height - h + 1, (), generator=gen))
                left = int(torch.randint(0, width - w + 1, (), generator=gen))
                new = int((~mask[top : top + h, left : left + w]).sum())
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return mask


def sample_masks(
    n_crops: int, height: int, width: int, probability: float, ratio: tuple[float, float],
    gen: torch.Generator, min_patches: int = 4,
) -> Tensor:
    """Masks of ``n_crops`` global crops, n_crops×(height·width) bool, as dinov2
    ``collate_data_and_cast``: ``int(n_crops·probability)`` crops masked, the i-th of them
    with ``int(P·u)`` patches, u uniform in the i-th of equal bins over ``ratio``; the other
    crops unmasked; the list shuffled. Blocks as :func:`block_mask` with at most half the
    patches per block (dinov2 ``train.py``: ``max_num_patches=0.5·P``)."""
    n_patches = height * width
    n_masked = int(n_crops * probability)
    bins = torch.linspace(ratio[0], ratio[1], n_masked + 1).tolist()
    masks = [block_mask(height, width, int(n_patches * _uniform(bins[i], bins[i + 1], gen)), gen,
                        min_patches=min_patches, max_patches=int(0.5 * n_patches))
             for i in range(n_masked)]
    masks += [torch.zeros(height, width, dtype=torch.bool)] * (n_crops - n_masked)
    order = torch.randperm(n_crops, generator=gen).tolist()
    return torch.stack([masks[i] for i in order]).flatten(1)


# ----------------------------------------------------------------------------- schedules


def cosine_schedule(
    base_value: float, final_value: float, epochs: int, niter_per_ep: int,
    warmup_epochs: int = 0, start_warmup_value: float = 0.0,
) -> np.ndarray:
    """facebookresearch/dino ``utils.cosine_scheduler``: one value per iteration, linear
    from ``start_warmup_value`` to ``base_value`` over ``warmup_epochs`` epochs, then
    ``final + (base - final)·(1 + cos(π·i/n))/2`` over the n remaining iterations."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = (np.linspace(start_warmup_value, base_value, warmup_iters)
              if warmup_epochs > 0 else np.array([]))
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """facebookresearch/dino ``DINOLoss.teacher_temp_schedule``: one value per epoch,
    linear over the first ``warmup_epochs`` (np.linspace, both ends included), then
    constant."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
        np.ones(epochs - warmup_epochs) * teacher_temp,
    ))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1-m)·θ_s over matching parameters (upstream ``train_one_epoch``)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def clip_gradients(parameters: Iterable[nn.Parameter], clip: float) -> list[float]:
    """facebookresearch/dino ``utils.clip_gradients``: each parameter's gradient scaled to
    norm ``clip`` when it is larger (per parameter, not global); returns the norms."""
    norms = []
    for p in parameters:
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(float(norm))
        coef = clip / (norm + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms


# ----------------------------------------------------------------------------- multi-crop


def _crop_boxes(
    n: int, scale: tuple[float, float], gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """n boxes (cx, cy, w, h) in normalised coordinates ([-1, 1] centre, width/height as a
    fraction of the side), torchvision RandomResizedCrop's area/aspect sampling with the
    width and height clipped to the image (instead of its 10 retries)."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    return torch.stack([cx, cy, w, h], 1)


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """B×3×H×W float images, B boxes (cx, cy, w, h) -> B×3×size×size, bilinear.

    The affine map has positive diagonal entries only: no flip, no rotation."""
    cx, cy, w, h = boxes.unbind(1)
    zeros = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zeros, cx], 1), torch.stack([zeros, h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), [len(images), 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(
    x: Tensor, brightness: float, contrast: float, saturation: float, prob: float,
    gen: torch.Generator,
) -> Tensor:
    """Hue-preserving jitter of B×3×H×W images in [0, 1], each image with probability
    ``prob``: brightness ``x·f``, contrast ``f·x + (1-f)·mean grey``, saturation
    ``f·x + (1-f)·grey(x)`` (per pixel), factors uniform in [1-s, 1+s] (torchvision's
    ColorJitter ranges) in that order. Each step is ``a·x + b`` with ``a > 0`` and the same
    ``b`` for R, G and B, so hue is unchanged; no clamping, which would change it."""
    n = len(x)
    apply = (torch.rand(n, generator=gen) < prob).to(x.dtype)[:, None, None, None]

    def factor(s: float) -> Tensor:
        f = torch.empty(n).uniform_(1 - s, 1 + s, generator=gen).to(x.dtype)[:, None, None, None]
        return 1 + apply * (f - 1)

    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)[None, :, None, None]
    x = x * factor(brightness)
    grey_mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    f = factor(contrast)
    x = f * x + (1 - f) * grey_mean
    f = factor(saturation)
    x = f * x + (1 - f) * (x * weights).sum(1, keepdim=True)
    return x


def gaussian_blur(
    x: Tensor, prob: float, sigma: tuple[float, float], gen: torch.Generator
) -> Tensor:
    """Separable Gaussian blur of B×3×H×W images, each with probability ``prob`` and its
    own sigma uniform in ``sigma`` (pixels), reflect padding; kernel radius ceil(3·σmax)."""
    n, c, height, width = x.shape
    if prob <= 0 or sigma[1] <= 0:
        return x
    apply = torch.rand(n, generator=gen) < prob
    s = torch.empty(n).uniform_(sigma[0], sigma[1], generator=gen).clamp_min(1e-3)
    radius = min(max(1, math.ceil(3 * sigma[1])), min(height, width) // 2 - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None].to(x.dtype) ** 2))
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype)[None].expand(n, -1)
    k = torch.where(apply[:, None], k, delta)  # B×(2r+1)
    k = k.repeat_interleave(c, 0)  # (B·3)×(2r+1)
    y = x.reshape(1, n * c, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, height, width)


class MultiCrop:
    """Batched ``DataAugmentationDINO``: ``__call__(images, gen)`` takes B×3×H×W float
    images in [0, 1] and returns the crops (not normalised) in upstream order: global 1
    (blur p=blur_prob[0]), global 2 (blur_prob[1]), then the local crops (blur_prob[2]),
    each B×3×S×S. Every crop gets its own random-resized box and colour jitter; no flip,
    no hue jitter, no grayscale, no solarisation (see the module docstring)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def _view(self, images: Tensor, size: int, scale: tuple[float, float], blur_p: float,
              gen: torch.Generator) -> Tensor:
        cfg = self.cfg
        boxes = _crop_boxes(len(images), scale, gen)
        x = resized_crops(images, boxes, size)
        x = colour_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.jitter_prob, gen)
        return gaussian_blur(x, blur_p, cfg.blur_sigma, gen)

    def __call__(self, images: Tensor, gen: torch.Generator) -> list[Tensor]:
        cfg = self.cfg
        crops = [
            self._view(images, cfg.global_crop_size, cfg.global_crops_scale, cfg.blur_prob[0], gen),
            self._view(images, cfg.global_crop_size, cfg.global_crops_scale, cfg.blur_prob[1], gen),
        ]
        if cfg.local_crops_number:
            # all local crops of the batch in one call, then split crop-major
            many = images.repeat(cfg.local_crops_number, 1, 1, 1)
            local = self._view(many, cfg.local_crop_size, cfg.local_crops_scale, cfg.blur_prob[2], gen)
            crops += list(local.chunk(cfg.local_crops_number))
        return crops

"""The knobs of DINO self-supervised pretraining of the demo backbone (the ``pretrain:``
params section, the ``pretrain`` stage). Import-light: dataclasses and typing only.

Defaults follow facebookresearch/dino ``main_dino.py`` (``get_args_parser``) where they
carry over to a 4-block, 192-d ViT on 112-pixel images and a few minutes of two CPU cores;
every departure is marked "official:" with the upstream value and the reason.
"""

from __future__ import annotations

import dataclasses

# How every output names the backbone the pretrain stage writes (saved in the checkpoint's
# safetensors metadata as ``description``; dinoalign.config.describe_backbone reads it).
DESCRIPTION = "tiny self-supervised (demo)"


def _range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"pretrain.{name} must be two numbers lo <= hi in [{low}, {high}], got {value!r}")
    return pair  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """DINO pretraining of the demo ViT (student + EMA teacher, multi-crop).

    Data: ``pool_size`` unlabelled images (the demo world's train stream, never test).
    Optimisation (per iteration, cosine schedules as ``utils.cosine_scheduler``): AdamW,
    ``lr`` after ``warmup_epochs`` of linear warm-up, down to ``min_lr``; weight decay
    ``weight_decay`` -> ``weight_decay_end``; per-parameter gradient clipping at
    ``clip_grad`` (0: off); the head's last layer frozen for ``freeze_last_layer`` epochs.
    Head (``DINOHead``): ``out_dim`` K prototypes, ``head_hidden_dim``,
    ``head_bottleneck_dim``, ``norm_last_layer``. Loss (``DINOLoss``): ``student_temp``;
    teacher temperature linear from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs; centre EMA ``center_momentum``. Teacher EMA
    momentum cosine from ``momentum_teacher`` to 1.
    Multi-crop (``DataAugmentationDINO``): 2 global crops of ``global_crop_size`` px from
    ``global_crops_scale`` of the image area, ``local_crops_number`` local crops of
    ``local_crop_size`` px from ``local_crops_scale``; crop sizes must be multiples of the
    patch size (14). Photometric: brightness/contrast/saturation jitter (never hue) with
    probability ``jitter_prob``; Gaussian blur with probability ``blur_prob`` (global 1,
    global 2, local) and sigma in ``blur_sigma`` pixels. No flips, no grayscale, no
    solarisation (see :mod:`dinoalign.pretrain.dino`).
    iBOT (DINOv2's masked-patch term, ``ibot:`` of dinov2's ``ssl_default_config.yaml``):
    ``ibot_loss_weight`` (0: DINO alone) times the masked-patch loss is added to the DINO
    loss; ``mask_probability`` of the global crops are masked, with ratios spread over
    ``mask_ratio``, in blocks of at least ``mask_min_patches`` patches; the head is shared
    with the CLS (upstream ``separate_head: false``).
    Stage only: ``enabled`` (the demo; real profiles load DINOv2 weights instead) and
    ``probe_images`` (held-out images of the attention and k-NN probes).
    """

    enabled: bool = True
    # demo: ~320 steps of 32 images, ~3 min on 2 CPU cores (benchmarks/pretrain_probe.py)
    pool_size: int = 1024
    epochs: int = 10
    batch_size: int = 32  # official: 64 per GPU × 16; more, smaller steps fit a CPU budget
    # official: 5e-4 at batch 256 (linear scaling), 10 warm-up epochs of 100: a few hundred
    # steps on a tiny ViT need a larger step and a short warm-up (2e-3 collapsed partly)
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: int = 1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    # official: K = 65536, hidden 2048, bottleneck 256 (ImageNet's 1.3M images); the demo
    # world has 30 compositions × 9 cells × 2 sizes, and the head dominates the CPU cost
    out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    norm_last_layer: bool = True
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    # official: 0.996 over ~125k steps. Over ~300 steps 0.99 leaves the saved teacher ~60 %
    # random init (Π m ≈ e^-0.5) and measured no gain; 0.95 gives it an ~20-step window
    momentum_teacher: float = 0.95
    # official: 224 global, 8 × 96 local at 224 (3/7 of the side). The demo images are
    # 112: 84-px global crops (6×6 patches) and 42-px local ones (3×3) cost 2.4x less than
    # 112/56 per crop; global scale from 0.25 (official 0.4) since few local crops remain
    global_crop_size: int = 84
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_number: int = 2  # official: 8
    local_crop_size: int = 42
    local_crops_scale: tuple[float, float] = (0.05, 0.25)  # official: (0.05, 0.4)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    jitter_prob: float = 0.8
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.05, 1.0)  # official: (0.1, 2.0) px at 224
    # DINOv2 adds iBOT's masked-patch self-distillation to DINO (dinov2 ssl_default_config:
    # ibot.loss_weight 1.0, mask_sample_probability 0.5, mask_ratio_min_max [0.1, 0.5]); it
    # is what trains the patch tokens, which the dense recipes read. 0 turns it off.
    ibot_loss_weight: float = 0.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_min_patches: int = 4  # upstream MaskingGenerator's min_num_patches
    seed: int = 0
    threads: int = 2
    # the pretrain stage's probes (dinoalign.pretrain.probe): single-object test images for
    # the attention probe and k-NN queries, as many val images as k-NN references
    probe_images: int = 300

    def __post_init__(self) -> None:
        for name in ("pool_size", "epochs", "batch_size", "out_dim", "head_hidden_dim",
                     "head_bottleneck_dim", "global_crop_size", "local_crop_size", "threads",
                     "probe_images", "mask_min_patches"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "freeze_last_layer", "warmup_teacher_temp_epochs",
                     "local_crops_number", "clip_grad", "weight_decay", "weight_decay_end",
                     "brightness", "contrast", "saturation", "seed", "ibot_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"pretrain.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size > self.pool_size:
            raise ValueError(
                f"pretrain.batch_size ({self.batch_size}) exceeds pretrain.pool_size "
                f"({self.pool_size}): an epoch would have no full batch"
            )
        if self.warmup_epochs > self.epochs or self.warmup_teacher_temp_epochs > self.epochs:
            raise ValueError(
                f"pretrain.warmup_epochs ({self.warmup_epochs}) and warmup_teacher_temp_epochs "
                f"({self.warmup_teacher_temp_epochs}) must be <= epochs ({self.epochs})"
            )
        for name in ("lr", "student_temp", "teacher_temp", "warmup_teacher_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pretrain.{name} must be > 0, got {getattr(self, name)}")
        for name in ("momentum_teacher", "center_momentum", "jitter_prob", "mask_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"pretrain.{name} must be in [0, 1], got {getattr(self, name)}")
        if max(self.brightness, self.contrast, self.saturation) >= 1:
            raise ValueError("pretrain.brightness, contrast and saturation must be < 1 "
                             "(a factor 1 - x <= 0 would invert or erase colours)")
        object.__setattr__(self, "global_crops_scale",
                           _range("global_crops_scale", self.global_crops_scale, 1e-4, 1.0))
        object.__setattr__(self, "local_crops_scale",
                           _range("local_crops_scale", self.local_crops_scale, 1e-4, 1.0))
        object.__setattr__(self, "mask_ratio", _range("mask_ratio", self.mask_ratio, 0.0, 1.0))
        if self.ibot_loss_weight > 0 and int(2 * self.batch_size * self.mask_probability) < 1:
            raise ValueError(
                f"pretrain.ibot_loss_weight > 0 needs masked crops: int(2 · batch_size · mask_probability) = "
                f"int(2 · {self.batch_size} · {self.mask_probability}) is 0, so no crop would ever be masked")
        object.__setattr__(self, "blur_sigma", _range("blur_sigma", self.blur_sigma, 0.0, 50.0))
        blur = tuple(float(p) for p in self.blur_prob)
        if len(blur) != 3 or not all(0 <= p <= 1 for p in blur):
            raise ValueError(f"pretrain.blur_prob must be 3 probabilities (global 1, global 2, "
                             f"local), got {self.blur_prob!r}")
        object.__setattr__(self, "blur_prob", blur)

    @property
    def n_crops(self) -> int:
        """Crops per image: the 2 global ones and the local ones."""
        return 2 + self.local_crops_number

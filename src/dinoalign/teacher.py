"""The demo's CLIP teacher: a tiny open_clip CLIP trained from scratch on the demo world.

talk2dino embeds captions with a frozen, already aligned CLIP text tower, and the
projector regresses onto CLIP's image tower. No pretrained CLIP can be downloaded on an
offline machine and a random-init CLIP is not aligned, so the demo profile trains one
(open_clip's own ``CLIP`` class and ``ClipLoss``) and saves it as a regular open_clip
``local-dir:`` checkpoint (``open_clip_config.json`` + ``open_clip_model.safetensors``).
``embed`` and ``evaluate`` load it exactly as they would load ``ViT-B-16`` / ``openai``.
Real profiles set ``teacher.enabled: false`` and name a real CLIP in ``clip``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from dinoalign.backbones.text import to_clip_input
from dinoalign.config import TeacherConfig
from dinoalign.data.images import load_image, resize_crop
from dinoalign.data.prepare import read_pairs
from dinoalign.errors import DataError
from dinoalign.evaluate.retrieval import retrieval_metrics
from dinoalign.storage import under_root, write_atomic

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_DIR = "model"


def model_cfg(cfg: TeacherConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of the teacher (the layout of open_clip's JSON configs)."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "patch_size": cfg.patch_size,
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": cfg.text_context,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def preprocess_cfg(cfg: TeacherConfig) -> dict[str, Any]:
    """The teacher's open_clip ``preprocess_cfg`` (saved with it, so every loader of the
    checkpoint reads it back): OpenAI CLIP's mean/std, bicubic, shortest-side resize."""
    return {
        "size": cfg.image_size,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def train_teacher(
    images: np.ndarray,
    captions: list[list[str]],
    cfg: TeacherConfig,
    seed: int,
    log: Any = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Train the tiny CLIP on uint8 images N×H×W×3 with their caption lists.

    One random caption per image per epoch. AdamW, linear warmup then cosine.
    Returns (model in eval mode, per-epoch curve rows).
    """
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(seed)
    mc = model_cfg(cfg)
    model = CLIP(mc["embed_dim"], CLIPVisionCfg(**mc["vision_cfg"]), CLIPTextCfg(**mc["text_cfg"]))
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=cfg.text_context)
    pixels = to_clip_input(images, preprocess_cfg(cfg))
    loss_fn = open_clip.ClipLoss()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    n = len(images)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))

    curve: list[dict[str, float]] = []
    step = 0
    model.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            img_f, txt_f, scale = model(pixels[idx], tokenizer(texts))
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        row = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(losses)),
            "samples_per_s": steps_per_epoch * cfg.batch_size / (time.perf_counter() - t0),
        }
        curve.append(row)
        if log:
            log(row)
    model.eval()
    return model, curve


def save_teacher(model: Any, cfg: TeacherConfig, out_dir: Path) -> Path:
    """Write an open_clip ``local-dir:`` checkpoint; returns the model folder."""
    d = out_dir / MODEL_DIR
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg(cfg),
        "preprocess_cfg": preprocess_cfg(cfg),
    }
    write_atomic(d / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "open_clip_model.safetensors"))
    return d


@torch.no_grad()
def encode_clip(
    model: Any, tokenizer: Any, images: np.ndarray | None, texts: list[str] | None,
    preprocess: Mapping[str, Any], batch_size: int = 256,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Normalised CLIP image (N×E) and text (M×E) embeddings with any open_clip model,
    images through :func:`to_clip_input` with the model's ``preprocess`` config."""
    img = txt = None
    if images is not None:
        img = torch.cat(
            [model.encode_image(to_clip_input(images[i : i + batch_size], preprocess), normalize=True)
             for i in range(0, len(images), batch_size)]
        ) if len(images) else torch.zeros(0, 1)
    if texts is not None:
        txt = torch.cat(
            [model.encode_text(tokenizer(texts[i : i + batch_size]), normalize=True)
             for i in range(0, len(texts), batch_size)]
        ) if texts else torch.zeros(0, 1)
    return img, txt


def load_split_images(
    manifest: Any, split: str, size: int, limits: dict[str, Any], root: Path | None = None
) -> tuple[np.ndarray, list[list[str]], list[str]]:
    """uint8 images N×size×size×3, caption lists and uids of one split of a pairs manifest
    (already validated by prepare, so a decode failure here is a real error); repo-relative
    image paths are read from the checkout ``root`` (else from the working directory)."""
    rows = [r for r in manifest.to_pylist() if r["split"] == split]
    if not rows:
        raise DataError(f"the pairs manifest has no {split!r} split: the teacher needs one")
    images = np.stack([
        resize_crop(load_image(r["image_uri"] if root is None else under_root(r["image_uri"], root), **limits),
                    size, "bicubic")
        for r in rows
    ])
    return images, [r["captions"] for r in rows], [r["uid"] for r in rows]


def run_teacher(
    cfg: TeacherConfig, pairs_dir: Path, limits: dict[str, Any], seed: int, out: Path, log: Any = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Train the teacher on the train split of the pairs in ``pairs_dir`` (images read
    within ``limits``), save it with its curve to ``out`` and return its test-split
    retrieval metrics (also in ``out/metrics.json``)."""
    manifest = read_pairs(pairs_dir)
    kw = dict(size=cfg.image_size, limits=limits, root=root)
    train_images, train_caps, _ = load_split_images(manifest, "train", **kw)
    model, curve = train_teacher(train_images, train_caps, cfg, seed, log=log)
    save_teacher(model, cfg, out)
    write_atomic(out / "curve.csv", "epoch,step,loss,samples_per_s\n" + "".join(
        f"{r['epoch']},{r['step']},{r['loss']:.6f},{r['samples_per_s']:.2f}\n" for r in curve))

    test_images, test_caps, _ = load_split_images(manifest, "test", **kw)
    texts = [c for caps in test_caps for c in caps]
    owner = [i for i, caps in enumerate(test_caps) for _ in caps]
    img, txt = encode_clip(model, open_clip.get_tokenizer("ViT-B-16", context_length=cfg.text_context), test_images, texts, preprocess_cfg(cfg))
    metrics = retrieval_metrics(img, txt, owner)
    metrics.update({"train_images": len(train_images), "test_images": len(test_images),
                    "final_loss": curve[-1]["loss"], "model_dir": str(out / MODEL_DIR)})
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics

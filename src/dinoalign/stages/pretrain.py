"""The pretrain stage (demo profile): DINO-pretrain the demo's tiny ViT on unlabelled
images of the synthetic world; real profiles set ``pretrain.enabled=false`` and load
DINOv2/DINOv3 weights through ``backbone.weights``.

    dvc repro pretrain
    dinoalign pretrain [section.key=value ...]     # = python stages/pretrain.py

Renders ``pretrain.pool_size`` images of the demo world's train stream (never a test
image), trains the ViT of ``backbone`` (name, image size, model_kwargs; from its seeded
random init) with DINO self-distillation (:mod:`dinoalign.pretrain`) and writes
``paths.pretrained``: ``model.safetensors`` (timm keys, "tiny self-supervised (demo)" as
its ``description``: the file the demo's ``backbone.weights`` names), ``curve.csv`` (one
row per epoch: loss and the collapse monitors) and ``metrics.json`` (the final epoch and
the probes of :mod:`dinoalign.pretrain.probe` on held-out single-object test images: CLS
attention mass inside the object and k-NN top-1, pretrained vs the same random init).
Disabled, it writes only ``metrics.json`` saying so.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import mlflow
import torch

from dinoalign.backbones.dinov2 import build_backbone_from
from dinoalign.config import BackboneConfig, Params, describe_backbone, flatten, patch_size_of
from dinoalign.errors import ConfigError
from dinoalign.pretrain.probe import compare_backbones
from dinoalign.pretrain.train import CHECKPOINT, demo_pool, pretrain
from dinoalign.storage import atomic_path, under_root, write_atomic
from dinoalign.tracking import run_url, stage_run

CURVE_FILE, METRICS_FILE = "curve.csv", "metrics.json"
CURVE_COLUMNS = ("epoch", "step", "loss", "teacher_entropy", "teacher_marginal_entropy", "center_norm",
                 "teacher_temp", "lr", "momentum", "crops_per_s", "seconds")
EPOCH_METRICS = ("loss", "teacher_entropy", "teacher_marginal_entropy", "center_norm", "teacher_temp", "lr",
                 "crops_per_s")
# with pretrain.ibot_loss_weight > 0: the two terms and the patch-side collapse monitors
IBOT_COLUMNS = ("dino_loss", "ibot_loss", "teacher_patch_entropy", "patch_center_norm")
DEMO_SOURCE = "synthetic"


def run(params: Params, root: Path) -> dict[str, Any]:
    cfg = params.pretrain
    out = Path(under_root(params.paths.pretrained, root))
    if not cfg.enabled:
        out.mkdir(parents=True, exist_ok=True)
        note = {"skipped": True,
                "reason": "pretrain.enabled=false: the backbone loads its own weights (backbone.weights or "
                          "backbone.pretrained)",
                "backbone": params.backbone.name}
        write_atomic(out / METRICS_FILE, json.dumps(note, indent=2) + "\n")
        print(f"pretrain: skipped ({note['reason']}: {params.backbone.name})")
        return note
    if params.data.source != DEMO_SOURCE:
        raise ConfigError(
            "pretrain is demo-only; set pretrain.enabled=false and point backbone.weights at DINOv2 weights "
            f"(data.source is {params.data.source!r}, not {DEMO_SOURCE!r})"
        )
    world = params.data.synthetic
    # the ViT of the backbone section from its seeded random init: never the weights file,
    # which is this stage's own output in the demo
    backbone = BackboneConfig(name=params.backbone.name, img_size=params.backbone.img_size,
                              model_kwargs=params.backbone.model_kwargs)
    patch = patch_size_of(backbone)
    if patch and world.image_size % patch:
        raise ConfigError(
            f"data.synthetic.image_size={world.image_size} is not a multiple of the patch size {patch} of "
            f"{backbone.name}: the pretrain probes feed whole demo images to the backbone"
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    with stage_run("pretrain", params) as run:
        t0 = time.perf_counter()
        images = demo_pool(world, cfg.pool_size)
        render_s = time.perf_counter() - t0
        log_k = math.log(cfg.out_dim)  # the teacher entropy of a collapse to uniform

        def log(row: dict[str, float]) -> None:
            ratio = row["teacher_entropy"] / log_k
            terms = (f" (DINO {row['dino_loss']:.3f} + iBOT {row['ibot_loss']:.3f})" if "ibot_loss" in row else "")
            patches = (f", patches {row['teacher_patch_entropy'] / log_k:.2f}" if "ibot_loss" in row else "")
            print(f"pretrain: epoch {int(row['epoch']) + 1}/{cfg.epochs} loss {row['loss']:.3f}{terms}, teacher "
                  f"entropy {row['teacher_entropy']:.2f} / log K {log_k:.2f} ({ratio:.2f}{patches}), centre norm "
                  f"{row['center_norm']:.2f}, {row['crops_per_s']:.0f} crops/s", flush=True)
            mlflow.log_metrics({**{k: float(row[k]) for k in EPOCH_METRICS + IBOT_COLUMNS if k in row},
                                "teacher_entropy_over_log_k": ratio}, step=int(row["epoch"]))

        method = "DINO + iBOT" if cfg.ibot_loss_weight > 0 else "DINO"
        print(f"pretrain: {method} on {len(images)} unlabelled demo images ({cfg.epochs} epochs of "
              f"{len(images) // cfg.batch_size} steps, {cfg.n_crops} crops each) -> {out}", flush=True)
        t0 = time.perf_counter()
        result = pretrain(backbone, cfg, images, out_dir=out, log=log)
        train_s = time.perf_counter() - t0
        _write_curve(result.curve, out / CURVE_FILE)

        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:  # the file as the pipeline loads it, and the random init it started from
            pretrained = build_backbone_from(
                BackboneConfig(name=backbone.name, weights=str(out / CHECKPOINT), img_size=backbone.img_size,
                               model_kwargs=backbone.model_kwargs), cfg.seed)
            random_init = build_backbone_from(backbone, cfg.seed)
            probe = compare_backbones(pretrained, random_init, world, cfg.probe_images)
        finally:
            torch.set_num_threads(threads)
        probe_s = time.perf_counter() - t0

        last = result.curve[-1]
        metrics: dict[str, Any] = {
            "backbone": {"name": backbone.name, "img_size": backbone.img_size,
                         "model_kwargs": dict(backbone.model_kwargs),
                         "description": describe_backbone(BackboneConfig(weights=str(out / CHECKPOINT)))},
            "checkpoint": CHECKPOINT,
            "pool": {"split": "train", "images": len(images), "image_size": world.image_size},
            "epochs": cfg.epochs,
            "steps": int(last["step"]),
            "final": {
                "loss": last["loss"],
                "teacher_entropy": last["teacher_entropy"],
                "log_k": result.log_k,
                "teacher_entropy_over_log_k": last["teacher_entropy"] / result.log_k,
                "teacher_marginal_entropy": last["teacher_marginal_entropy"],
                "center_norm": last["center_norm"],
                "crops_per_s": last["crops_per_s"],
                **{k: last[k] for k in IBOT_COLUMNS if k in last},
            },
            "probe": probe,
            "seconds": {"render": render_s, "pretrain": train_s, "probe": probe_s},
        }
        metrics["seconds"]["total"] = time.perf_counter() - started
        write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        mlflow.set_tag("dinoalign.backbone", metrics["backbone"]["description"])
        mlflow.log_metrics(_numbers({k: metrics[k] for k in ("final", "probe", "seconds")}))
        mlflow.log_artifact(str(out / CURVE_FILE))
        mlflow.log_artifact(str(out / METRICS_FILE))
        metrics["mlflow_run"] = run_url(run)

    print(_summary_line(metrics, out) + f"\npretrain: MLflow run {metrics['mlflow_run']}")
    return metrics


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``metrics`` as MLflow metrics (``probe.knn.class.pretrained``), the
    probe's settings (k-NN k and temperature) left out."""
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith((".k", ".temperature"))}


def _write_curve(curve: list[dict[str, float]], path: Path) -> None:
    """One row per epoch (the DVC plot: x epoch, y loss and teacher_entropy); with iBOT also
    its two loss terms and the patch-side monitors."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        columns = CURVE_COLUMNS + tuple(k for k in IBOT_COLUMNS if curve and k in curve[0])
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in curve:
            writer.writerow({k: (int(row[k]) if k in ("epoch", "step") else f"{row[k]:.6g}") for k in columns})


def _summary_line(metrics: dict[str, Any], out: Path) -> str:
    """The probes in one line: attention in the object (the val-selected head / mean of
    heads, pretrained vs random init vs the area share, paired permutation p) and k-NN."""
    final, attn, knn = metrics["final"], metrics["probe"]["attention"], metrics["probe"]["knn"]
    head, heads = attn["selected_head"], attn["mean_of_heads"]
    knn_text = ", ".join(
        f"{name} {knn[name]['pretrained']:.3f} (random init {knn[name]['random_init']:.3f}, "
        f"majority {knn[name]['majority']:.3f})" for name in ("class", "colour", "background")
    )
    return (
        f"pretrain: final loss {final['loss']:.3f}, teacher entropy {final['teacher_entropy_over_log_k']:.2f} of "
        f"log K; on {attn['images']} held-out test images the CLS attention in the object is "
        f"{head['pretrained']:.3f} best head (chosen on val) / {heads['pretrained']:.3f} mean of heads "
        f"(random init {head['random_init']:.3f} / {heads['random_init']:.3f}, area share "
        f"{attn['area_share']:.3f}; paired permutation p {head['permutation_p']:.2g} / "
        f"{heads['permutation_p']:.2g}, pretrained ahead on {head['wins']}/{head['n']} images); "
        f"k-NN top-1 {knn_text} -> {out / CHECKPOINT} "
        f"({metrics['backbone']['description']})"
    )

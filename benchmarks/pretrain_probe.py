"""Does DINO pretraining make the demo backbone self-supervised in fact?

    python benchmarks/pretrain_probe.py                          # the recommended settings
    python benchmarks/pretrain_probe.py --pool 512 --epochs 4 --out /tmp/probe.json

1. Renders an unlabelled pool from the demo world's train stream (never test images) and
   DINO-pretrains the demo backbone (params.yaml ``backbone``: the 4-block 192-d
   ``vit_small_patch14_reg4_dinov2`` at 112 px) with :func:`dinoalign.pretrain.train.pretrain`,
   writing ``model.safetensors``; the probed model is that file loaded through
   ``build_backbone(weights=...)``, the path the pipeline takes.
2. On held-out single-object test images (masks from the generator) it reports the share
   of the last block's CLS->patch attention inside the object mask, for the best head and
   the mean over heads, pretrained vs the random init it started from vs the object's area
   share, with a one-sided sign test over images (best head of each model);
3. k-NN top-1 (DINO's ``eval_knn``: k = 20, T = 0.07) on CLS features by composition
   (the class), and, to see what the CLS encodes instead, by object colour and by
   background kind: references single-object val images, queries single-object test
   images of seen compositions.

Prints a table and writes ``--out`` (JSON: settings, curve, metrics, wall times).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoalign.backbones import build_backbone
from dinoalign.config import load_params
from dinoalign.data.config import SyntheticWorldConfig
from dinoalign.pretrain.config import PretrainConfig
from dinoalign.pretrain.probe import (
    attention_report,
    features,
    knn_top1,
    probe_images,
    sign_test_p,
)
from dinoalign.pretrain.train import demo_pool, pretrain

# the demo backbone's architecture as params.yaml configures it, from its random init
# (params.yaml's backbone.weights names the pretrain stage's output, which this replaces)
DEMO_BACKBONE = dataclasses.replace(
    load_params(Path(__file__).resolve().parents[1] / "params.yaml").backbone, weights=None, pretrained=False
)


def _args() -> argparse.Namespace:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=d.pool_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--momentum", type=float, default=d.momentum_teacher)
    p.add_argument("--out-dim", type=int, default=d.out_dim)
    p.add_argument("--teacher-temp", type=float, default=d.teacher_temp)
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=d.warmup_teacher_temp_epochs)
    p.add_argument("--global-size", type=int, default=d.global_crop_size)
    p.add_argument("--global-scale", type=float, nargs=2, default=d.global_crops_scale)
    p.add_argument("--locals", type=int, default=d.local_crops_number)
    p.add_argument("--local-size", type=int, default=d.local_crop_size)
    p.add_argument("--local-scale", type=float, nargs=2, default=d.local_crops_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--image-size", type=int, default=112, help="demo world image size")
    p.add_argument("--n-attn", type=int, default=300, help="single-object test images for attention")
    p.add_argument("--n-knn", type=int, default=300, help="k-NN references (val) and queries (test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def _probe(backbone: Any, attn_set: Any, ref: Any, query: Any) -> dict[str, Any]:
    report = attention_report(backbone, attn_set.images, attn_set.masks)
    ref_cls, _ = features(backbone, ref.images)
    q_cls, _ = features(backbone, query.images)
    for name in ("labels", "colours", "backgrounds"):
        report[f"knn_{name}"] = knn_top1(ref_cls, getattr(ref, name), q_cls, getattr(query, name))
    report["knn_top1"] = report.pop("knn_labels")
    return report


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    cfg = PretrainConfig(
        pool_size=a.pool, epochs=a.epochs, batch_size=a.batch, lr=a.lr,
        warmup_epochs=a.warmup_epochs, momentum_teacher=a.momentum, out_dim=a.out_dim,
        teacher_temp=a.teacher_temp, warmup_teacher_temp_epochs=a.warmup_teacher_temp_epochs,
        global_crop_size=a.global_size, global_crops_scale=tuple(a.global_scale),
        local_crops_number=a.locals, local_crop_size=a.local_size,
        local_crops_scale=tuple(a.local_scale), seed=a.seed, threads=a.threads,
    )
    world = SyntheticWorldConfig(image_size=a.image_size)
    backbone_cfg = dataclasses.replace(DEMO_BACKBONE, img_size=a.image_size)
    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    pool = demo_pool(world, cfg.pool_size)
    render_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = pretrain(backbone_cfg, cfg, pool, out_dir=Path(tmp), log=lambda r: print(
            f"epoch {r['epoch']:3d} loss {r['loss']:.3f} H(teacher) {r['teacher_entropy']:.2f} "
            f"H(mean) {r['teacher_marginal_entropy']:.2f} |c| {r['center_norm']:.2f} "
            f"{r['crops_per_s']:.0f} crops/s", flush=True))
        train_s = time.perf_counter() - t0
        kw = {"img_size": backbone_cfg.img_size, "model_kwargs": backbone_cfg.model_kwargs}
        pretrained = build_backbone(backbone_cfg.name, weights=str(result.checkpoint), **kw)
    torch.manual_seed(cfg.seed)  # the random init the student started from
    random_init = build_backbone(backbone_cfg.name, **kw)

    t0 = time.perf_counter()
    attn_set = probe_images(world, "test", a.n_attn)
    ref = probe_images(world, "val", a.n_knn)
    query = probe_images(world, "test", a.n_knn, seen_only=True)
    rows = {"random init": _probe(random_init, attn_set, ref, query),
            "pretrained": _probe(pretrained, attn_set, ref, query)}
    probe_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - wall0

    rnd, pre = rows["random init"], rows["pretrained"]
    best_r = rnd["per_image"][:, rnd["best_head"]]
    best_p = pre["per_image"][:, pre["best_head"]]
    wins, n = int((best_p > best_r).sum()), len(best_p)
    area = pre["area"]
    print(f"\n{'backbone':<13} {'attn best head':>15} {'attn mean heads':>16} {'area share':>11} "
          f"{'best/area':>10} {'best > area':>12} {'kNN top-1':>10} {'kNN colour':>11} "
          f"{'kNN backgr.':>12}")
    for name, r in rows.items():
        print(f"{name:<13} {r['best']:>15.3f} {r['mean_heads']:>16.3f} {area:>11.3f} "
              f"{r['best'] / area:>10.2f} {r['best_above_area']:>12.2f} {r['knn_top1']:>10.3f} "
              f"{r['knn_colours']:>11.3f} {r['knn_backgrounds']:>12.3f}")
    p_value = sign_test_p(wins, n)
    print(f"\nbest head pretrained > random on {wins}/{n} images (sign test p = {p_value:.2g}); "
          f"kNN chance (majority class of the queries): composition "
          f"{np.bincount(query.labels).max() / len(query.labels):.3f}, colour "
          f"{np.bincount(query.colours).max() / len(query.labels):.3f}, background "
          f"{np.bincount(query.backgrounds).max() / len(query.labels):.3f}")
    print(f"render {render_s:.1f} s, pretrain {train_s:.1f} s "
          f"({result.curve[-1]['crops_per_s']:.0f} crops/s), probe {probe_s:.1f} s, "
          f"wall {wall_s:.1f} s")

    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "settings": dataclasses.asdict(cfg), "image_size": a.image_size,
            "machine": {"cpus": os.cpu_count(), "threads": a.threads, "python": platform.python_version(),
                        "torch": torch.__version__},
            "curve": result.curve,
            "metrics": {name: {k: v for k, v in r.items() if k not in ("per_image", "area_per_image")}
                        for name, r in rows.items()},
            "sign_test": {"wins": wins, "n": n, "p": p_value},
            "seconds": {"render": render_s, "pretrain": train_s, "probe": probe_s, "wall": wall_s},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()

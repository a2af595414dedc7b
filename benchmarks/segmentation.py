"""Throughput of open-vocabulary segmentation inference on this machine.

    python benchmarks/segmentation.py                  # demo and paper shapes (a few minutes)
    python benchmarks/segmentation.py --shapes demo    # the demo shape only (seconds)

1. The sliding-window evaluator (``dinoalign.evaluate.segmentation.segment`` with a
   talk2dino ``logits_fn``: backbone forward on every window, background cleaning,
   sigmoid maps, merge, resize, background threshold, argmax), images/s without and with
   PAMR (10 iterations, dilations 1, 2, 4, 8, 12, 24):
   - ``demo``: the demo backbone (ViT 192-d, depth 4, 6 heads, 4 registers) on 112×112
     images, one 112 window, 30 classes;
   - ``paper``: a ViT-B/14-reg-shaped backbone (768-d, 12 blocks, 12 heads, random init:
     the speed does not depend on the weights) on 448×597 images, short side 448, crop
     448, stride 224 (2 windows), 20 classes (VOC).
2. Talk2DINO background cleaning for a batch of images in one call vs one image at a
   time (the paper shape: 1024 patches, 12 heads, 768-d, 20 classes).

Ratios are against the baseline measured in the same process (without PAMR; one image at
a time). Results go to ``--out`` (default ``docs/benchmarks/segmentation-<cpus>cpu-fp32-
torch<version>.json``: the file name says the hardware, precision and torch version).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dinoalign.config import load_params
from dinoalign.model import AlignedModel
from dinoalign.evaluate.segmentation import SegmentationConfig, segment
from dinoalign.recipes import Talk2DINOConfig, background_cleaning, build

SHAPES: dict[str, dict[str, Any]] = {
    "demo": {
        "backbone": "{embed_dim: 192, depth: 4, num_heads: 6}",
        "image": (112, 112),
        "segmentation": SegmentationConfig(short_side=112, crop=112, stride=56, bg_threshold=0.55),
        "classes": 30,
        "images": 8,
    },
    "paper": {
        "backbone": "{embed_dim: 768, depth: 12, num_heads: 12}",
        "image": (448, 597),
        "segmentation": SegmentationConfig(
            short_side=448, max_long_side=2048, crop=448, stride=224, bg_threshold=0.55
        ),
        "classes": 20,
        "images": 2,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["demo", "paper"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions (the median is kept)"
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="images per background-cleaning batch"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results file (default: docs/benchmarks/segmentation-<cpus>cpu-fp32-torch<version>.json)",
    )
    return parser.parse_args(argv)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def talk2dino_model(shape: dict[str, Any], root: Path) -> AlignedModel:
    """A random-init talk2dino on a random-init backbone of the given shape."""
    size = shape["segmentation"].crop  # the window the backbone sees
    params = load_params(
        root / "no-params.yaml",
        [
            f"backbone.model_kwargs={shape['backbone']}",
            f"backbone.img_size={size}",
            f"embed.img_size={size}",
        ],
    )
    width = int(params.backbone.model_kwargs["embed_dim"])
    torch.manual_seed(0)
    recipe = build("talk2dino", Talk2DINOConfig(text_dim=512, vision_dim=width))
    return AlignedModel(recipe, params, root, "cpu")


def evaluator_throughput(name: str, repeats: int) -> dict[str, Any]:
    """images/s of ``segment`` without and with PAMR for one shape."""
    shape = SHAPES[name]
    model = talk2dino_model(shape, Path.cwd())
    generator = torch.Generator().manual_seed(0)
    classes = F.normalize(
        torch.randn(shape["classes"], model.backbone.embed_dim, generator=generator), dim=-1
    )
    logits_fn = model.dense_logits_fn(classes, clean_background=True)
    images = torch.randint(
        0, 256, (shape["images"], 3, *shape["image"]), generator=generator
    ).float()
    result: dict[str, Any] = {
        "shape": name,
        "backbone": shape["backbone"],
        "image": list(shape["image"]),
        "classes": shape["classes"],
        "images": shape["images"],
        "segmentation": dataclasses.asdict(shape["segmentation"]),
    }
    for pamr in (False, True):
        cfg = dataclasses.replace(shape["segmentation"], pamr=pamr)

        def run(cfg: SegmentationConfig = cfg) -> None:
            with torch.no_grad():
                for image in images:  # the evaluator's predictor: one image at a time
                    segment(image[None], logits_fn, shape["classes"], cfg, cfg.bg_threshold)

        seconds = median_seconds(run, repeats)
        result["pamr" if pamr else "no_pamr"] = {
            "seconds_per_image": seconds / len(images),
            "images_per_s": len(images) / seconds,
        }
    result["pamr_slowdown"] = (
        result["pamr"]["seconds_per_image"] / result["no_pamr"]["seconds_per_image"]
    )
    return result


def cleaning_batch_vs_single(batch: int, repeats: int) -> dict[str, Any]:
    """Background cleaning of ``batch`` images (paper shape) in one call vs a loop."""
    generator = torch.Generator().manual_seed(1)
    patches = torch.randn(batch, 1024, 768, generator=generator)
    attn_logits = torch.randn(batch, 12, 1024, generator=generator)
    text = F.normalize(torch.randn(20, 768, generator=generator), dim=-1)
    with torch.no_grad():
        batched = median_seconds(lambda: background_cleaning(patches, attn_logits, text), repeats)
        single = median_seconds(
            lambda: [
                background_cleaning(patches[i : i + 1], attn_logits[i : i + 1], text)
                for i in range(batch)
            ],
            repeats,
        )
        same = torch.allclose(
            background_cleaning(patches, attn_logits, text),
            torch.cat(
                [
                    background_cleaning(patches[i : i + 1], attn_logits[i : i + 1], text)
                    for i in range(batch)
                ]
            ),
            atol=1e-6,
        )
    return {
        "batch": batch,
        "shape": "P=1024 (32×32), H=12, D=768, N=20",
        "batched_ms_per_image": 1000 * batched / batch,
        "single_ms_per_image": 1000 * single / batch,
        "speedup_batched": single / batched,
        "same_result": same,
    }


def machine(threads: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluator = [evaluator_throughput(name, args.repeats) for name in args.shapes]
    cleaning = cleaning_batch_vs_single(args.batch, args.repeats)
    print("| shape | images/s without PAMR | images/s with PAMR | PAMR slowdown |")
    print("|---|---|---|---|")
    for r in evaluator:
        print(
            f"| {r['shape']} | {r['no_pamr']['images_per_s']:.2f} | {r['pamr']['images_per_s']:.2f} | "
            f"{r['pamr_slowdown']:.1f}× |"
        )
    print(
        f"\nbackground cleaning, {cleaning['batch']} images: batched {cleaning['batched_ms_per_image']:.1f} ms/image, "
        f"one at a time {cleaning['single_ms_per_image']:.1f} ms/image "
        f"({cleaning['speedup_batched']:.2f}× faster batched; same result: {cleaning['same_result']})"
    )
    out = Path(
        args.out
        or f"docs/benchmarks/segmentation-{os.cpu_count()}cpu-fp32-torch{torch.__version__.split('+')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine(args.threads),
                "evaluator": evaluator,
                "background_cleaning": cleaning,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

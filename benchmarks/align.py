"""Training throughput of the align stage per recipe, and the time of one paper-sized
Talk2DINO epoch on this machine.

    python benchmarks/align.py                                   # everything (~5 min on 2 cores)
    python benchmarks/align.py --cases talk2dino-paper --steps 40 --out /tmp/align.json

Features are synthetic (random numbers in the shapes of real ones), held in memory as
the align stage holds them:

- ``*-demo``: the demo profile's shapes (ViT 192-d, 6 heads, 8×8 patches + 4 registers
  at 112 px, CLIP 128-d) and its per-recipe model sizes and batch 128;
  ``dinotxt-images-demo`` decodes rendered demo-world PNGs, crops and runs the frozen
  demo backbone online, as ``align.dinotxt.inputs: images`` does;
- ``talk2dino-paper``: the Talk2DINO paper's shapes (DINOv2 ViT-B 768-d with 12 heads,
  CLIP ViT-B/16 text 512-d, batch 128). One epoch is 414,113 COCO 2014 train captions;
  its time is estimated as captions / measured samples/s (the data are a subset: the
  step cost does not depend on the table's length, its memory does: 3.05 GB of head
  embeddings for 82,783 images in float32).

Every case runs twice in this process with the same job: the plain loop
(:class:`dinoalign.train.loop.Trainer`) and Ray Train (``TorchTrainer``, one worker with
all threads, checkpoint at the end). samples/s comes from the loop's own log rows with
the first window dropped as warm-up; the Ray run's wall time also counts its start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoalign.config import load_params
from dinoalign.recipes import DinoTxtConfig, ProjectorConfig, Talk2DINOConfig
from dinoalign.train.data import (
    CaptionTokens,
    DinoTxtImageData,
    DinoTxtTokenData,
    ProjectorData,
    Talk2DINOData,
    TrainingData,
)
from dinoalign.train.loop import Trainer, TrainJob, fit

PAPER_CAPTIONS = 414_113  # COCO Captions 2014 train
BATCH = 128
WINDOW = 10  # steps per log row
RENDERED_IMAGES = 512
DEMO = {"dim": 192, "heads": 6, "registers": 4, "patches": 64, "text": 128, "img_size": 112}
SMALL_HEADS = ("talk2dino-demo", "projector-demo", "talk2dino-paper")  # per-step ops of a few ms
CASES = ("talk2dino-demo", "dinotxt-tokens-demo", "dinotxt-images-demo", "projector-demo", "talk2dino-paper")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=60, help="timed steps after one warm-up window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-thread", nargs="*", choices=CASES, default=list(SMALL_HEADS),
                        help="cases whose Ray run is repeated with align.torch_threads=1")
    parser.add_argument("--out", default=None, help="results JSON (default: docs/benchmarks/align-<machine>.json)")
    return parser.parse_args(argv)


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _caption_tokens(rng: np.random.Generator, images: int, per_image: int, context: int) -> CaptionTokens:
    """Random CLIP-vocabulary tokens, SOT first and EOT (the largest id) at a random length."""
    n = images * per_image
    tokens = rng.integers(1, 49405, size=(n, context), dtype=np.int32)
    length = rng.integers(5, 20, size=n)
    tokens[:, 0] = 49406
    tokens[np.arange(n), length] = 49407
    tokens[np.arange(context)[None, :] > length[:, None]] = 0
    return CaptionTokens(tokens=tokens, start=np.arange(images) * per_image, count=np.full(images, per_image))


def build_case(case: str, samples: int, rng: np.random.Generator, workdir: Path) -> tuple[Any, TrainingData]:
    """(recipe config, training data with ``samples`` samples) of one benchmark case."""
    d, h = DEMO["dim"], DEMO["heads"]
    if case == "talk2dino-demo":
        images = samples // 3
        data = Talk2DINOData(_f32(rng, samples, DEMO["text"]), rng.integers(0, images, samples), _f32(rng, images, h, d))
        return Talk2DINOConfig(text_dim=DEMO["text"], vision_dim=d), data
    if case == "talk2dino-paper":
        images = samples // 5
        data = Talk2DINOData(_f32(rng, samples, 512), rng.integers(0, images, samples), _f32(rng, images, 12, 768))
        return Talk2DINOConfig(text_dim=512, vision_dim=768), data
    if case == "projector-demo":
        cfg = ProjectorConfig(vision_dim=d, embed_dim=DEMO["text"], hidden_dim=256, depth=2, bottleneck_dim=128)
        return cfg, ProjectorData(_f32(rng, samples, d), _f32(rng, samples, DEMO["text"]))
    cfg = DinoTxtConfig(vision_dim=d, vision_heads=h, num_registers=DEMO["registers"], text_width=128,
                        text_layers=2, text_heads=4)
    captions = _caption_tokens(rng, samples, 3, cfg.context_length)
    if case == "dinotxt-tokens-demo":
        data = DinoTxtTokenData(
            cls=_f32(rng, samples, d),
            registers=_f32(rng, samples, DEMO["registers"], d).astype(np.float16),
            patches=_f32(rng, samples, DEMO["patches"], d).astype(np.float16),
            captions=captions,
        )
        return cfg, data
    return cfg, _demo_image_data(samples, captions, workdir)


def _demo_image_data(samples: int, captions: CaptionTokens, workdir: Path) -> DinoTxtImageData:
    """dinotxt's online mode over ``samples`` demo-world PNGs (512 rendered files, reused:
    every sample is still decoded, cropped and embedded)."""
    from dinoalign.config import BackboneConfig
    from dinoalign.data.synthetic import SyntheticWorldConfig, write_sample

    world = SyntheticWorldConfig(n_train=RENDERED_IMAGES, image_size=DEMO["img_size"])
    files = [write_sample(world, workdir / "world", "train", i).image_uri for i in range(RENDERED_IMAGES)]
    uris = [files[i % RENDERED_IMAGES] for i in range(samples)]
    backbone = BackboneConfig(img_size=DEMO["img_size"], model_kwargs={"embed_dim": DEMO["dim"], "depth": 4,
                                                                       "num_heads": DEMO["heads"]})
    return DinoTxtImageData(image_uris=uris, captions=captions, backbone_config=backbone, img_size=DEMO["img_size"],
                            crop_scale=(0.6, 1.0), hflip=True, max_pixels=89_478_485, min_side=14)


def _job(case: str, steps: int, seed: int, workdir: Path) -> TrainJob:
    recipe = case.split("-")[0]
    total = steps + WINDOW
    overrides = [f"align.{recipe}.{k}={v}" for k, v in
                 {"epochs": 1, "batch_size": BATCH, "log_every": WINDOW, "checkpoint_every": 1000 * WINDOW,
                  "warmup_steps": 0}.items()]
    training = getattr(load_params("/nonexistent-dinoalign/params.yaml", overrides).align, recipe)
    model_cfg, data = build_case(case, total * BATCH, np.random.default_rng(seed), workdir)
    return TrainJob(recipe=recipe, model_config=model_cfg, training=training, seed=seed, data=data)


def _throughput(curve: list[dict[str, float]]) -> float:
    """Samples/s over the log windows after the first (warm-up) one."""
    timed = curve[1:]
    seconds = sum(WINDOW * BATCH / r["samples_per_s"] for r in timed)
    return len(timed) * WINDOW * BATCH / seconds


def run_plain(job: TrainJob, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    trainer = Trainer(job, job.data)
    start = time.perf_counter()
    trainer.run(on_log=lambda row: None, on_checkpoint=lambda t: None)
    return {"samples_per_s": _throughput(trainer.curve), "wall_s": time.perf_counter() - start}


def run_ray(job: TrainJob, threads: int, workdir: Path, name: str, torch_threads: int | None = None) -> dict[str, float]:
    align = load_params("/nonexistent-dinoalign/params.yaml",
                        [f"align.cpus_per_worker={threads}", "align.max_failures=0",
                         f"align.torch_threads={torch_threads or 'null'}"]).align
    start = time.perf_counter()
    result = fit(job, align, run_name=name, storage_path=str(workdir / "ray"))
    wall = time.perf_counter() - start
    return {"samples_per_s": _throughput(result.return_value["curve"]), "wall_s": wall}


def machine() -> dict[str, Any]:
    import ray

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "precision": "float32", "device": "cpu"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "batch_size": BATCH, "timed_steps": args.steps, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="dinoalign-bench-") as tmp:
        for case in args.cases:
            job = _job(case, args.steps, args.seed, Path(tmp))
            plain = run_plain(job, args.threads)
            ray_run = run_ray(job, args.threads, Path(tmp), name=f"bench-{case}")
            row = {"plain": plain, "ray_train": ray_run,
                   "ray_over_plain": ray_run["samples_per_s"] / plain["samples_per_s"]}
            if args.threads > 1 and case in args.one_thread:  # the same Ray worker with 1 torch thread
                one = run_ray(job, args.threads, Path(tmp), name=f"bench-{case}-1t", torch_threads=1)
                row.update(ray_train_1_thread=one, ray_1_thread_over_plain=one["samples_per_s"] / plain["samples_per_s"])
                print(f"{'':22s} Ray Train, 1 torch thread: {one['samples_per_s']:9.0f} samples/s "
                      f"({row['ray_1_thread_over_plain']:.2f}x)", flush=True)
            if case == "talk2dino-paper":
                row["paper_epoch_s"] = {k: PAPER_CAPTIONS / v["samples_per_s"] for k, v in
                                        (("plain", plain), ("ray_train", ray_run))}
            results["cases"][case] = row
            print(f"{case:22s} plain {plain['samples_per_s']:9.0f} samples/s | Ray Train "
                  f"{ray_run['samples_per_s']:9.0f} samples/s ({row['ray_over_plain']:.2f}x), "
                  f"wall {ray_run['wall_s']:.1f} s vs {plain['wall_s']:.1f} s", flush=True)
            if "paper_epoch_s" in row and "ray_train_1_thread" in row:
                row["paper_epoch_s"]["ray_train_1_thread"] = PAPER_CAPTIONS / row["ray_train_1_thread"]["samples_per_s"]
            if "paper_epoch_s" in row:
                epoch = row["paper_epoch_s"]
                print(f"{'':22s} paper epoch (414,113 captions, batch 128): {epoch['plain'] / 60:.1f} min plain, "
                      f"{epoch['ray_train'] / 60:.1f} min Ray Train", flush=True)
    m = results["machine"]
    out = Path(args.out or f"docs/benchmarks/align-{m['cpus']}cpu-{m['precision']}-torch{m['torch'].split('+')[0]}"
                           f"-ray{m['ray']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results -> {out}")
    return results


if __name__ == "__main__":
    main()

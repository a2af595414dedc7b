"""Embed-stage throughput and memory: the Ray Data pipeline vs a plain PyTorch loop.

Both engines run the same code path (``dinoalign.embed.engine.run_embed``): decode
(PNG -> short-side resize + centre crop) -> backbone forward -> per-image features ->
parquet shards, with the same batch size; only the engine differs (``embed.engine=ray``:
Ray Data tasks + an actor pool; ``local``: a DataLoader with worker processes feeding the
model in the main process). The ratio ray/local is printed for each size.

A second mode measures peak resident memory (sum over the driver and every Ray process)
while embedding growing datasets with a cheap model: streaming means the peak must not
grow with the number of images.

    python benchmarks/embed.py throughput --sizes 2000 20000 --model vit_small
    python benchmarks/embed.py memory --sizes 20000 60000
    python benchmarks/embed.py writes --sizes 20000 --model tiny     # embed.write driver vs workers
    python benchmarks/embed.py throughput --sizes 500 --model tiny   # smoke run
    python benchmarks/embed.py gpu                                    # ViT-B/14-reg @448, bf16
    python benchmarks/embed.py gpu --device cpu --gpu-model tiny --img-size 112 --batch-sizes 8  # smoke

``gpu`` measures the embed actor's model work on one accelerator, where the throughput of
a real run is decided: the frozen backbone forward alone (bf16 autocast, images already
on the device) against the arithmetic roof measured in the same process (a large bf16
matrix product) and the device's spec-sheet peak, then the whole model holder the Ray
actor runs (``ImageEmbedder``: uint8 host batch -> device, normalise, forward, the
per-image features, back to host) as a ratio of the forward alone. FLOPs per image are
counted by torch's FlopCounterMode and printed next to the nominal ViT count. It needs
torch, timm, numpy, pyarrow, PIL, yaml and fsspec (plus open_clip_torch, ftfy and
faiss-cpu, which ``dinoalign``'s imports pull in), not Ray.

Images come from the synthetic demo world at 224 px; a manifest of N rows cycles over a
base set of distinct rendered images (each row is still decoded from its PNG file).
Results are appended as JSON lines to ``--out`` (default docs/benchmarks/embed.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GPU_MODELS = {
    # name -> (timm architecture, model_kwargs); random init: speed does not depend on weights
    "vit_base_reg": ("vit_base_patch14_reg4_dinov2", {}),  # DINOv2 ViT-B/14 with registers
    "vit_large_reg": ("vit_large_patch14_reg4_dinov2", {}),
    "tiny": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 48, "depth": 2, "num_heads": 3}),
}

MODELS = {
    # ViT-S/14-shaped (DINOv2 ViT-S/14 with registers: 384-d, 12 blocks, 6 heads), random init
    "vit_small": "{}",
    "tiny": "{embed_dim: 48, depth: 2, num_heads: 3}",
}


def build_world(root: Path, n_unique: int) -> Path:
    """Render ``n_unique`` demo-world train images at 224 px; return the image folder."""
    from dinoalign.config import load_params
    from dinoalign.data.prepare import prepare_pairs

    params = load_params("/nonexistent.yaml", [
        f"paths.pairs={root / 'world'}", f"data.synthetic.n_train={n_unique}", "data.synthetic.n_val=0",
        "data.synthetic.n_test=0", "data.synthetic.image_size=224", "prepare.validate_images=false"])
    prepare_pairs(params.data, params.prepare.shard_size, params.prepare.validate_images,
        root / params.paths.pairs, root)
    return root / "world"


def manifest_of(world: Path, n: int) -> "object":
    """A pairs manifest of ``n`` rows cycling over the world's images (distinct uids)."""
    import pyarrow as pa

    from dinoalign.data.prepare import read_pairs
    from dinoalign.data.schema import MANIFEST_SCHEMA, make_uid

    base = read_pairs(world).to_pylist()
    for r in base:  # prepare stores paths relative to its root (here: world's parent)
        r["image_uri"] = str(world.parent / r["image_uri"])
    rows = []
    for i in range(n):
        r = dict(base[i % len(base)])
        r["uid"] = make_uid("bench", str(i))
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def run_one(world: Path, n: int, engine: str, model: str, batch_size: int, out: Path, write: str = "workers",
            keep_patches: bool = False) -> dict:
    """Embed ``n`` images with one engine in this process; return the summary."""
    from dinoalign.config import load_params
    from dinoalign.embed.engine import run_embed
    from dinoalign.stages.embed import embed_job

    params = load_params("/nonexistent.yaml", [
        f"paths.features={out}", f"embed.engine={engine}", "embed.img_size=224", "backbone.img_size=224",
        f"backbone.model_kwargs={MODELS[model]}", f"embed.batch_size={batch_size}",
        f"embed.decode_batch_size={batch_size}", "clip.image_features=false", "embed.text_encoders=[]",
        "embed.shard_rows=2048", "embed.loader_workers=1", "embed.actor_num_cpus=1", "embed.decode_num_cpus=0.5",
        f"embed.torch_threads={os.cpu_count()}", f"embed.write={write}",
        f"embed.keep_patches={str(keep_patches).lower()}"])
    return run_embed(embed_job(params, str(out)), manifest_of(world, n))


class PeakRSS:
    """Samples the summed RSS of this process, its children and every Ray process."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            procs = {me, *me.children(recursive=True)}
            for p in psutil.process_iter(["name", "cmdline"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or (p.info.get("name") or "").startswith("ray"):
                    procs.add(p)
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def versions() -> dict:
    """Versions of what the numbers depend on (None for a package that is not installed:
    the gpu mode runs without Ray)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{n: v(n) for n in ("torch", "timm", "ray", "pyarrow")},
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process (so peak RSS and Ray state do not leak)."""
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        t0 = time.perf_counter()
        summary = run_one(Path(args.world), args.n, args.engine, args.model, args.batch_size, Path(tmp) / "features",
                          args.write, args.keep_patches)
        wall = time.perf_counter() - t0
    import resource

    print("RESULT " + json.dumps({"n": args.n, "engine": args.engine, "model": args.model, "write": args.write,
                                  "keep_patches": args.keep_patches,
                                  # the driver process alone: what a driver pod pays
                                  "driver_cpu_s": summary["driver_cpu_s"],
                                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "batch_size": args.batch_size, "images_per_s": summary["images_per_s"],
                                  "seconds_images": summary["seconds_images"], "wall_s": wall,
                                  # time inside the model holder's calls (normalise + forward +
                                  # features): the part of seconds_images that is the model itself
                                  "seconds_model": summary["seconds_model"],
                                  "peak_rss_mb": rss.peak / 2**20}))


def measure(world: Path, n: int, engine: str, model: str, batch_size: int, write: str = "workers",
            keep_patches: bool = False) -> dict:
    cmd = [sys.executable, __file__, "_child", "--world", str(world), "--n", str(n), "--engine", engine,
           "--model", model, "--batch-size", str(batch_size), "--write", write,
           *(["--keep-patches"] if keep_patches else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed ({engine}, n={n}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def _timed(fn, device: "object", repeats: int, warmup: int = 3) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` runs after ``warmup`` (device synchronised)."""
    import torch

    sync = torch.cuda.synchronize if getattr(device, "type", "cpu") == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def matmul_roof_tflops(device: "object", n: int, dtype: "object", repeats: int = 10) -> float:
    """TFLOP/s of an n×n×n matrix product: the arithmetic roof reachable in this process."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _timed(lambda: a @ b, device, repeats) / 1e12


def gpu(args: argparse.Namespace) -> None:
    """Backbone forward and the embed actor's model holder on one device (see the docstring)."""
    import numpy as np
    import torch

    from dinoalign.config import load_params
    from dinoalign.embed.engine import ImageEmbedder
    from dinoalign.stages.embed import embed_job
    from flops import counted_flops, peak_bf16_tflops, vit_forward_flops  # benchmarks/flops.py

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"gpu: --device cuda but torch {torch.__version__} sees no CUDA device; "
                         "use --device cpu for a smoke run")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    arch, kwargs = GPU_MODELS[args.gpu_model]
    params = load_params("/nonexistent.yaml", [
        f"backbone.name={arch}", f"backbone.model_kwargs={json.dumps(kwargs)}", f"backbone.img_size={args.img_size}",
        f"embed.img_size={args.img_size}", "clip.image_features=false", "embed.text_encoders=[]",
        f"embed.actor_num_gpus={1 if on_gpu else 0}", "embed.keep_patches=false",
        f"embed.torch_threads={os.cpu_count()}"])
    # the Ray actor's model holder, built as the actor builds it
    holder = ImageEmbedder(embed_job(params, str(Path(tempfile.gettempdir()) / "unused-features")))
    backbone = holder.backbone
    vit = backbone.vit
    s = args.img_size
    flops = counted_flops(vit.forward_features, torch.zeros(1, 3, s, s, device=device))
    nominal = vit_forward_flops(img_size=s, patch_size=backbone.patch_size, embed_dim=vit.embed_dim,
                                depth=len(vit.blocks), num_prefix_tokens=int(vit.num_prefix_tokens))
    name = torch.cuda.get_device_name(device) if on_gpu else _cpu_name()
    spec_peak = peak_bf16_tflops(name) if on_gpu else None
    roof_dtype = torch.bfloat16 if on_gpu else torch.float32
    roof = matmul_roof_tflops(device, args.roof_size, roof_dtype)
    print(f"gpu: {name}; {arch} {kwargs or ''} at {s} px: {flops / 1e9:.1f} GFLOP/image counted "
          f"({nominal / 1e9:.1f} nominal); {args.roof_size}^3 {str(roof_dtype)[6:]} matmul {roof:.1f} TFLOP/s"
          + (f"; spec peak {spec_peak:.0f}" if spec_peak else ""), flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for bs in args.batch_sizes:
        host = rng.integers(0, 256, size=(bs, s, s, 3), dtype=np.uint8)
        x = backbone.normalize(torch.from_numpy(host).to(device))
        t_fwd = _timed(lambda: backbone(x), device, args.repeats)
        batch = {"uid": np.array([str(i) for i in range(bs)], dtype=object), "image": host,
                 "reject_reason": np.full(bs, "", dtype=object), "reject_detail": np.full(bs, "", dtype=object)}
        t_holder = _timed(lambda: holder(batch), device, args.repeats)
        fwd_ips, holder_ips = bs / t_fwd, bs / t_holder
        tflops = flops * fwd_ips / 1e12
        row = {"batch_size": bs, "forward_images_per_s": fwd_ips, "holder_images_per_s": holder_ips,
               "holder_over_forward": holder_ips / fwd_ips, "forward_tflops": tflops,
               "fraction_of_matmul_roof": tflops / roof,
               "fraction_of_spec_peak": tflops / spec_peak if spec_peak else None}
        if on_gpu:
            row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(row)
        peak_txt = f", {row['fraction_of_spec_peak']:.1%} of spec peak" if spec_peak else ""
        print(f"gpu batch {bs}: forward {fwd_ips:.1f} img/s = {tflops:.1f} TFLOP/s "
              f"({row['fraction_of_matmul_roof']:.1%} of the matmul roof{peak_txt}); "
              f"model holder {holder_ips:.1f} img/s = {row['holder_over_forward']:.2f}x the forward", flush=True)
    meta = {"mode": "gpu", "versions": versions(), "date": time.strftime("%Y-%m-%d"), "device": name,
            "model": arch, "model_kwargs": kwargs, "img_size": s, "dtype": "bf16 autocast" if on_gpu else "float32",
            "flops_per_image": flops, "nominal_flops_per_image": nominal, "matmul_roof_tflops": roof,
            "spec_peak_tflops": spec_peak, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(meta) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["throughput", "memory", "writes", "gpu", "_child"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--model", choices=sorted(MODELS), default="vit_small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--unique", type=int, default=2000, help="distinct rendered images the manifest cycles over")
    ap.add_argument("--engines", nargs="+", default=["local", "ray"])
    ap.add_argument("--out", default="docs/benchmarks/embed.jsonl")
    ap.add_argument("--gpu-model", choices=sorted(GPU_MODELS), default="vit_base_reg", help="gpu mode")
    ap.add_argument("--img-size", type=int, default=448, help="gpu mode (talk2dino paper: 448)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128], help="gpu mode")
    ap.add_argument("--device", default="auto", help="gpu mode: auto | cuda | cpu (smoke runs)")
    ap.add_argument("--repeats", type=int, default=10, help="gpu mode: timed batches per measurement")
    ap.add_argument("--roof-size", type=int, default=8192, help="gpu mode: n of the n^3 matmul roof")
    ap.add_argument("--write", default="workers", help=argparse.SUPPRESS)
    ap.add_argument("--keep-patches", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--world", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode == "_child":
        return child(args)
    if args.mode == "gpu":
        return gpu(args)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp), args.unique)
        meta = {"mode": args.mode, "versions": versions(), "date": time.strftime("%Y-%m-%d")}
        rows = []
        if args.mode == "writes":
            return writes(args, world, meta)
        model = "tiny" if args.mode == "memory" else args.model
        engines = ["ray"] if args.mode == "memory" else args.engines
        for n in args.sizes:
            res = {e: measure(world, n, e, model, args.batch_size) for e in engines}
            row = {"n": n, "model": model, **{f"{e}": res[e] for e in engines}}
            if "ray" in res and "local" in res:
                row["ray_over_local"] = res["ray"]["images_per_s"] / res["local"]["images_per_s"]
            rows.append(row)
            line = ", ".join(f"{e} {res[e]['images_per_s']:.1f} img/s (peak RSS {res[e]['peak_rss_mb']:.0f} MB)"
                             for e in engines)
            ratio = f", ray/local = {row['ray_over_local']:.2f}" if "ray_over_local" in row else ""
            print(f"{args.mode} n={n} model={model}: {line}{ratio}", flush=True)
        if args.mode == "memory" and len(rows) > 1:
            growth = rows[-1]["ray"]["peak_rss_mb"] / rows[0]["ray"]["peak_rss_mb"]
            print(f"peak RSS ratio {rows[-1]['n']} vs {rows[0]['n']} images: {growth:.2f}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps({**meta, "rows": rows}) + "\n")


def writes(args: argparse.Namespace, world: Path, meta: dict) -> None:
    """Driver-side vs worker-side shard writing (``embed.write``), Ray engine, patch tokens
    kept: what the driver process pays (CPU seconds, its own peak RSS) and images/s."""
    rows = []
    for n in args.sizes:
        res = {w: measure(world, n, "ray", args.model, args.batch_size, w, keep_patches=True)
               for w in ("driver", "workers")}
        d, w = res["driver"], res["workers"]
        row = {"n": n, "model": args.model, **res,
               "driver_cpu_ratio": d["driver_cpu_s"] / max(w["driver_cpu_s"], 1e-9),
               "driver_rss_ratio": d["driver_peak_rss_mb"] / w["driver_peak_rss_mb"],
               "throughput_ratio": w["images_per_s"] / d["images_per_s"]}
        rows.append(row)
        print(f"writes n={n} model={args.model} (patches kept): driver-side {d['images_per_s']:.1f} img/s, "
              f"driver {d['driver_cpu_s']:.1f} CPU s, {d['driver_peak_rss_mb']:.0f} MB peak; worker-side "
              f"{w['images_per_s']:.1f} img/s, driver {w['driver_cpu_s']:.1f} CPU s, "
              f"{w['driver_peak_rss_mb']:.0f} MB peak; driver CPU x{row['driver_cpu_ratio']:.2f}, "
              f"driver RSS x{row['driver_rss_ratio']:.2f}, throughput workers/driver x{row['throughput_ratio']:.2f}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({**meta, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()

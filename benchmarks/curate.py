"""Time and peak memory of curation: two-level k-means + balanced sampling.

    python benchmarks/curate.py                                 # 100k, 300k, 1M points
    python benchmarks/curate.py --sizes 20000 --out /tmp/c.json # a quick check

Synthetic 384-d embeddings (a ViT-S width): a mixture of ``--true-clusters`` Gaussians
with Zipf-distributed sizes on the unit sphere. Each size runs in a fresh subprocess, so
that its peak resident memory (``VmHWM`` from /proc/self/status, cross-checked with
``getrusage``) is its own. The table gives every size's time and memory as a ratio to
the first size of the same invocation, and the scaling exponent b of time ∝ Nᵇ. Next to
the wall time it gives the process CPU time (all FAISS threads): on a shared machine a
CPU/wall ratio below the thread count means other work took cores away, and the CPU
time is then the steadier measure of the work done.
FAISS trains on at most max_points_per_centroid·k points (256·k by default), so k-means
training time flattens once N exceeds that; assignment and sampling stay linear in N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dinoalign.curate.kmeans import faiss_uses_gpu, hierarchical_kmeans
from dinoalign.curate.sampling import balanced_sample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--levels", type=int, nargs="+", default=[1000, 100])
    parser.add_argument("--resample-steps", type=int, nargs="+", default=[2, 2])
    parser.add_argument("--resample-points", type=int, nargs="+", default=[10, 5])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--target-fraction", type=float, default=0.25)
    parser.add_argument("--leaf-strategy", choices=["closest", "random"], default="closest")
    parser.add_argument("--true-clusters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/curate.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: one size
    return parser.parse_args(argv)


def synthetic_embeddings(n: int, dim: int, true_clusters: int, seed: int) -> np.ndarray:
    """n×dim float32 unit vectors from Zipf-sized Gaussian clusters, built in chunks so
    that the float32 result is the only large allocation."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((true_clusters, dim), dtype=np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, true_clusters + 1)
    labels = rng.choice(true_clusters, size=n, p=weights / weights.sum())
    points = np.empty((n, dim), dtype=np.float32)
    chunk = 65_536
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = means[labels[start:stop]] + 0.05 * rng.standard_normal(
            (stop - start, dim), dtype=np.float32
        )
        points[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return points


def _memory_mb(field: str) -> float:
    """A ``Vm*`` line of /proc/self/status in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Generate ``args.worker`` points, cluster and sample them; times and memory."""
    n = args.worker
    rss_before_data = _memory_mb("VmRSS")
    points = synthetic_embeddings(n, args.dim, args.true_clusters, args.seed)
    rss_with_data = _memory_mb("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    hierarchy = hierarchical_kmeans(
        points, args.levels, args.resample_steps, args.resample_points, args.iters, args.seed
    )
    clustered, cpu_clustered = time.perf_counter(), time.process_time()
    uids = [f"{i:012d}" for i in range(n)]  # only read by the random leaf strategy
    selected = balanced_sample(
        hierarchy,
        int(n * args.target_fraction),
        np.ones(n, dtype=bool),
        args.leaf_strategy,
        uids,
        args.seed,
    )
    sampled, cpu_sampled = time.perf_counter(), time.process_time()
    return {
        "n": n,
        "kmeans_s": clustered - started,
        "sampling_s": sampled - clustered,
        "total_s": sampled - started,
        "kmeans_cpu_s": cpu_clustered - cpu_started,
        "sampling_cpu_s": cpu_sampled - cpu_clustered,
        "total_cpu_s": cpu_sampled - cpu_started,
        "selected": int(selected.sum()),
        "faiss_points": [level.faiss_points for level in hierarchy.levels],
        "clamped": hierarchy.warnings,
        "data_mb": points.nbytes / 2**20,
        "rss_before_data_mb": rss_before_data,
        "rss_with_data_mb": rss_with_data,
        "peak_rss_mb": _memory_mb("VmHWM"),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_in_subprocess(argv: list[str], n: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", str(n)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"size {n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ratios to the first (baseline) size and the exponent b of time ∝ Nᵇ."""
    base = results[0]
    for row in results:
        size_ratio = row["n"] / base["n"]
        row["size_ratio"] = size_ratio
        row["time_ratio"] = row["total_s"] / base["total_s"]
        row["cpu_time_ratio"] = row["total_cpu_s"] / base["total_cpu_s"]
        row["peak_rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        row["time_exponent"] = (
            math.log(row["time_ratio"]) / math.log(size_ratio) if size_ratio != 1 else None
        )
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = (
        f"{'N':>10} {'k-means s':>10} {'sampling s':>10} {'total s':>9} {'×time':>7} "
        f"{'CPU s':>8} {'×CPU':>6} {'×N':>6} {'exp b':>6} {'peak MB':>9} {'data MB':>8} "
        f"{'×peak':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        exponent = "-" if row["time_exponent"] is None else f"{row['time_exponent']:.2f}"
        lines.append(
            f"{row['n']:>10,} {row['kmeans_s']:>10.2f} {row['sampling_s']:>10.2f} "
            f"{row['total_s']:>9.2f} {row['time_ratio']:>7.2f} {row['total_cpu_s']:>8.1f} "
            f"{row['cpu_time_ratio']:>6.2f} {row['size_ratio']:>6.1f} "
            f"{exponent:>6} {row['peak_rss_mb']:>9.0f} {row['data_mb']:>8.0f} "
            f"{row['peak_rss_ratio']:>6.2f}"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "faiss_device": "gpu" if faiss_uses_gpu() else "cpu",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_one(args)))
        return
    results = []
    for n in args.sizes:
        print(f"running N={n:,} ...", file=sys.stderr, flush=True)
        results.append(run_in_subprocess(argv, n))
    results = with_ratios(results)
    print(format_table(results))
    params = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"machine": machine(), "params": params, "results": results}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

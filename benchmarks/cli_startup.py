"""How long `dinoalign --help` and `dinoalign params` take, as ratios to a bare Python start
in the same process (issue #14: --help under 2 s; importing the config loads no torch).

    uv run python benchmarks/cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import torch


def _wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    cases = {
        "python -c pass (baseline)": [py, "-c", "pass"],
        "dinoalign --help": [py, "-m", "dinoalign.cli", "--help"],
        "dinoalign params": [py, "-m", "dinoalign.cli", "params"],
        "python -c 'import torch' (for scale)": [py, "-c", "import torch"],
    }
    base = None
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, torch {torch.__version__}, "
          f"median of {args.runs}")
    for name, cmd in cases.items():
        t = _wall(cmd, args.runs)
        base = base or t
        print(f"{name:<40} {t:6.2f} s  {t / base:6.1f}x baseline")


if __name__ == "__main__":
    main()

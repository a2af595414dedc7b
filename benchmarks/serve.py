"""Served model vs the segment command: first and warm latency, images/s for a batch.

    make demo                                    # the trained demo models
    python benchmarks/serve.py                   # talk2dino of artifacts/models
    python benchmarks/serve.py --recipe dinotxt --warm 30 --batch 16 --out /tmp/serve.json

Baseline, in the same process: ``dinoalign segment`` run as a command, one process per
image (what a user had before the models were servable), timed end to end. Then the same
model as an MLflow pyfunc model (:func:`dinoalign.serve.save_model`), served by
``mlflow models serve --env-manager local`` on 127.0.0.1 (one uvicorn worker), and timed:
time until ``/ping`` answers, the first segment request (the towers are built on load, so
this is mostly the network and the request), the median of ``--warm`` single-image segment
requests, and one request of ``--batch`` images (images/s). The served masks are checked
against the command's (byte-identical PNG) before any time is reported.

Prints the table with ratios against the command and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="talk2dino", choices=("talk2dino", "dinotxt"))
    p.add_argument("-p", "--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--cli-images", type=int, default=2, help="images segmented by the command")
    p.add_argument("--warm", type=int, default=20, help="warm single-image requests")
    p.add_argument("--batch", type=int, default=16, help="images in the batch request")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def _post(url: str, requests: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    body = json.dumps({"inputs": requests}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - start, answer["predictions"]


def main() -> None:
    args = _args()
    from dinoalign.config import load_params
    from dinoalign.data.prepare import read_pairs
    from dinoalign.ops.services import start_model_server
    from dinoalign.serve import save_model
    from dinoalign.storage import under_root

    params = load_params(args.params)
    root = args.params.resolve().parent
    model_dir = Path(under_root(params.paths.models, root)) / args.recipe
    if not (model_dir / "model.safetensors").is_file():
        sys.exit(f"no trained {args.recipe} at {model_dir}: run `make demo` first")
    rows = [r for r in read_pairs(under_root(params.paths.pairs, root)).to_pylist() if r["split"] == "test"]
    need = max(args.cli_images, args.batch, 1)
    if len(rows) < need:
        sys.exit(f"{len(rows)} test images, {need} needed")
    from dinoalign.data.synthetic import CLASSES

    classes = list(CLASSES[:8])
    threshold = params.evaluate.segmentation_for(args.recipe).bg_threshold
    images = [r["image_uri"] for r in rows[:need]]

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp_path = Path(tmp)
        cli_times, cli_masks = [], []
        for i, image in enumerate(images[: args.cli_images]):
            mask = tmp_path / f"cli-{i}.png"
            cmd = [sys.executable, "-m", "dinoalign.cli", "segment", "-p", str(args.params), "--model",
                   str(model_dir), "--image", image, "--classes", ",".join(classes), "--out", str(mask),
                   "--bg-threshold", str(threshold)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=root)
            cli_times.append(time.perf_counter() - start)
            cli_masks.append(mask.read_bytes())

        start = time.perf_counter()
        info = save_model(model_dir, params, root, tmp_path / "model")
        saved_s = time.perf_counter() - start
        start = time.perf_counter()
        server = start_model_server(str(tmp_path / "model"), tmp_path)
        ready_s = time.perf_counter() - start
        try:
            def request(image: str) -> dict[str, Any]:
                data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
                return {"task": "segment", "image_b64": data, "classes": classes, "bg_threshold": threshold}

            first_s, _ = _post(server.url, [request(images[0])])
            for i, mask in enumerate(cli_masks):
                _, answer = _post(server.url, [request(images[i])])
                if base64.b64decode(answer[0]["mask_png_b64"]) != mask:
                    sys.exit(f"served mask of {images[i]} differs from the command's")
            warm = [_post(server.url, [request(images[i % len(images)])])[0] for i in range(args.warm)]
            batch_s, batch = _post(server.url, [request(image) for image in images[: args.batch]])
            assert len(batch) == args.batch
        finally:
            server.stop()

    import torch

    cli_s = statistics.mean(cli_times)
    warm_s = statistics.median(warm)
    result = {
        "recipe": args.recipe,
        "weights_sha256": info["weights_sha256"],
        "image_size": params.data.synthetic.image_size,
        "classes": len(classes),
        "cli_seconds_per_image": cli_s,
        "save_model_s": saved_s,
        "server_ready_s": ready_s,
        "first_request_s": first_s,
        "warm_request_median_s": warm_s,
        "warm_request_p90_s": sorted(warm)[int(0.9 * (len(warm) - 1))],
        "batch_images": args.batch,
        "batch_images_per_s": args.batch / batch_s,
        "speedup_warm_vs_cli": cli_s / warm_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": params.evaluate.torch_threads},
    }
    print(f"{'path':40s} {'seconds':>10s} {'vs command':>11s}")
    print(f"{'dinoalign segment (per image, cold)':40s} {cli_s:10.2f} {1.0:10.2f}x")
    print(f"{'served: until /ping answers':40s} {ready_s:10.2f}")
    print(f"{'served: first request':40s} {first_s:10.3f} {cli_s / first_s:10.1f}x")
    print(f"{'served: warm request (median)':40s} {warm_s:10.3f} {cli_s / warm_s:10.1f}x")
    print(f"{'served: batch of ' + str(args.batch) + ' (images/s)':40s} {args.batch / batch_s:10.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""FLOP accounting behind the GPU throughput figures (``benchmarks/flops.py``; docs/benchmarks.md,
Embed on a GPU): the nominal ViT count must equal what torch's FlopCounterMode counts on the
real timm models, and the benchmark's gpu mode must keep running (here on the CPU, tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoalign.backbones import build_backbone

REPO = Path(__file__).resolve().parents[2]
# benchmarks/ is a folder of scripts, not a package: import its sibling module the way
# `python benchmarks/embed.py` does, with the folder on sys.path
sys.path.insert(0, str(REPO / "benchmarks"))
from flops import counted_flops, peak_bf16_tflops, vit_forward_flops  # noqa: E402


@pytest.mark.parametrize(
    "name, kwargs, img_size, mlp_ratio, swiglu",
    [
        ("vit_small_patch14_reg4_dinov2", dict(embed_dim=48, depth=2, num_heads=3), 112, 4.0, False),
        ("vit_base_patch14_dinov2", dict(embed_dim=64, depth=1, num_heads=4), 98, 4.0, False),
        # ViT-g's SwiGLU: fc1 packs gate and value (2·M wide), fc2 is M -> D
        ("vit_giant_patch14_reg4_dinov2", dict(embed_dim=48, depth=1, num_heads=3, mlp_ratio=2.66667 * 2), 56,
         2.66667, True),
    ],
)
def test_nominal_vit_flops_equal_the_counted_ones(name, kwargs, img_size, mlp_ratio, swiglu) -> None:
    backbone = build_backbone(name, img_size=img_size, model_kwargs=kwargs)
    vit = backbone.vit
    counted = counted_flops(vit.forward_features, torch.zeros(2, 3, img_size, img_size))
    nominal = vit_forward_flops(img_size=img_size, patch_size=14, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                                num_prefix_tokens=int(vit.num_prefix_tokens), mlp_ratio=mlp_ratio, swiglu=swiglu)
    assert counted == 2 * nominal  # a batch of two images


def test_vit_b_at_448_is_the_size_the_docs_quote() -> None:
    # ViT-B/14-reg at 448: 1024 patches + CLS + 4 registers; about 0.215 TFLOP per image
    flops = vit_forward_flops(img_size=448, patch_size=14, embed_dim=768, depth=12, num_prefix_tokens=5)
    n, d = 1029, 768
    assert flops == 2 * 1024 * 3 * 14 * 14 * d + 12 * (24 * n * d * d + 4 * n * n * d)
    assert 0.21e12 < flops < 0.22e12


@pytest.mark.parametrize(
    "device, peak",
    [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("Quadro P1000", None)],
)
def test_spec_peaks_by_device_name(device: str, peak: float | None) -> None:
    assert peak_bf16_tflops(device) == peak


def test_gpu_benchmark_mode_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "embed.py"), "gpu", "--device", "cpu", "--gpu-model", "tiny",
           "--img-size", "56", "--batch-sizes", "2", "4", "--repeats", "2", "--roof-size", "256", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text().strip().splitlines()[-1])
    assert record["flops_per_image"] == record["nominal_flops_per_image"] > 0
    assert [r["batch_size"] for r in record["rows"]] == [2, 4]
    for row in record["rows"]:
        assert row["forward_images_per_s"] > 0 and row["holder_images_per_s"] > 0
        assert row["forward_tflops"] == pytest.approx(record["flops_per_image"] * row["forward_images_per_s"] / 1e12)
        assert row["fraction_of_spec_peak"] is None  # a CPU has no bf16 spec peak in the table
    assert "gpu batch 4: forward" in res.stdout

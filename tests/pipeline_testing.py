"""Helpers shared by the test modules (importable as ``pipeline_testing``: a conftest is
not importable by name once several conftest.py files exist)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
CHROMIUM = Path("/usr/bin/chromium")
# ENVIRONMENT.md: the flags under which Debian's chromium renders pages headless here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# The tiny DINOv2 of the unit tests and smoke runs (3 heads of 16 channels, 2 blocks): as
# timm model_kwargs, and as the value of a ``backbone.model_kwargs=`` override.
TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 3}
TINY_BACKBONE = json.dumps(TINY_VIT)


def tiny_backbone(
    name: str = "vit_small_patch14_reg4_dinov2", img_size: int = 56, **model_kwargs: Any
) -> Any:
    """A ``DinoBackbone`` of :data:`TINY_VIT` (``model_kwargs`` override or add keys),
    timm's random init from the current torch seed."""
    from dinoalign.backbones import build_backbone

    return build_backbone(name, img_size=img_size, model_kwargs={**TINY_VIT, **model_kwargs})


def tiny_overrides(root: Path, clip_dir: Path, **extra: str) -> list[str]:
    """Dotted overrides that shrink every stage to a smoke run under ``root``."""
    clip = f"local-dir:{clip_dir}"
    base = {
        "tracking.uri": f"sqlite:///{root / 'mlruns.db'}",
        "data.synthetic.n_train": "24",
        "data.synthetic.n_val": "4",
        "data.synthetic.n_test": "12",
        "data.synthetic.image_size": "112",
        "paths.pairs": str(root / "pairs"),
        "backbone.model_kwargs": TINY_BACKBONE,
        "backbone.img_size": "56",
        "clip.name": clip,
        "paths.features": str(root / "features"),
        "embed.img_size": "56",
        "embed.batch_size": "8",
        "embed.decode_batch_size": "8",
        "embed.shard_rows": "10",
        "embed.loader_workers": "0",
        "embed.keep_patches": "true",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@dataclasses.dataclass(frozen=True)
class DemoFeatures:
    """A small demo world run through the real prepare, teacher and embed stages.

    ``overrides`` put every stage's inputs and outputs under ``root`` (absolute paths)
    and shrink the models; pass them, plus a stage's own, to ``dinoalign.cli.main([stage,
    "-p", str(features.params_file), *features.overrides, ...])`` or to :meth:`params`.
    ``params_file`` does not exist (dataclass defaults + overrides) and lies in a folder
    beside the data, so the manifest keeps absolute image paths and nothing resolves
    against the repo. MLflow runs go to ``root/mlruns.db`` with artifacts under ``root``.
    """

    root: Path
    overrides: tuple[str, ...]
    params_file: Path

    @property
    def pairs_dir(self) -> Path:
        return self.root / "pairs"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def clip_dir(self) -> Path:
        """The trained tiny CLIP teacher (``local-dir:`` open_clip checkpoint)."""
        return self.root / "teacher" / "model"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlruns.db'}"

    @property
    def world(self) -> dict:
        """The demo world's ``world.json`` (classes, held-out compositions and uids)."""
        from dinoalign.data.synthetic import load_world

        return load_world(self.pairs_dir / "synthetic")

    def params(self, *extra: str):
        """The resolved ``Params`` of these overrides plus ``extra``."""
        from dinoalign.config import load_params

        return load_params(self.params_file, [*self.overrides, *extra])


# The demo world of the tests: big enough that every recipe learns it well above chance,
# small enough for about a minute on 2 cores (the demo profile is 3000/300/600 at 112 px).
DEMO_WORLD = {"n_train": 480, "n_val": 16, "n_test": 180}
# init_values 1.0 + jax init, as in params.yaml: with timm's default LayerScale 1e-5 a random
# ViT is nearly linear and its features hardly tell the demo classes apart.
DEMO_BACKBONE = "{embed_dim: 96, depth: 2, num_heads: 3, init_values: 1.0, weight_init: jax}"


@dataclasses.dataclass(frozen=True)
class DemoModels:
    """Seeded, untrained models of the three recipes sized for ``demo_features``, saved
    under ``root/models`` as the align stage saves them, plus overrides that send the
    evaluate and report stages' outputs and MLflow runs under ``root``. For the
    mechanics and the exactness of evaluation, not for learning."""

    features: DemoFeatures
    root: Path
    overrides: tuple[str, ...]

    RECIPES = ("talk2dino", "dinotxt", "projector")

    def model_dir(self, recipe: str) -> Path:
        return self.root / "models" / recipe

    def params(self, *extra: str):
        from dinoalign.config import load_params

        return load_params(self.features.params_file, [*self.overrides, *extra])

    def main(self, command: str, *args: str) -> int:
        """``dinoalign <command> -p … <overrides> *args`` (options or more overrides), with
        MLflow artifacts under root."""
        from dinoalign.cli import main

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DINOALIGN_ROOT", str(self.root))
            return main([command, "-p", str(self.features.params_file), *self.overrides, *args])


def output_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too: a temporary left behind shows) by
    relative path, with its bytes: what DVC hashes of an output folder, so two runs that
    wrote the same output compare equal."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_on_a_full_disk(limit: int, code: str, *args: str, env: dict[str, str] | None = None
                      ) -> subprocess.CompletedProcess:
    """Python ``code`` (``sys.argv[1:]`` = ``args``) in a process that can write no file
    past ``limit`` bytes: RLIMIT_FSIZE with SIGXFSZ ignored, so a write past it fails
    part-way with EFBIG, as a write to a full disk fails with ENOSPC."""
    prelude = ("import resource, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({int(limit)}, {int(limit)}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                          timeout=300, env=env)


def binomial_tail(hits: int, n: int, chance: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, chance): how likely a model at chance level scores
    at least ``hits`` of ``n``. Learning tests require this to be tiny (a margin that
    accounts for the size of the test set, unlike a fixed multiple of chance)."""
    return float(sum(math.comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(hits, n + 1)))


def embed_features(params: Any, manifest: Any) -> dict[str, Any]:
    """The embed engine on ``params`` (its ``paths.features``) over a pairs ``manifest``:
    what the embed stage runs, without its MLflow run."""
    from dinoalign.embed.engine import run_embed
    from dinoalign.stages.embed import embed_job

    return run_embed(embed_job(params, params.paths.features), manifest)


def write_pretrain_outputs(folder: Path, *, gain: float = 0.25, epochs: int = 4, out_dim: int = 64,
                           images: int = 40, skipped: bool = False) -> dict[str, Any]:
    """Synthetic outputs of the pretrain stage in ``folder`` (its ``paths.pretrained``), the
    keys of ``dinoalign.stages.pretrain.run``: ``curve.csv`` through the stage's own writer and
    ``metrics.json`` whose paired blocks are ``dinoalign.pretrain.probe``'s over made-up
    per-image attention masses, the pretrained backbone ``gain`` more inside the object
    than its random init (0: the same masses plus noise). ``skipped``: the one
    ``metrics.json`` of a disabled stage. Returns the metrics."""
    import numpy as np
    import torch

    from dinoalign.pretrain.probe import _paired
    from dinoalign.stages.pretrain import _write_curve

    folder.mkdir(parents=True, exist_ok=True)
    if skipped:
        metrics: dict[str, Any] = {"skipped": True, "reason": "pretrain.enabled=false: the backbone loads its own "
                                   "weights (backbone.weights or backbone.pretrained)",
                                   "backbone": "vit_base_patch14_reg4_dinov2"}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    log_k = math.log(out_dim)
    curve = [{"epoch": e, "step": 4 * (e + 1), "loss": 4.0 - 0.4 * e, "teacher_entropy": 0.8 * log_k - 0.3 * e,
              "teacher_marginal_entropy": 0.95 * log_k, "center_norm": 0.1 + 0.01 * e, "teacher_temp": 0.04,
              "lr": 1e-3, "momentum": 0.95, "crops_per_s": 120.0, "seconds": 3.0 * (e + 1)} for e in range(epochs)]
    _write_curve(curve, folder / "curve.csv")
    rng = np.random.default_rng(0)
    area = torch.from_numpy(rng.uniform(0.05, 0.2, images))
    random_init = area + torch.from_numpy(rng.normal(0, 0.02, images))
    pretrained = random_init + gain + torch.from_numpy(rng.normal(0, 0.02, images))
    heads = {"pretrained": pretrained, "random_init": random_init}
    attention = {
        "images": images, "split": "test", "head_selection": {"split": "val", "images": images},
        "area_share": float(area.mean()),
        **{name: {"best_head": 1, "best": float(m.mean()) + 0.01, "mean_heads": float(m.mean()) - 0.02,
                  "best_above_area": 0.9, "selected_head": 2 if name == "pretrained" else 0,
                  "selected": float(m.mean())} for name, m in heads.items()},
        "selected_head": _paired(pretrained, random_init),
        "mean_of_heads": _paired(pretrained - 0.02, random_init - 0.02 + torch.from_numpy(rng.normal(0, 0.01, images))),
    }
    knn = {"k": 20, "temperature": 0.07, "references": {"split": "val", "images": images},
           "queries": {"split": "test", "images": images - 4, "compositions": "seen"},
           "class": {"pretrained": 0.30 + gain, "random_init": 0.30, "majority": 0.0833, "chance": 1 / 24},
           "colour": {"pretrained": 0.55 + gain, "random_init": 0.5, "majority": 0.2, "chance": 1 / 6},
           "background": {"pretrained": 0.9, "random_init": 0.95, "majority": 0.4, "chance": 1 / 3}}
    last = curve[-1]
    metrics = {
        "backbone": {"name": "vit_small_patch14_reg4_dinov2", "img_size": 56, "model_kwargs": {"embed_dim": 48},
                     "description": "tiny self-supervised (demo)"},
        "checkpoint": "model.safetensors",
        "pool": {"split": "train", "images": 64, "image_size": 56},
        "epochs": epochs,
        "steps": int(last["step"]),
        "final": {"loss": last["loss"], "teacher_entropy": last["teacher_entropy"], "log_k": log_k,
                  "teacher_entropy_over_log_k": last["teacher_entropy"] / log_k,
                  "teacher_marginal_entropy": last["teacher_marginal_entropy"],
                  "center_norm": last["center_norm"], "crops_per_s": last["crops_per_s"]},
        "probe": {"attention": attention, "knn": knn},
        "seconds": {"render": 0.5, "pretrain": 12.0, "probe": 3.0, "total": 15.5},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

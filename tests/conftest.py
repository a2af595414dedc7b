"""Shared test settings: offline, no analytics, small threads; paths to real test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The real COCO subset beside the repo; tests that need it skip when it is absent."""
    path = SHARED_ASSETS / "coco-mini"
    if not (path / "annotations").is_dir():
        pytest.skip(f"real COCO test data not found at {path}")
    return path


TINY_BACKBONE = "{embed_dim: 48, depth: 2, num_heads: 3}"


def tiny_overrides(root: Path, clip_dir: Path, **extra: str) -> list[str]:
    """Dotted overrides that shrink every stage to a smoke run under ``root``."""
    clip = f"local-dir:{clip_dir}"
    base = {
        "tracking.uri": f"sqlite:///{root / 'mlruns.db'}",
        "data.synthetic.n_train": "24",
        "data.synthetic.n_val": "4",
        "data.synthetic.n_test": "12",
        "data.synthetic.image_size": "112",
        "prepare.out_dir": str(root / "pairs"),
        "backbone.model_kwargs": TINY_BACKBONE,
        "backbone.img_size": "56",
        "clip.name": clip,
        "embed.pairs_dir": str(root / "pairs"),
        "embed.out_dir": str(root / "features"),
        "embed.img_size": "56",
        "embed.batch_size": "8",
        "embed.decode_batch_size": "8",
        "embed.shard_rows": "10",
        "embed.loader_workers": "0",
        "embed.text_encoders": f"[{{key: clip, kind: open_clip, name: '{clip}'}}]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny open_clip CLIP saved as a ``local-dir:`` checkpoint (the layout
    the teacher stage writes), so tests load CLIP exactly as the pipeline does."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from dinoalign.config import TeacherConfig
    from dinoalign.teacher import model_cfg, save_teacher

    cfg = TeacherConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                        text_width=32, text_layers=1, text_heads=2)
    torch.manual_seed(0)
    mc = model_cfg(cfg)
    model = CLIP(mc["embed_dim"], CLIPVisionCfg(**mc["vision_cfg"]), CLIPTextCfg(**mc["text_cfg"]))
    return save_teacher(model, cfg, tmp_path_factory.mktemp("tiny_clip"))

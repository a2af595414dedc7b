"""The align params section, the learning-rate schedules and the batch sampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoalign.config import ConfigError, load_params
from dinoalign.recipes import RECIPES, DinoTxtConfig, Talk2DINOConfig, build
from dinoalign.train.data import EpochSampler, model_config
from dinoalign.train.optim import WarmupSchedule, build_optimizer, build_scheduler

MISSING = Path("/nonexistent-dinoalign/params.yaml")

# A feature store manifest spec as the embed stage writes it (the parts align reads).
SPEC = {
    "backbone": {"name": "vit_small_patch14_reg4_dinov2", "embed_dim": 48, "num_heads": 3},
    "columns": {
        "cls": [48],
        "token_mean": [48],
        "head_embeddings": [3, 48],
        "registers": [4, 48],
        "patches": [16, 48],
        "clip_image": [32],
        "text_clip": [32],
    },
}


def test_repo_params_have_an_align_section_for_every_recipe(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml", ["align.recipe=dinotxt"])
    assert params.align.training is params.align.dinotxt
    for name in RECIPES.names():
        section = getattr(params.align, name)
        assert section.recipe == name
        assert not set(section.model) & set(section.inferred_model_fields)


def test_defaults_follow_the_papers() -> None:
    align = load_params(MISSING).align
    t2d = align.talk2dino
    assert (t2d.optimizer, t2d.lr, t2d.batch_size, t2d.schedule, t2d.epochs) == ("adam", 1e-4, 128, "constant", 100)
    txt = align.dinotxt
    assert (txt.optimizer, tuple(txt.betas), txt.weight_decay, txt.schedule) == ("adamw", (0.9, 0.99), 1e-4, "cosine")
    assert align.projector.schedule == "onecycle"


@pytest.mark.parametrize(
    "override, message",
    [
        ("align.talk2dino.model={vision_dim: 768}", "manifest.json"),
        ("align.dinotxt.model={num_registers: 0}", "manifest.json"),
        ("align.projector.checkpoint_every=30", "multiple of log_every"),
        ("align.dinotxt.inputs=pixels", "inputs must be one of"),
        ("align.dinotxt.crop_scale=[0.9, 0.5]", "crop_scale"),
        ("align.talk2dino.schedule=linear", "schedule must be one of"),
        ("align.recipe=clip", "align.recipe must be one of"),
        ("align.max_failures=-2", "max_failures"),
        ("align.torch_threads=0", "torch_threads must be >= 1"),
    ],
)
def test_bad_align_params_are_rejected(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_params(MISSING, [override])


def test_global_batch_must_split_over_workers() -> None:
    with pytest.raises(ConfigError, match="multiple of align.num_workers"):
        load_params(MISSING, ["align.recipe=talk2dino", "align.num_workers=3"])
    load_params(MISSING, ["align.recipe=talk2dino", "align.num_workers=4"])


def test_a_run_without_a_recipe_says_how_to_pick_one() -> None:
    with pytest.raises(ValueError, match=r"align.recipe=<name>"):
        load_params(MISSING).align.training


def test_model_dims_come_from_the_features_spec() -> None:
    align = load_params(
        MISSING, ["align.talk2dino.model={projection: linear}", "align.dinotxt.model={text_layers: 1}"]
    ).align
    t2d = model_config("talk2dino", align.talk2dino, SPEC)
    assert t2d == Talk2DINOConfig(text_dim=32, vision_dim=48, projection="linear")
    txt = model_config("dinotxt", align.dinotxt, SPEC)
    assert (txt.vision_dim, txt.vision_heads, txt.num_registers, txt.text_layers) == (48, 3, 4, 1)
    projector = RECIPES.get("projector")
    assert projector.model_fields_from_features(SPEC, align.projector) == {"vision_dim": 48, "embed_dim": 32}


def test_unknown_model_fields_and_missing_columns_are_clear_errors() -> None:
    align = load_params(MISSING, ["align.projector.model={hidden_dims: 64}"]).align
    with pytest.raises(ConfigError, match="did you mean 'hidden_dim'"):
        model_config("projector", align.projector, SPEC)
    no_patches = {**SPEC, "columns": {k: v for k, v in SPEC["columns"].items() if k != "registers"}}
    with pytest.raises(ValueError, match="embed.keep_patches: true"):
        RECIPES.get("dinotxt").model_fields_from_features(no_patches, align.dinotxt)


# ----------------------------------------------------------------------------- schedules


def test_warmup_then_cosine_by_hand() -> None:
    schedule = WarmupSchedule(warmup_steps=4, total_steps=20, cosine=True)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in (4, 9, 14, 19):
        t = (s - 4) / 16
        assert schedule(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))
    constant = WarmupSchedule(warmup_steps=2, total_steps=20, cosine=False)
    assert [constant(s) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]


def _optimiser(schedule: str, warmup: int = 0):
    cfg = load_params(MISSING, [f"align.dinotxt.schedule={schedule}", f"align.dinotxt.warmup_steps={warmup}",
                                "align.dinotxt.lr=0.01"]).align.dinotxt
    model = build("talk2dino", Talk2DINOConfig(text_dim=4, vision_dim=6))
    optimizer = build_optimizer(model, cfg)
    return optimizer, build_scheduler(optimizer, cfg, total_steps=10)


def test_schedules_drive_the_optimiser_and_their_state_loads_weights_only(tmp_path: Path) -> None:
    optimizer, scheduler = _optimiser("cosine", warmup=2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([0.005, 0.01]) and lrs[-1] < 0.001
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    _, fresh = _optimiser("cosine", warmup=2)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.get_last_lr() == scheduler.get_last_lr()

    optimizer, onecycle = _optimiser("onecycle", warmup=3)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        onecycle.step()
    assert max(lrs) == pytest.approx(0.01) and lrs.index(max(lrs)) == 2  # step warmup - 1
    torch.save(onecycle.state_dict(), tmp_path / "o.pt")
    assert torch.load(tmp_path / "o.pt", weights_only=True)["last_epoch"] == 10


def test_weight_decay_only_on_matrices() -> None:
    cfg = load_params(MISSING).align.dinotxt
    model = build("dinotxt", DinoTxtConfig(vision_dim=16, vision_heads=2, num_registers=0, text_width=16,
                                          text_layers=1, text_heads=2, context_length=8))
    optimizer = build_optimizer(model, cfg)
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and all(p.ndim >= 2 for p in decayed[0]["params"])
    assert optimizer.defaults["betas"] == (0.9, 0.99)


# ----------------------------------------------------------------------------- sampler


def test_ranks_split_each_global_batch_and_epochs_reshuffle() -> None:
    ranks = [EpochSampler(50, batch_size=12, world_size=3, rank=r, seed=7) for r in range(3)]
    assert ranks[0].steps_per_epoch == 4 and ranks[0].local_batch_size == 4
    seen = []
    for step in range(4):
        parts = [s.rows(0, step) for s in ranks]
        assert all(len(p) == 4 for p in parts)
        seen.extend(np.concatenate(parts).tolist())
    assert len(set(seen)) == 48  # disjoint across ranks and steps; 2 samples dropped
    assert not np.array_equal(ranks[0].rows(0, 0), ranks[0].rows(1, 0))
    again = EpochSampler(50, batch_size=12, world_size=3, rank=0, seed=7)
    assert np.array_equal(again.rows(1, 2), ranks[0].rows(1, 2))


def test_a_batch_larger_than_the_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="lower the recipe's batch_size"):
        EpochSampler(10, batch_size=16)

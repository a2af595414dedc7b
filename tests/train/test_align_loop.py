"""The shared training loop in one process: resume equals an uninterrupted run, bad
losses and foreign checkpoints are clear errors, logging follows log_every."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from dinoalign.config import load_params
from dinoalign.recipes import DinoTxtConfig, ProjectorConfig, Talk2DINOConfig, load_recipe
from dinoalign.train.data import (
    CaptionTokens,
    Draw,
    DinoTxtTokenData,
    ProjectorData,
    Talk2DINOData,
    TrainingData,
)
from dinoalign.train.loop import Trainer, TrainJob, read_trainer_state

MISSING = Path("/nonexistent-dinoalign/params.yaml")
WORDS = ["red", "blue", "green", "circle", "square", "star", "above", "below"]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Bitwise-reproducible CPU kernels and no contention on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _data(recipe: str, seed: int = 0) -> tuple[object, TrainingData]:
    rng = np.random.default_rng(seed)
    if recipe == "talk2dino":
        images = rng.standard_normal((20, 3, 8)).astype(np.float32)
        data = Talk2DINOData(
            text=rng.standard_normal((60, 6)).astype(np.float32),
            image_index=np.repeat(np.arange(20), 3),
            head_embeddings=images,
        )
        return Talk2DINOConfig(text_dim=6, vision_dim=8), data
    if recipe == "projector":
        data = ProjectorData(
            token_mean=rng.standard_normal((40, 8)).astype(np.float32),
            clip_image=rng.standard_normal((40, 5)).astype(np.float32),
        )
        return ProjectorConfig(vision_dim=8, embed_dim=5, hidden_dim=16, depth=1, bottleneck_dim=8), data
    cfg = DinoTxtConfig(vision_dim=16, vision_heads=2, num_registers=1, text_width=16, text_layers=1,
                        text_heads=2, context_length=12, drop_path=0.2)
    captions = [" ".join(rng.choice(WORDS, size=3)) for _ in range(48)]
    tokens = open_clip.get_tokenizer(cfg.tokenizer, context_length=12)(captions).numpy().astype(np.int32)
    data = DinoTxtTokenData(
        cls=rng.standard_normal((24, 16)).astype(np.float32),
        registers=rng.standard_normal((24, 1, 16)).astype(np.float16),
        patches=rng.standard_normal((24, 4, 16)).astype(np.float16),
        captions=CaptionTokens(tokens=tokens, start=np.arange(24) * 2, count=np.full(24, 2)),
    )
    return cfg, data


def _job(recipe: str, seed: int = 3, **training: object) -> TrainJob:
    overrides = {"batch_size": 8, "epochs": 3, "log_every": 2, "checkpoint_every": 4, "lr": 3e-3,
                 "warmup_steps": 2, **training}
    section = load_params(MISSING, [f"align.{recipe}.{k}={v}" for k, v in overrides.items()]).align
    model_cfg, data = _data(recipe)
    return TrainJob(recipe=recipe, model_config=model_cfg, training=getattr(section, recipe), seed=seed, data=data)


class _Stop(Exception):
    """Ends a run right after its first checkpoint (a crash)."""


def _run(trainer: Trainer, stop_after_checkpoint_in: Path | None = None) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []

    def checkpoint(t: Trainer) -> None:
        if stop_after_checkpoint_in is not None:
            t.save(stop_after_checkpoint_in)
            raise _Stop

    try:
        trainer.run(on_log=rows.append, on_checkpoint=checkpoint)
    except _Stop:
        pass
    return rows


def _without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


@pytest.mark.parametrize("recipe", ["talk2dino", "dinotxt", "projector"])
def test_resumed_run_matches_an_uninterrupted_one(recipe: str, tmp_path: Path) -> None:
    job = _job(recipe)
    reference = Trainer(job, job.data)
    full = _run(reference)
    total = reference.total_steps
    expected_steps = sorted(set(range(2, total + 1, 2)) | {total})  # every log_every, and the end
    assert [r["step"] for r in full] == expected_steps and reference.step == total

    crashed = Trainer(job, job.data)
    head = _run(crashed, stop_after_checkpoint_in=tmp_path)
    assert crashed.step == 4 and len(head) == 2
    state = read_trainer_state(tmp_path)
    assert state["step"] == 4 and state["curve"] == head

    resumed = Trainer(job, job.data)
    resumed.restore(tmp_path)
    tail = _run(resumed)
    assert _without_timing(resumed.curve) == _without_timing(full)  # head from the checkpoint
    assert _without_timing(tail) == _without_timing(full[2:])  # bitwise the same losses
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert full[0]["loss"] != full[-1]["loss"]


def test_checkpoints_are_loadable_models(tmp_path: Path) -> None:
    job = _job("projector")
    trainer = Trainer(job, job.data)
    _run(trainer)
    trainer.save(tmp_path)
    model = load_recipe(str(tmp_path))
    batch = job.data.batch(np.arange(4), Draw(seed=0, epoch=0, step=0, rank=0))
    torch.testing.assert_close(model.encode_image(batch), trainer.model.encode_image(batch))


def test_another_setup_cannot_resume_the_checkpoint(tmp_path: Path) -> None:
    job = _job("talk2dino")
    _run(Trainer(job, job.data), stop_after_checkpoint_in=tmp_path)
    longer = _job("talk2dino", epochs=5)
    with pytest.raises(ValueError, match="another align.run_name"):
        Trainer(longer, longer.data).restore(tmp_path)


def test_a_non_finite_loss_stops_with_a_clear_error() -> None:
    job = _job("talk2dino")
    job.data.text[:] = np.nan
    with pytest.raises(FloatingPointError, match="lower align.talk2dino.lr"):
        _run(Trainer(job, job.data))


def test_rows_average_the_window_and_record_the_schedule() -> None:
    job = _job("projector", log_every=3, checkpoint_every=3, schedule="constant", warmup_steps=0, epochs=2)
    trainer = Trainer(job, job.data)
    losses: list[float] = []
    original = trainer.forward

    def recording(batch):  # the loss of every step, to check the window means
        loss, stats = original(batch)
        losses.append(stats["loss"])
        return loss, stats

    trainer.forward = recording
    rows = _run(trainer)
    assert trainer.total_steps == 10 and [r["step"] for r in rows] == [3, 6, 9, 10]
    assert rows[0]["loss"] == pytest.approx(sum(losses[:3]) / 3)
    assert rows[-1]["loss"] == pytest.approx(losses[9])
    assert rows[-1]["epoch"] == 2.0 and all(r["lr"] == pytest.approx(3e-3) for r in rows)
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_align_progress_is_a_dozen_lines_with_what_open_clip_shows() -> None:
    """Rank 0 prints a curve row for the first row, each tenth of the run and the last
    (and at least once a minute): about a dozen lines whatever log_every is, each with
    step, epoch, loss, lr, logit scale and samples/s."""
    import math

    from dinoalign.train.loop import ProgressPrinter

    lines: list[str] = []
    progress = ProgressPrinter("align@talk2dino", total_steps=1000, epochs=20, every_s=math.inf, out=lines.append)
    for step in range(5, 1001, 5):
        progress({"step": float(step), "epoch": step / 50, "loss": 5.0 - step / 1000, "lr": 3e-3,
                  "samples_per_s": 2048.0, "logit_scale": 14.29, "t2i_accuracy": 0.25})
    assert len(lines) == 11, lines
    assert lines[0] == ("align@talk2dino: step 5/1000 (0%) epoch 0.1/20 loss 4.9950 lr 3.00e-03 logit scale 14.29 "
                        "2048 samples/s t2i_accuracy 0.25")
    assert lines[-1].startswith("align@talk2dino: step 1000/1000 (100%) epoch 20.0/20 loss 4.0000")
    # projector: no logit scale; a minute without a line prints one anyway
    lines.clear()
    progress = ProgressPrinter("align@projector", total_steps=1000, epochs=20, every_s=0.0, out=lines.append)
    for step in (1, 2, 3):
        progress({"step": float(step), "epoch": 0.0, "loss": 0.01, "lr": 1e-4, "samples_per_s": 10.0, "cosine": 0.5})
    assert len(lines) == 3 and "logit scale" not in lines[0] and lines[0].endswith("10 samples/s cosine 0.5")

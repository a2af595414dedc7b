"""The training loop shared by the three recipes, and its Ray Train driver.

:class:`Trainer` is the loop itself: build the recipe, the optimiser and the schedule,
deal batches with :class:`~dinoalign.train.data.EpochSampler`, step, log a row every
``log_every`` steps and hand a checkpoint out every ``checkpoint_every`` steps. It runs
as-is in one process (tests, benchmarks) and inside each Ray Train worker
(:func:`train_worker`), where the model is wrapped in DDP (gloo on CPU, nccl on GPU) and
checkpoints go through ``ray.train.report`` to ``storage_path``.

A checkpoint is a directory holding the recipe's own save format (``model.safetensors``
+ ``config.json``, loadable with ``load_recipe``) and ``trainer_state.pt`` (optimiser,
scheduler, step, epoch, the curve so far, seed, MLflow run id; tensors and plain values
only, read with ``weights_only=True``). The RNG needs no state of its own: every draw
is keyed by ``(seed, step, rank)`` (:func:`~dinoalign.train.data.derive_seed`), so the
step *is* the RNG position, and resuming at step s replays the batches, crops and
drop-path masks of an uninterrupted run from s on.

Re-running :func:`fit` with the same run name and storage path resumes from the latest
checkpoint (Ray Train V2 finds it); ``FailureConfig(max_failures)`` restarts a crashed
worker group from it within one ``fit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dinoalign.ray_runtime import init_ray, require_resources, worker_print
from dinoalign.recipes import Recipe, build
from dinoalign.recipes.base import CONFIG_FILE, WEIGHTS_FILE
from dinoalign.storage import pyarrow_fs
from dinoalign.train.config import AlignConfig, RecipeTrainingConfig
from dinoalign.train.data import STEP_STREAM, Draw, EpochSampler, TrainingData, derive_seed
from dinoalign.train.optim import build_optimizer, build_scheduler

TRAINER_STATE = "trainer_state.pt"

LogFn = Callable[[dict[str, float]], None]


@dataclasses.dataclass
class TrainJob:
    """Everything a worker needs to train one recipe (picklable; ``data`` may be a Ray
    ``ObjectRef`` to the :class:`TrainingData`, shared by the workers of a node)."""

    recipe: str
    model_config: Any  # the recipe's config dataclass
    training: RecipeTrainingConfig
    seed: int
    data: Any
    torch_threads: int = 1
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


class Trainer:
    """One recipe's optimisation on one rank of ``world_size``.

    Every rank builds the same initial model (seeded); under DDP the gradients are
    averaged, and dinotxt's loss also gathers the features of all ranks.
    """

    def __init__(
        self,
        job: TrainJob,
        data: TrainingData,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self.job, self.data, self.rank, self.world_size = job, data, rank, world_size
        self.device = device or torch.device("cpu")
        cfg = job.training
        torch.manual_seed(job.seed)
        self.model: Recipe = build(job.recipe, job.model_config).to(self.device)
        self.sampler = EpochSampler(data.num_samples, cfg.batch_size, world_size, rank, job.seed)
        self.total_steps = cfg.epochs * self.sampler.steps_per_epoch
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.forward: torch.nn.Module = self.model
        if world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=device_ids)
        self.step = 0
        self.curve: list[dict[str, float]] = []
        data.attach(self.device, job.seed)

    @property
    def epoch(self) -> float:
        """Epochs done (fractional)."""
        return self.step / self.sampler.steps_per_epoch

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str | Path) -> None:
        """Write the model (recipe save format) and the trainer state under ``directory``."""
        self.model.save(str(directory))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "seed": self.job.seed,
            "curve": self.curve,
            "mlflow_run_id": self.job.mlflow_run_id,
        }
        torch.save(state, Path(directory) / TRAINER_STATE)

    def restore(self, directory: str | Path) -> None:
        """Load a checkpoint written by :meth:`save` of the same training setup."""
        directory = Path(directory)
        saved = json.loads((directory / CONFIG_FILE).read_text())
        state = read_trainer_state(directory)
        mine = dataclasses.asdict(self.job.model_config)
        if saved["config"] != json.loads(json.dumps(mine)) or state["total_steps"] != self.total_steps:
            raise ValueError(
                f"the checkpoint in {directory} was made by another setup (model config "
                f"{saved['config']}, {state['total_steps']} steps) than this run ({mine}, "
                f"{self.total_steps} steps): give this run another align.run_name"
            )
        weights = safetensors.torch.load((directory / WEIGHTS_FILE).read_bytes())
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.curve = list(state["curve"])

    # ------------------------------------------------------------------ the loop

    def run(self, on_log: LogFn, on_checkpoint: Callable[[Trainer], None]) -> None:
        """Train from ``self.step`` to ``total_steps``. Every ``log_every`` steps (and at
        the end) the window's mean statistics, averaged over ranks, become a curve row
        passed to ``on_log``; every ``checkpoint_every`` steps (and at the end)
        ``on_checkpoint(self)`` runs on every rank."""
        cfg = self.job.training
        spe = self.sampler.steps_per_epoch
        self.model.train()
        window = _Window()
        while self.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.step, spe)
            torch.manual_seed(derive_seed(self.job.seed, STEP_STREAM, self.step, self.rank))
            draw = Draw(self.job.seed, epoch, step_in_epoch, self.rank)
            batch = self.data.batch(self.sampler.rows(epoch, step_in_epoch), draw)
            loss, stats = self.forward(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{self.job.recipe}: the loss is {loss.item()} at step {self.step}; "
                    f"lower align.{self.job.recipe}.lr or check the features for NaNs"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.step += 1
            window.add(stats, lr)
            last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or last:
                row = window.row(self.world_size, cfg.batch_size)
                row.update(step=float(self.step), epoch=self.epoch)
                self.curve.append(row)
                on_log(row)
                window = _Window()
            if self.step % cfg.checkpoint_every == 0 or last:
                on_checkpoint(self)
                window.restart_clock()
        self.model.eval()


class _Window:
    """Sums of the recipe's statistics over the steps since the last log row."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.lr = 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def add(self, stats: dict[str, float], lr: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        self.lr = lr

    def row(self, world_size: int, global_batch: int) -> dict[str, float]:
        """Means over the window's steps and over ranks, the lr of its last step, and
        global samples/s over the slowest rank's wall time (DDP waits for it)."""
        keys = sorted(self.sums)
        sums = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        seconds = torch.tensor([time.perf_counter() - self.start], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        row = dict(zip(keys, (sums / (self.steps * world_size)).tolist(), strict=True))
        row["lr"] = self.lr
        row["samples_per_s"] = global_batch * self.steps / max(seconds.item(), 1e-9)
        return row


# A progress line for the first curve row, each tenth of the run, at least once a minute
# and at the end: about a dozen lines per run, whatever log_every is
PROGRESS_EVERY_S = 60.0
# curve columns the line shows by their own words; the recipe's other statistics follow
_PROGRESS_KNOWN = ("step", "epoch", "loss", "lr", "samples_per_s", "logit_scale")


class ProgressPrinter:
    """Prints curve rows worth showing as one line each (``out``: :func:`worker_print`, so
    that the driver shows a Ray Train worker's line as its own), as open_clip does: step,
    epoch, loss, lr, logit scale, samples/s."""

    def __init__(
        self, label: str, total_steps: int, epochs: int, every_s: float = PROGRESS_EVERY_S,
        out: Callable[[str], None] = worker_print,
    ) -> None:
        self.label, self.total, self.epochs, self.every_s, self.out = label, total_steps, epochs, every_s, out
        self.last_tenth, self.last_time = -1, -math.inf

    def __call__(self, row: dict[str, float]) -> None:
        step, now = int(row["step"]), time.monotonic()
        tenth = 10 * step // max(self.total, 1)
        if step >= self.total or tenth > self.last_tenth or now - self.last_time >= self.every_s:
            self.last_tenth, self.last_time = tenth, now
            self.out(format_progress(self.label, row, self.total, self.epochs))


def format_progress(label: str, row: dict[str, float], total_steps: int, epochs: int) -> str:
    """``align@talk2dino: step 40/2100 (2%) epoch 0.6/30 loss 4.6066 lr 3.00e-03 logit
    scale 13.71 28094 samples/s t2i_accuracy 0.0309 ...``"""
    step = int(row["step"])
    parts = [
        f"{label}: step {step}/{total_steps} ({100 * step // max(total_steps, 1)}%)",
        f"epoch {row.get('epoch', 0.0):.1f}/{epochs}",
        f"loss {row['loss']:.4f}",
        f"lr {row.get('lr', 0.0):.2e}",
    ]
    if "logit_scale" in row:
        parts.append(f"logit scale {row['logit_scale']:.2f}")
    parts.append(f"{row.get('samples_per_s', 0.0):.0f} samples/s")
    parts += [f"{k} {v:.4g}" for k, v in sorted(row.items()) if k not in _PROGRESS_KNOWN]
    return " ".join(parts)


def _both(first: LogFn, second: LogFn) -> LogFn:
    def log(row: dict[str, float]) -> None:
        first(row)
        second(row)

    return log


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint directory (tensors and plain values only)."""
    return torch.load(Path(directory) / TRAINER_STATE, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- Ray Train


class MlflowMetricLogger:
    """Logs curve rows to one MLflow run by id (rank 0 of a Ray Train worker group)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def __call__(self, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(row["step"])
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "step" and math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """``train_loop_per_worker`` of the TorchTrainer: one rank of the DDP group.

    Resumes from ``ray.train.get_checkpoint()`` when there is one; rank 0 logs the curve
    to MLflow and writes each checkpoint; every rank calls ``ray.train.report`` (a
    barrier). Returns (rank 0's value is ``Result.return_value``) the curve, the step it
    started from (0, or the checkpoint's) and the world size."""
    import ray
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.torch_threads)
    data = ray.get(job.data) if isinstance(job.data, ray.ObjectRef) else job.data
    trainer = Trainer(job, data, rank, world_size, ray.train.torch.get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(directory)
    log: LogFn = (
        MlflowMetricLogger(job.tracking_uri, job.mlflow_run_id)
        if rank == 0 and job.tracking_uri and job.mlflow_run_id
        else _no_log
    )
    if rank == 0:
        log = _both(log, ProgressPrinter(f"align@{job.recipe}", trainer.total_steps, job.training.epochs))
    start_step = trainer.step
    trainer.run(on_log=log, on_checkpoint=_report_checkpoint)
    return {"curve": trainer.curve, "step": trainer.step, "start_step": start_step, "world_size": world_size,
            "torch_threads": torch.get_num_threads()}


def _no_log(row: dict[str, float]) -> None:
    """Ranks other than 0 do not log (their rows are the same all-reduced means)."""


def _report_checkpoint(trainer: Trainer) -> None:
    import ray.train

    last = trainer.curve[-1] if trainer.curve else {}
    metrics = {"step": trainer.step, "epoch": trainer.epoch, "loss": last.get("loss", math.nan)}
    with tempfile.TemporaryDirectory(prefix="dinoalign-ckpt-") as directory:
        checkpoint = None
        if trainer.rank == 0:
            trainer.save(directory)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{trainer.step:09d}")


def fit(
    job: TrainJob,
    align: AlignConfig,
    run_name: str,
    storage_path: str,
    callbacks: Iterable[Any] = (),
) -> Any:
    """Train ``job`` with a Ray Train ``TorchTrainer``; returns its ``Result``.

    ``storage_path``: absolute local directory or ``s3://`` URI (S3 settings from the
    environment, :mod:`dinoalign.storage`). ``callbacks``: Ray Train ``UserCallback``s.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    require_resources(
        f"align ({align.num_workers} worker(s) of {align.cpus_per_worker:g} CPU{', 1 GPU' if align.use_gpu else ''})",
        {"CPU": align.cpus_per_worker, "GPU": 1.0 if align.use_gpu else 0.0, **align.worker_resources},
        align.num_workers,
        "lower align.num_workers, align.cpus_per_worker or align.worker_resources, set align.use_gpu=false, "
        "or run on a cluster that has "
        "them (RAY_ADDRESS)",
    )
    filesystem, path = pyarrow_fs(storage_path)
    job = dataclasses.replace(
        job, data=ray.put(job.data), torch_threads=align.torch_threads or max(1, int(align.cpus_per_worker))
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if align.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=align.num_workers,
            use_gpu=align.use_gpu,
            resources_per_worker={"CPU": align.cpus_per_worker, **align.worker_resources},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=align.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=align.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


def latest_checkpoint(storage_path: str, run_name: str) -> Any:
    """The latest Ray Train checkpoint of run ``run_name`` under ``storage_path``, or None
    when the run has none (never started, or stopped before its first checkpoint)."""
    from ray.train import Result

    filesystem, path = pyarrow_fs(storage_path)
    try:
        result = Result.from_path(f"{path.rstrip('/')}/{run_name}", storage_filesystem=filesystem)
    except RuntimeError:  # no such run folder, or no checkpoint registered in it yet
        return None
    return result.checkpoint

"""The align stage: one recipe (``align.recipe``) trained on the train-split features
with Ray Train, tracked in MLflow and registered as ``dinoalign-<recipe>@candidate``.

    dinoalign align align.recipe=talk2dino        # = python stages/align.py align.recipe=...

Outputs: ``<align.out_dir>/<recipe>/`` (``model.safetensors`` + ``config.json``, read by
``dinoalign.recipes.load_recipe``), ``<align.curves_dir>/<recipe>/curve.csv`` (one row per
``log_every`` steps) and ``metrics.json``. The run is named ``<recipe>-<hash>`` (the hash
covers the model config, the training section, the seed, the feature spec and the train
uids), so re-running after a crash resumes from the latest checkpoint in
``align.storage_path`` and continues the same MLflow run, while any change that would
make other batches starts afresh.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dinoalign.config import Params
from dinoalign.data.images import image_limits
from dinoalign.data.prepare import read_manifest
from dinoalign.recipes import load_recipe
from dinoalign.recipes.base import CONFIG_FILE, WEIGHTS_FILE
from dinoalign.storage import is_remote
from dinoalign.tracking import run_url, stage_run, tracking_uri
from dinoalign.train.config import RecipeTrainingConfig
from dinoalign.train.data import (
    FeatureSource,
    TrainingData,
    TrainSelection,
    build_training_data,
    model_config,
    read_spec,
    train_uids,
    uids_digest,
)
from dinoalign.train.loop import TrainJob, fit, latest_checkpoint, read_trainer_state

MODEL_ALIAS = "candidate"
MODEL_ARTIFACT = "model"
CURVE_FILE = "curve.csv"
METRICS_FILE = "metrics.json"


def registered_model_name(recipe: str) -> str:
    """The MLflow registry name of a recipe's models."""
    return f"dinoalign-{recipe}"


@dataclasses.dataclass(frozen=True)
class AlignPlan:
    """What one align run trains on and where its checkpoints go."""

    recipe: str
    training: RecipeTrainingConfig
    model_config: Any
    data: TrainingData
    selection: TrainSelection
    spec_hash: str
    run_name: str
    storage_path: str  # absolute local path or s3:// URI


def plan_align(params: Params, root: Path) -> AlignPlan:
    """Resolve ``align.recipe`` against the features: train uids, model dims, samples."""
    cfg = params.align
    training = cfg.training
    recipe = cfg.recipe
    assert recipe is not None  # cfg.training raised otherwise
    features = _resolve(root, params.embed.out_dir)
    spec = read_spec(features)
    manifest = read_manifest(root / params.embed.pairs_dir)
    selection = train_uids(manifest, _resolve(root, cfg.curated) if cfg.curated else None)
    model_cfg = model_config(recipe, training, spec)
    source = FeatureSource(features, spec, manifest, selection.uids, root)
    data = build_training_data(
        recipe,
        training,
        model_cfg,
        source,
        image_limits=image_limits(params.data),
        seed=params.seed,
    )
    identity = {
        "recipe": recipe,
        "model": dataclasses.asdict(model_cfg),
        "training": dataclasses.asdict(training),
        "seed": params.seed,
        "features": spec["spec_hash"],
        "uids": uids_digest(selection.uids),
    }
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=6).hexdigest()
    return AlignPlan(
        recipe=recipe,
        training=training,
        model_config=model_cfg,
        data=data,
        selection=selection,
        spec_hash=spec["spec_hash"],
        run_name=cfg.run_name or f"{recipe}-{digest}",
        storage_path=_resolve(root, cfg.storage_path),
    )


def run_align(params: Params, root: Path, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """Train ``align.recipe`` (resuming its run when a checkpoint exists), export the
    model, write the curve and metrics, log and register it. ``callbacks``: Ray Train
    ``UserCallback``s passed to the trainer."""
    plan = plan_align(params, root)
    previous = latest_checkpoint(plan.storage_path, plan.run_name)
    resume_id = _resumable_mlflow_run(params, previous)
    counts = plan.data.describe()
    with stage_run("align", params, run_name=f"align@{plan.recipe}", resume_run_id=resume_id) as run:
        mlflow.set_tags(
            {
                "dinoalign.recipe": plan.recipe,
                "dinoalign.align_run": plan.run_name,
                "dinoalign.checkpoints": f"{plan.storage_path.rstrip('/')}/{plan.run_name}",
                "dinoalign.curated": plan.selection.curated or "none",
                "dinoalign.resumed": str(previous is not None).lower(),
            }
        )
        if resume_id is None:
            mlflow.log_params({f"model.{k}": v for k, v in dataclasses.asdict(plan.model_config).items()})
        mlflow.log_metrics(
            {
                "data.train_uids": len(plan.selection.uids),
                "data.train_split_uids": plan.selection.n_train,
                **{f"data.{k}": v for k, v in counts.items()},
            }
        )
        job = TrainJob(
            recipe=plan.recipe,
            model_config=plan.model_config,
            training=plan.training,
            seed=params.seed,
            data=plan.data,
            tracking_uri=mlflow.get_tracking_uri(),
            mlflow_run_id=run.info.run_id,
        )
        result = fit(job, params.align, plan.run_name, plan.storage_path, callbacks)
        model_dir = root / params.align.out_dir / plan.recipe
        export_model(result.checkpoint, model_dir)
        load_recipe(str(model_dir))  # the exported files are a loadable model
        outcome = result.return_value
        curve = outcome["curve"]
        curves_dir = root / params.align.curves_dir / plan.recipe
        write_curve(curve, curves_dir / CURVE_FILE)
        summary = {
            "recipe": plan.recipe,
            "run_name": plan.run_name,
            "steps": outcome["step"],
            "workers": outcome["world_size"],
            "torch_threads": outcome["torch_threads"],  # per worker
            "epochs": plan.training.epochs,
            "final_loss": curve[-1]["loss"],
            "mean_samples_per_s": sum(r["samples_per_s"] for r in curve) / len(curve),
            "train_uids": len(plan.selection.uids),
            **{f"train_{k}": v for k, v in counts.items()},
            "feature_spec": plan.spec_hash,
            "curated": plan.selection.curated,
            "resumed": previous is not None,
            "resumed_from_step": outcome["start_step"],
            "mlflow_run_id": run.info.run_id,
        }
        mlflow.log_metrics({f"final.{k}": summary[k] for k in ("final_loss", "mean_samples_per_s")})
        mlflow.log_artifacts(str(model_dir), MODEL_ARTIFACT)
        mlflow.log_artifact(str(curves_dir / CURVE_FILE))
        summary["model_version"] = register_model(plan.recipe, run.info.run_id, plan.run_name)
        (curves_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        summary["mlflow_run"] = run_url(run)
    return summary


def export_model(checkpoint: Any, model_dir: Path) -> None:
    """Copy the model files of a Ray Train checkpoint (local or S3) to ``model_dir``,
    replacing what was there."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    with checkpoint.as_directory() as directory:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copyfile(Path(directory) / name, model_dir / name)


def write_curve(curve: list[dict[str, float]], path: Path) -> None:
    """The curve rows as CSV: step, epoch, loss, lr, samples_per_s, then the recipe's
    other statistics (the DVC plot of the stage)."""
    first = ["step", "epoch", "loss", "lr", "samples_per_s"]
    columns = first + sorted(set(curve[0]) - set(first))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in curve:
            writer.writerow({k: (int(row[k]) if k == "step" else f"{row[k]:.6g}") for k in columns})


def register_model(recipe: str, run_id: str, run_name: str) -> str:
    """Register the active run's ``model`` artifact folder as a new version of
    ``dinoalign-<recipe>`` and point the ``candidate`` alias at it; returns the version."""
    client = MlflowClient()
    name = registered_model_name(recipe)
    try:
        client.create_registered_model(
            name, description=f"dinoalign {recipe} models (safetensors + config.json; load_recipe)"
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=mlflow.get_artifact_uri(MODEL_ARTIFACT),
        run_id=run_id,
        tags={"dinoalign.align_run": run_name},
    )
    client.set_registered_model_alias(name, MODEL_ALIAS, version.version)
    return str(version.version)


def _resumable_mlflow_run(params: Params, checkpoint: Any) -> str | None:
    """The MLflow run id stored in ``checkpoint`` when that run still exists in this
    experiment (the tracking store may have been reset since)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        run_id = read_trainer_state(directory)["mlflow_run_id"]
    if not run_id:
        return None
    client = MlflowClient(tracking_uri(params))
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    experiment = client.get_experiment(run.info.experiment_id)
    return run_id if experiment.name == params.tracking.experiment else None


def _resolve(root: Path, location: str) -> str:
    """A params location as an absolute local path (relative to the repo root) or URI."""
    return location if is_remote(location) or Path(location).is_absolute() else str(root / location)

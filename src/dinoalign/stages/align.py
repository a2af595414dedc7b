"""The align stage: train one recipe (``align.recipe``) on the train-split features with
Ray Train and register it in MLflow as ``dinoalign-<recipe>@candidate``.

    dvc repro align@talk2dino
    dinoalign align align.recipe=talk2dino [section.key=value ...]   # = python stages/align.py ...

Reads the features (``paths.features``), the pairs manifest (``paths.pairs``) and the
curated uids (``<paths.curated>/uids.parquet``, when present and ``align.use_curated``);
writes ``<paths.models>/<recipe>/`` (``model.safetensors`` + ``config.json``) and
``<paths.curves>/<recipe>/`` (``curve.csv``, ``metrics.json``). A crashed run resumes
from its latest checkpoint in ``paths.checkpoints`` and continues the same MLflow run (:mod:`dinoalign.train.plan`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dinoalign.config import Params
from dinoalign.curate.tables import UIDS_FILE
from dinoalign.data.images import image_limits
from dinoalign.data.prepare import manifest_digest
from dinoalign.embed.store import FeatureStore
from dinoalign.recipes import load_recipe
from dinoalign.serve import log_model
from dinoalign.storage import under_root, write_atomic
from dinoalign.tracking import (
    MODEL_ARTIFACT,
    log_dataset,
    register_model,
    registered_model_name,
    run_url,
    stage_run,
    tracking_uri,
)
from dinoalign.train.data import uids_digest
from dinoalign.train.loop import TrainJob, fit, latest_checkpoint, read_trainer_state
from dinoalign.train.plan import CURVE_FILE, METRICS_FILE, export_model, plan_align, write_curve


def run(params: Params, root: Path, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """``callbacks``: Ray Train ``UserCallback``s passed to the trainer (tests use them
    to crash a run part-way)."""
    cfg, paths = params.align, params.paths
    curated = f"{under_root(paths.curated, root).rstrip('/')}/{UIDS_FILE}"  # used when it exists
    plan = plan_align(
        cfg, params.seed, image_limits(params.data),
        features=under_root(paths.features, root),
        pairs_dir=under_root(paths.pairs, root),
        curated=curated if cfg.use_curated else None,
        checkpoints=under_root(paths.checkpoints, root),
        root=root,
    )
    model_dir = Path(under_root(paths.models, root)) / plan.recipe
    curves_dir = Path(under_root(paths.curves, root)) / plan.recipe
    previous = latest_checkpoint(plan.storage_path, plan.run_name)
    resume_id = _resumable_mlflow_run(params, previous)
    counts = plan.data.describe()

    with stage_run(f"align@{plan.recipe}", params, resume_run_id=resume_id) as run:
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
            _log_inputs(plan, under_root(paths.pairs, root), under_root(paths.features, root))
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
        print(
            f"align@{plan.recipe}: {plan.training.epochs} epochs over {counts['samples']} samples "
            f"(batch {plan.training.batch_size}) on {cfg.num_workers} Ray Train worker(s)"
            + (f", resuming {plan.run_name}" if previous is not None else ""),
            flush=True,
        )
        result = fit(job, cfg, plan.run_name, plan.storage_path, callbacks)

        export_model(result.checkpoint, model_dir)
        load_recipe(str(model_dir))  # the exported files are a loadable model
        outcome = result.return_value
        curve = outcome["curve"]
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
        mlflow.log_artifact(str(curves_dir / CURVE_FILE))
        logged = log_model(model_dir, params, root, MODEL_ARTIFACT)  # pyfunc: load, serve
        summary["model_id"] = logged.model_id
        summary["weights_sha256"] = logged.info["weights_sha256"]
        summary["registered_model"] = registered_model_name(plan.recipe, params.tracking.experiment)
        summary["model_version"] = register_model(
            plan.recipe, params.tracking.experiment, logged.model_uri,
            {"dinoalign.align_run": plan.run_name, "dinoalign.weights_sha256": logged.info["weights_sha256"]},
        )
        write_atomic(curves_dir / METRICS_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        summary["mlflow_run"] = run_url(run)

    print(
        f"align: {summary['recipe']} {summary['steps']} steps ({summary['epochs']} epochs over "
        f"{summary['train_samples']} samples of {summary['train_uids']} train uids), final loss "
        f"{summary['final_loss']:.4f}, {summary['mean_samples_per_s']:.0f} samples/s -> "
        f"{model_dir} ({summary['registered_model']} version {summary['model_version']} @candidate)\n"
        f"align: MLflow run {summary['mlflow_run']}"
    )
    return summary


def _log_inputs(plan: Any, pairs_dir: str, features: str) -> None:
    """The pairs, the features and the curated uids (when used) as the run's datasets."""
    log_dataset("pairs", f"{pairs_dir}/manifest", manifest_digest(pairs_dir), "training")
    log_dataset("features", features, FeatureStore(features).digest(), "training")
    if plan.selection.curated:
        log_dataset("curated_uids", plan.selection.curated, uids_digest(plan.selection.uids), "training",
                    rows=len(plan.selection.uids))


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

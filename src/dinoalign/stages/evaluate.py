"""The evaluate stage: each recipe of ``evaluate.recipes`` -> ``metrics/<recipe>.json``,
``plots/<recipe>/`` and one MLflow run ``evaluate@<recipe>``.

    dvc repro evaluate@talk2dino
    dinoalign evaluate evaluate.recipes=[talk2dino] [section.key=value ...]   # = python stages/evaluate.py ...

Reads the trained model ``<paths.models>/<recipe>`` and ``evaluate.dataset`` (the demo
world's test split from the pairs and features, or a registered dataset under
``evaluate.root``); writes the metrics (chance next to every number) and the plots
(:mod:`dinoalign.evaluate.outputs` has the layout) under ``paths.metrics`` and
``paths.plots``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import mlflow
import torch

from dinoalign.config import Params
from dinoalign.errors import InferenceError
from dinoalign.evaluate.outputs import numeric_metrics, summary_line, write_outputs
from dinoalign.evaluate.run import EXAMPLES_DIR, STAGE, evaluate_model
from dinoalign.model import AlignedModel
from dinoalign.storage import under_root
from dinoalign.tracking import run_url, stage_run, without_credentials


def run(params: Params, root: Path) -> dict[str, dict[str, Any]]:
    """Evaluate every recipe in ``evaluate.recipes``; returns their metrics by recipe."""
    torch.set_num_threads(params.evaluate.torch_threads)
    return {recipe: evaluate_recipe(params, root, recipe) for recipe in params.evaluate.recipes}


def evaluate_recipe(params: Params, root: Path, recipe: str) -> dict[str, Any]:
    cfg = params.evaluate
    reference = model_reference(params, recipe)
    metrics_path = Path(under_root(params.paths.metrics, root)) / f"{recipe}.json"
    plots_dir = Path(under_root(params.paths.plots, root)) / recipe
    started = time.perf_counter()

    with stage_run(STAGE, params, run_name=f"{STAGE}@{recipe}") as run:
        model = AlignedModel.load(reference, params, root, cfg.device, cfg.batch_size)
        if model.name != recipe:
            raise InferenceError(f"{reference} holds a {model.name} model, not {recipe}")
        shutil.rmtree(plots_dir, ignore_errors=True)  # no stale picture of an earlier run
        evaluation = evaluate_model(model, params, root)
        evaluation.metrics["info"]["seconds"] = time.perf_counter() - started
        evaluation.metrics["info"]["mlflow"] = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": without_credentials(mlflow.get_tracking_uri()),
            "run": run_url(run),
        }
        write_outputs(evaluation, metrics_path, plots_dir)
        mlflow.set_tags({"dinoalign.recipe": recipe, "dinoalign.model_sha256": model.info.weights_sha256})
        mlflow.log_metrics(numeric_metrics(evaluation.metrics))
        mlflow.log_artifact(str(metrics_path))
        if (plots_dir / EXAMPLES_DIR).is_dir():
            mlflow.log_artifacts(str(plots_dir / EXAMPLES_DIR), EXAMPLES_DIR)

    print(
        summary_line(recipe, evaluation.metrics)
        + f"\n{STAGE}@{recipe}: -> {metrics_path}, {plots_dir}/; MLflow run {run_url(run)}"
    )
    return evaluation.metrics


def model_reference(params: Params, recipe: str) -> str:
    """Where ``recipe``'s model is read: ``<paths.models>/<recipe>``, where align writes it."""
    return f"{params.paths.models.rstrip('/')}/{recipe}"

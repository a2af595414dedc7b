"""The evaluate stage: each recipe of ``evaluate.recipes`` -> ``metrics/<recipe>.json``,
``plots/<recipe>/`` and one MLflow run ``evaluate@<recipe>``.

    dvc repro evaluate@talk2dino
    dinoalign evaluate evaluate.recipes=[talk2dino] [section.key=value ...]   # = python stages/evaluate.py ...

Reads the trained model ``<paths.models>/<recipe>`` and ``evaluate.dataset`` (the demo
world's test split from the pairs and features, or a registered dataset under
``evaluate.root``); writes the metrics (chance next to every number) and the plots
(:mod:`dinoalign.evaluate.outputs` has the layout) under ``paths.metrics`` and
``paths.plots``. The measuring is :func:`dinoalign.evaluate.run.evaluate_model`, given the
``evaluate`` section and the :class:`~dinoalign.evaluate.run.EvaluationInputs` resolved
here; ``dinoalign retrain`` evaluates through :func:`evaluate_reference`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import mlflow
import torch

from dinoalign.config import Params
from dinoalign.data.images import image_limits
from dinoalign.data.prepare import read_pairs, split_digest
from dinoalign.errors import InferenceError
from dinoalign.evaluate.config import DEMO_DATASET
from dinoalign.evaluate.headline import details_path, headline
from dinoalign.evaluate.outputs import numeric_metrics, summary_line, write_outputs
from dinoalign.evaluate.run import EXAMPLES_DIR, STAGE, Evaluation, EvaluationInputs, evaluate_model
from dinoalign.model import MLFLOW_SCHEMES, AlignedModel, Towers
from dinoalign.storage import under_root
from dinoalign.tracking import (
    log_dataset,
    record_evaluation,
    registered_model_name,
    run_url,
    stage_run,
    tracking_uri,
    without_credentials,
)


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

    with stage_run(f"{STAGE}@{recipe}", params) as run:
        model = load_aligned_model(params, root, reference)
        eval_set = _log_evaluation_set(params, root)
        if model.name != recipe:
            raise InferenceError(f"{reference} holds a {model.name} model, not {recipe}")
        shutil.rmtree(plots_dir, ignore_errors=True)  # no stale picture of an earlier run
        evaluation = evaluate_model(model, cfg, evaluation_inputs(params, root))
        evaluation.metrics["info"]["seconds"] = time.perf_counter() - started
        evaluation.metrics["info"]["mlflow"] = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": without_credentials(mlflow.get_tracking_uri()),
            "run": run_url(run),
        }
        write_outputs(evaluation, metrics_path, plots_dir)
        mlflow.set_tags({"dinoalign.recipe": recipe, "dinoalign.model_sha256": model.info.weights_sha256,
                         "dinoalign.backbone": model.backbone_description})
        mlflow.log_metrics(numeric_metrics(evaluation.metrics))
        versions = record_evaluation(recipe, params.tracking.experiment, model.info.weights_sha256,
                                     numeric_metrics(headline(evaluation.metrics)), eval_set)
        mlflow.log_artifact(str(metrics_path))
        mlflow.log_artifact(str(details_path(metrics_path.parent, recipe)))
        if (plots_dir / EXAMPLES_DIR).is_dir():
            mlflow.log_artifacts(str(plots_dir / EXAMPLES_DIR), EXAMPLES_DIR)

    name = registered_model_name(recipe, params.tracking.experiment)
    print(
        summary_line(recipe, evaluation.metrics)
        + f"\n{STAGE}@{recipe}: -> {metrics_path}, {plots_dir}/; MLflow run {run_url(run)}\n"
        + (f"{STAGE}@{recipe}: metrics attached to {name} version {', '.join(versions)}" if versions else
           f"{STAGE}@{recipe}: no version of {name} holds these weights (sha256 {model.info.weights_sha256[:12]}...): "
           "metrics attached to no model version")
    )
    return evaluation.metrics


def evaluate_reference(params: Params, root: Path, reference: str) -> Evaluation:
    """The model at ``reference`` measured as :func:`evaluate_recipe` measures it, with no
    MLflow run and no outputs: how ``dinoalign retrain`` compares candidate and champion."""
    model = load_aligned_model(params, root, reference)
    return evaluate_model(model, params.evaluate, evaluation_inputs(params, root))


def load_aligned_model(params: Params, root: Path, reference: str, device: str | None = None) -> AlignedModel:
    """The trained recipe at ``reference`` (a folder or an MLflow model URI) with the frozen
    towers of the params, on ``device`` (default ``evaluate.device``)."""
    cfg = params.evaluate
    towers = Towers.from_sections(params.backbone, params.seed, params.embed, params.clip, params.align)
    uri = tracking_uri(params) if reference.startswith(MLFLOW_SCHEMES) else None
    return AlignedModel.load(reference, towers, root, device or cfg.device, cfg.batch_size, uri)


def evaluation_inputs(params: Params, root: Path) -> EvaluationInputs:
    """The locations and image bounds evaluation reads, resolved against the checkout."""
    return EvaluationInputs(
        pairs=Path(under_root(params.paths.pairs, root)),
        demo_source=params.data.synthetic.source,
        features=under_root(params.paths.features, root),
        plots=Path(under_root(params.paths.plots, root)),
        image_limits=image_limits(params.data),
        root=root,
    )


def _log_evaluation_set(params: Params, root: Path) -> Any:
    """The demo world's evaluation split as the run's dataset (digest: its uids, as
    retrain's ``eval_set``); None for a registered dataset, which has no digest yet."""
    if params.evaluate.dataset != DEMO_DATASET:
        return None
    pairs_dir = under_root(params.paths.pairs, root)
    digest = split_digest(read_pairs(pairs_dir), params.evaluate.split)
    return log_dataset(f"pairs:{params.evaluate.split}", f"{pairs_dir}/manifest", digest, "evaluation")


def model_reference(params: Params, recipe: str) -> str:
    """Where ``recipe``'s model is read: ``<paths.models>/<recipe>``, where align writes it."""
    return f"{params.paths.models.rstrip('/')}/{recipe}"

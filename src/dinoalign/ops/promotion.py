"""Champion/candidate promotion in the MLflow model registry.

The align stage registers every trained model as ``<tracking.experiment>-<recipe>`` with the alias
``candidate``. :func:`decide` evaluates that candidate and the current ``champion`` with
the evaluate stage's own code, on the same fixed evaluation set and the same params, and
applies the rule: promote when ``candidate >= champion - tolerance`` on the recipe's
metric (higher is better), or when there is no champion yet. :func:`apply` moves the
alias and tags both versions; nothing else ever moves ``champion``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from dinoalign.config import Params
from dinoalign.errors import ConfigError
from dinoalign.tracking import CANDIDATE, CHAMPION, registered_model_name

PROMOTE, KEEP = "promote", "keep"
Evaluate = Callable[[str], Mapping[str, Any]]  # model URI -> metrics (evaluate stage layout)


@dataclasses.dataclass
class Decision:
    """What retraining decided for one recipe, with the numbers it decided on."""

    recipe: str
    model: str
    metric: str
    tolerance: float
    eval_set: str
    action: str
    reason: str
    candidate_version: str | None = None
    champion_version: str | None = None
    candidate_value: float | None = None
    champion_value: float | None = None


def rule(candidate: float, champion: float | None, tolerance: float) -> tuple[str, str]:
    """(action, reason) of the promotion rule for metric values (higher is better)."""
    if champion is None:
        return PROMOTE, "no champion yet"
    if candidate >= champion - tolerance:
        return PROMOTE, f"candidate {candidate:.4f} >= champion {champion:.4f} - tolerance {tolerance:g}"
    return KEEP, f"candidate {candidate:.4f} is worse than champion {champion:.4f} by more than {tolerance:g}"


def metric_value(metrics: Mapping[str, Any], key: str) -> float:
    """``metrics["a"]["b"]`` for ``key="a.b"`` as a float; a clear error when it is absent
    or not a number (NaN is written as null by the evaluate stage)."""
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"metric {key!r} is not in the evaluation (top-level keys: {sorted(metrics)})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        raise ConfigError(f"metric {key!r} is {node!r}, not a number: choose another retrain.metrics entry")
    return float(node)


def evaluate_with_stage_code(params: Params, root: Path) -> Evaluate:
    """Evaluate a model URI exactly as the evaluate stage does (same dataset and split)."""

    def evaluate(reference: str) -> Mapping[str, Any]:
        from dinoalign.stages.evaluate import evaluate_reference

        return evaluate_reference(params, root, reference).metrics

    return evaluate


def _version(client: Any, model: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def _pipeline_run(client: Any, version: Any) -> str | None:
    if not version.run_id:
        return None
    return client.get_run(version.run_id).data.tags.get("dinoalign.pipeline_run_id")


def promotion_metric(params: Params, recipe: str) -> str:
    """The metric that decides ``recipe``'s promotion: ``retrain.metrics.<recipe>``, else
    the recipe class's ``promotion_metric``."""
    if recipe in params.retrain.metrics:
        return params.retrain.metrics[recipe]
    from dinoalign.recipes import RECIPES

    return RECIPES.get(recipe).promotion_metric


def decide(client: Any, recipe: str, params: Params, pipeline_run_id: str, eval_set: str,
           evaluate: Evaluate) -> Decision:
    """The decision for ``recipe``: its ``@candidate`` must come from this pipeline run
    (``dinoalign.pipeline_run_id``); it and ``@champion`` are evaluated with ``evaluate``."""
    cfg = params.retrain
    model = registered_model_name(recipe, params.tracking.experiment)
    metric = promotion_metric(params, recipe)
    base = dict(recipe=recipe, model=model, metric=metric, tolerance=cfg.tolerance, eval_set=eval_set)
    candidate = _version(client, model, CANDIDATE)
    if candidate is None:
        return Decision(**base, action=KEEP, reason=f"{model} has no @{CANDIDATE}: did the align stage run?")
    champion = _version(client, model, CHAMPION)
    base.update(candidate_version=str(candidate.version), champion_version=str(champion.version) if champion else None)
    made_by = _pipeline_run(client, candidate)
    if made_by != pipeline_run_id:
        return Decision(**base, action=KEEP, reason=f"@{CANDIDATE} (version {candidate.version}) was made by pipeline "
                                                     f"run {made_by}, not this one ({pipeline_run_id}): no new model")
    if champion is not None and str(champion.version) == str(candidate.version):
        return Decision(**base, action=KEEP, reason="@candidate already is @champion")
    candidate_value = metric_value(evaluate(f"models:/{model}/{candidate.version}"), metric)
    champion_value = (metric_value(evaluate(f"models:/{model}/{champion.version}"), metric)
                      if champion is not None else None)
    action, reason = rule(candidate_value, champion_value, cfg.tolerance)
    return Decision(**base, action=action, reason=reason, candidate_value=candidate_value,
                    champion_value=champion_value)


def apply(client: Any, decision: Decision, retrain_run_id: str) -> None:
    """Record ``decision`` on the candidate version (tags the version page shows: the
    action, the reason, the metric, both values, the champion it was compared with) and,
    for ``promote``, move ``@champion`` to it. The only place the champion alias is ever set."""
    if decision.candidate_version is None:
        return
    tags = {"dinoalign.retrain.decision": decision.action, "dinoalign.retrain.reason": decision.reason,
            "dinoalign.retrain.run_id": retrain_run_id, "dinoalign.retrain.eval_set": decision.eval_set,
            "dinoalign.retrain.metric": decision.metric}
    if decision.candidate_value is not None:
        tags[f"dinoalign.eval.{decision.metric}"] = f"{decision.candidate_value:.6f}"
    if decision.champion_version is not None:
        tags["dinoalign.retrain.compared_with"] = f"version {decision.champion_version} (@{CHAMPION})"
    if decision.champion_value is not None:
        tags["dinoalign.retrain.champion_value"] = f"{decision.champion_value:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(decision.model, decision.candidate_version, key, value[:5000])
    if decision.action == PROMOTE:
        client.set_registered_model_alias(decision.model, CHAMPION, decision.candidate_version)

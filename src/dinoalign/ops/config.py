"""The ``retrain`` section of params.yaml (light: imported by :mod:`dinoalign.config`)."""

from __future__ import annotations

import dataclasses

from dinoalign.errors import ConfigError
from dinoalign.train.config import recipe_names


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """Scheduled retraining (``dinoalign retrain --new URI``; docs/operations.md).

    - ``recipes``: the models compared and promoted, registered as ``<tracking.experiment>-<recipe>`` (``tracking.registered_model_name``).
    - ``metrics``: per recipe, the key of its evaluation (the evaluate stage's
      ``metrics/<recipe>.details.json`` layout, dotted; the headline ones are also in
      ``metrics/<recipe>.json``) that decides; higher is better. A recipe
      not listed uses its own default, the ``promotion_metric`` of its class in
      ``dinoalign.recipes``.
    - ``tolerance``: ``@champion`` moves to the candidate when
      ``candidate >= champion - tolerance`` on the fixed evaluation set (``evaluate.split``
      of the demo world or ``evaluate.dataset``; appended pairs never join it).
    - ``targets``: what ``dvc repro`` reproduces (empty: the whole pipeline).
    - ``image_column`` / ``caption_column`` / ``key_column``: of a new pairs table.
    - Locations (``paths``): ``paths.decisions`` holds ``decision.json`` (the last run)
      and ``history.jsonl``, in the repo; ``paths.retrain_lock`` is held for the whole
      run, so two cron runs never overlap; new pairs go to ``paths.incoming``.
    - ``push`` / ``push_attempts``: ``dvc push`` before the champion moves.
    """

    recipes: list[str] = dataclasses.field(default_factory=lambda: list(recipe_names()))
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerance: float = 0.02
    targets: list[str] = dataclasses.field(default_factory=list)
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None
    push: bool = True
    push_attempts: int = 3

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in recipe_names()]
        if unknown or not self.recipes:
            raise ConfigError(f"retrain.recipes must be a non-empty subset of {recipe_names()}, got {self.recipes}")
        strays = sorted(set(self.metrics) - set(recipe_names()))
        if strays:
            raise ConfigError(f"retrain.metrics names {strays}, which are not recipes (one of "
                              f"{recipe_names()}); a recipe not listed uses its promotion_metric")
        if self.tolerance < 0:
            raise ConfigError(f"retrain.tolerance must be >= 0 (how much worse a candidate may be), got {self.tolerance}")
        if self.push_attempts < 1:
            raise ConfigError(f"retrain.push_attempts must be >= 1, got {self.push_attempts}")

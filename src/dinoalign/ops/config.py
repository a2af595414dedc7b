"""The ``retrain`` section of params.yaml (light: imported by :mod:`dinoalign.config`)."""

from __future__ import annotations

import dataclasses

RECIPES = ("talk2dino", "dinotxt", "projector")


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """Scheduled retraining (``dinoalign retrain --new URI``; docs/operations.md).

    - ``recipes``: the models compared and promoted, registered as ``<model_prefix><recipe>``.
    - ``metrics``: per recipe, the key of its evaluation (the evaluate stage's
      ``metrics/<recipe>.json`` layout, dotted) that decides; higher is better.
    - ``tolerance``: ``@champion`` moves to the candidate when
      ``candidate >= champion - tolerance`` on the fixed evaluation set (``evaluate.split``
      of the demo world or ``evaluate.dataset``; appended pairs never join it).
    - ``targets``: what ``dvc repro`` reproduces (empty: the whole pipeline).
    - ``image_column`` / ``caption_column`` / ``key_column``: of a new pairs table.
    - ``decisions_dir``: ``decision.json`` (the last run) and ``history.jsonl``, in the repo.
    - ``lock_file``: held for the whole run, so two cron runs never overlap.
    - ``push`` / ``push_attempts``: ``dvc push`` before the champion moves.
    """

    recipes: list[str] = dataclasses.field(default_factory=lambda: list(RECIPES))
    metrics: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "talk2dino": "segmentation.miou", "dinotxt": "zeroshot.top1", "projector": "retrieval.t2i.r1"})
    tolerance: float = 0.02
    model_prefix: str = "dinoalign-"
    targets: list[str] = dataclasses.field(default_factory=list)
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None
    decisions_dir: str = "retrain"
    lock_file: str = "infra/run/retrain.lock"
    push: bool = True
    push_attempts: int = 3

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown or not self.recipes:
            raise ValueError(f"retrain.recipes must be a non-empty subset of {RECIPES}, got {self.recipes}")
        missing = [r for r in self.recipes if r not in self.metrics]
        if missing:
            raise ValueError(f"retrain.metrics names no metric for {missing}: add e.g. "
                             f"retrain.metrics.{missing[0]}=zeroshot.top1")
        if self.tolerance < 0:
            raise ValueError(f"retrain.tolerance must be >= 0 (how much worse a candidate may be), got {self.tolerance}")
        if self.push_attempts < 1:
            raise ValueError(f"retrain.push_attempts must be >= 1, got {self.push_attempts}")

"""The ``align`` section of params.yaml: how the three recipes are trained.

Shared run settings (workers, checkpoint storage, failures) sit at the top; each recipe
has its own section with the optimisation settings and ``model``, the *free* choices of
the recipe's own config dataclass (``Talk2DINOConfig``, ``DinoTxtConfig``,
``ProjectorConfig``). The widths, head and register counts are never set here: the align
stage reads them from the feature store's ``manifest.json`` (each section's
``inferred_model_fields``, filled by the recipe's ``model_fields_from_features``), so a
model always fits the features it is trained on.

The recipes params can name are the training sections of :class:`AlignConfig`
(:func:`recipe_names`); each is named as its recipe is registered in
``dinoalign.recipes.RECIPES`` (tests check that the two agree).

Kept import-light (no torch): ``dinoalign.config`` imports it for every command.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from dinoalign.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "onecycle")
DINOTXT_INPUTS: tuple[str, ...] = ("images", "tokens")


@dataclasses.dataclass(frozen=True)
class RecipeTrainingConfig:
    """Optimisation of one recipe; subclasses set the recipe's defaults (its paper's).

    - ``model``: free fields of the recipe's config (e.g. ``projection: linear``); the
      widths come from the features (``inferred_model_fields``: the recipe config fields
      the align stage fills in from the features' manifest spec).
    - ``batch_size``: the global batch, split evenly over ``align.num_workers``.
    - ``schedule``: ``constant`` (after warmup), ``cosine`` (linear warmup then cosine to
      0) or ``onecycle`` (``torch.optim.lr_scheduler.OneCycleLR`` peaking at ``lr``;
      its warmup is ``warmup_steps`` when > 0, else 30% of the steps).
    - ``checkpoint_every`` / ``log_every``: in optimiser steps; a checkpoint falls on a
      log boundary so a resumed run logs exactly the rows of an uninterrupted one.
    """

    recipe: ClassVar[str]
    inferred_model_fields: ClassVar[tuple[str, ...]]

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self) -> None:
        name = f"align.{self.recipe}"
        for field in ("epochs", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError(
                f"{name}: lr must be > 0 and weight_decay, warmup_steps >= 0, got "
                f"{self.lr}, {self.weight_decay}, {self.warmup_steps}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{name}.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{name}.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {self.betas}")
        if self.checkpoint_every % self.log_every:
            raise ConfigError(
                f"{name}.checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                f"log_every ({self.log_every}), so that a resumed run logs the same rows"
            )
        inferred = sorted(set(self.model) & set(self.inferred_model_fields))
        if inferred:
            raise ConfigError(
                f"{name}.model sets {inferred}, which the align stage reads from the "
                f"features' manifest.json (the backbone and text encoder that made them); "
                f"remove them from params"
            )


@dataclasses.dataclass(frozen=True)
class Talk2DINOTrainingConfig(RecipeTrainingConfig):
    """Paper: Adam, lr 1e-4, batch 128, 100 epochs, no schedule, one sample per caption.
    ``text_encoder``: the embed text encoder key whose ``text_<key>`` column is ψ's input."""

    recipe: ClassVar[str] = "talk2dino"
    inferred_model_fields: ClassVar[tuple[str, ...]] = ("text_dim", "vision_dim")

    epochs: int = 100
    optimizer: str = "adam"
    text_encoder: str = "clip"


@dataclasses.dataclass(frozen=True)
class DinoTxtTrainingConfig(RecipeTrainingConfig):
    """dino.txt: AdamW (0.9, 0.99), weight decay 1e-4 on matrices, warmup then cosine.

    ``inputs``: ``images`` decodes the train images and runs the frozen backbone online
    on a RandomResizedCrop (scale ``crop_scale``) with a horizontal flip (``hflip``);
    ``tokens`` trains without augmentation from the cached ``cls``/``registers``/
    ``patches`` columns (``embed.keep_patches: true``). One caption per image per epoch,
    drawn at random.
    """

    recipe: ClassVar[str] = "dinotxt"
    inferred_model_fields: ClassVar[tuple[str, ...]] = (
        "backbone", "vision_dim", "vision_heads", "num_registers"
    )

    betas: tuple[float, ...] = (0.9, 0.99)
    weight_decay: float = 1e-4
    lr: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 200
    inputs: str = "images"
    crop_scale: tuple[float, ...] = (0.5, 1.0)
    hflip: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inputs not in DINOTXT_INPUTS:
            raise ConfigError(f"align.dinotxt.inputs must be one of {DINOTXT_INPUTS}, got {self.inputs!r}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(
                f"align.dinotxt.crop_scale must be [min, max] with 0 < min <= max <= 1, "
                f"got {list(self.crop_scale)}"
            )


@dataclasses.dataclass(frozen=True)
class ProjectorTrainingConfig(RecipeTrainingConfig):
    """The projector: unit-norm MSE to the CLIP image embedding, OneCycleLR (the original:
    16 epochs over CC12M)."""

    recipe: ClassVar[str] = "projector"
    inferred_model_fields: ClassVar[tuple[str, ...]] = ("vision_dim", "embed_dim")

    epochs: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """The ``align`` section.

    - ``recipe``: which recipe a run trains; each DVC stage ``align@<name>`` sets it
      (``dinoalign align align.recipe=talk2dino``).
    - ``use_curated``: when the curate stage's ``<paths.curated>/uids.parquet`` exists,
      train on the train-split uids it marks ``kept``; false (or no file): every train uid.
    - Outputs (``paths``): the model in ``<paths.models>/<recipe>/`` (safetensors +
      config.json), ``<paths.curves>/<recipe>/curve.csv`` and ``metrics.json`` (DVC plots
      and metrics), Ray Train checkpoints in ``paths.checkpoints`` (a local directory or
      ``s3://bucket/prefix``). A run named ``run_name`` (default: recipe + a hash of
      everything that decides the training) resumes from its latest checkpoint there;
      ``keep_checkpoints`` are kept.
    - ``num_workers`` DDP workers (gloo on CPU, nccl on GPU with ``use_gpu``), each with
      ``cpus_per_worker`` Ray CPUs (fractions allowed) and as many torch threads (min 1),
      unless ``torch_threads`` says otherwise. Small heads (talk2dino, projector) trained
      2.5-8x faster in a Ray worker with 1 thread than with 2 on a 2-core machine
      (measured, docs/benchmarks.md, Align); likely cause: their ops are tiny and each
      waits at an OpenMP barrier for a thread that Ray's own threads preempt.
    - ``max_failures``: worker-group restarts from the latest checkpoint (-1: unlimited).
    - ``worker_resources``: custom Ray resources each DDP worker needs besides its CPUs
      (e.g. ``{dinoalign_worker: 1}``: one worker per node that `dinoalign infra up
      --workers N` or the KubeRay worker groups start).
    """

    recipe: str | None = None
    use_curated: bool = True
    run_name: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    max_failures: int = 1
    keep_checkpoints: int = 2
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    talk2dino: Talk2DINOTrainingConfig = dataclasses.field(default_factory=Talk2DINOTrainingConfig)
    dinotxt: DinoTxtTrainingConfig = dataclasses.field(default_factory=DinoTxtTrainingConfig)
    projector: ProjectorTrainingConfig = dataclasses.field(default_factory=ProjectorTrainingConfig)

    def __post_init__(self) -> None:
        if self.recipe is not None and self.recipe not in recipe_names():
            raise ConfigError(f"align.recipe must be one of {recipe_names()}, got {self.recipe!r}")
        if self.num_workers < 1 or not self.cpus_per_worker > 0 or self.keep_checkpoints < 1:
            raise ConfigError(
                f"align: num_workers and keep_checkpoints must be >= 1 and cpus_per_worker "
                f"> 0, got {self.num_workers}, {self.keep_checkpoints}, {self.cpus_per_worker}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"align.torch_threads must be >= 1 or null, got {self.torch_threads}")
        for name, amount in self.worker_resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                raise ConfigError(f"align.worker_resources.{name} must be a number > 0, got {amount!r}")
        if self.max_failures < -1:
            raise ConfigError(f"align.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.recipe is not None and self.training.batch_size % self.num_workers:
            raise ConfigError(
                f"align.{self.recipe}.batch_size ({self.training.batch_size}) must be a "
                f"multiple of align.num_workers ({self.num_workers}): every worker takes an "
                f"equal share of the global batch"
            )

    @property
    def training(self) -> RecipeTrainingConfig:
        """The section of the selected ``recipe``."""
        if self.recipe is None:
            raise ConfigError(
                "align.recipe is not set: run one recipe with `dinoalign align "
                f"align.recipe=<name>` (one of {', '.join(recipe_names())}), as the DVC "
                "stages align@<name> do"
            )
        return getattr(self, self.recipe)


def recipe_names() -> tuple[str, ...]:
    """The recipes params can name (``align.recipe``, ``evaluate.recipes``,
    ``retrain.recipes``): one per training section of :class:`AlignConfig`, in its field
    order. Import-light, unlike ``dinoalign.recipes.RECIPES.names()``, which lists the
    same names (checked by tests/test_architecture.py)."""
    return tuple(
        f.name
        for f in dataclasses.fields(AlignConfig)
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, RecipeTrainingConfig)
    )

"""What every alignment recipe is: a pure ``nn.Module`` with a loss, two encoders, a dense
head, optimiser groups and a self-describing save format.

Notation: B images, N texts, D vision width, E joint embedding width, P patches on an
``h×w`` grid. Batches are ``dict[str, Tensor]`` keyed by the feature names the embed stage
writes (``head_embeddings``, ``token_mean``, ``text``, ``tokens`` ...); each recipe
declares the keys and shapes it reads in :meth:`Recipe.input_spec`, and the same spec
validates batches and is written to ``config.json``.

Everything the pipeline needs to know about a recipe is a class-level fact or hook here
(the feature-store columns it reads, how its config's widths follow from the features,
its training samples, its text input, its dense path ...): train/, evaluate/, serve and
ops call these and never compare recipe names, so a new recipe is one module plus its
``align.<name>`` params section.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoalign.config import from_dict
from dinoalign.embed.features import image_features
from dinoalign.errors import DataError
from dinoalign.storage import fs_for, open_uri

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SAVE_FORMAT_VERSION = 1

# A shape spec: ints are fixed sizes, strings name free sizes ("B", "P", "1+4+P").
ShapeSpec = tuple[int | str, ...]

# What a recipe's encode_text takes (Recipe.text_input):
TEXT_ENCODER = "text_encoder"  # N×T features of a frozen embed text encoder: the key of
#   embed.text_encoders named by the recipe's align.<name>.text_encoder
CLIP_TEXT = "clip_text"  # N×E features of the teacher CLIP's frozen text tower (params.clip)
OWN_TEXT = "own"  # strings, through the recipe's own text tower (trained on the train captions)
TEXT_INPUTS = (TEXT_ENCODER, CLIP_TEXT, OWN_TEXT)


class Recipe(nn.Module, abc.ABC):
    """Base class of the three recipes (``talk2dino``, ``dinotxt``, ``projector``).

    Subclasses set ``config_class`` (a frozen dataclass with a ``name`` field) and the
    class facts and hooks (image batches, training) the pipeline asks for, and are
    registered in :data:`dinoalign.recipes._registry.RECIPES`. Everything in
    ``state_dict()`` is trained or needed to encode; frozen backbones and text towers
    stay outside the module and are rebuilt by name.
    """

    config_class: ClassVar[type]
    has_dense_head: ClassVar[bool] = True

    # What the pipeline asks of a recipe (set by every subclass; see the hooks below).
    name: ClassVar[str]  # registered name = config_class().name = its align.<name> section
    image_columns: ClassVar[tuple[str, ...]]  # feature-store image columns it reads
    text_input: ClassVar[str]  # one of TEXT_INPUTS
    # Class names from prompt templates: True averages the frozen text features of the
    # prompts, then encode_text (Talk2DINO's paper); False is the CLIP protocol
    # (encode_text every prompt, average, re-normalise).
    averages_prompt_features: ClassVar[bool] = False
    # Whether its retrieval is reported against the teacher CLIP's own (the store's
    # ``clip_image`` column, made with params.clip's preprocessing).
    has_clip_reference: ClassVar[bool] = False
    # Whether Talk2DINO's background cleaning of the dense map applies (needs the
    # backbone's ``attn_logits``; see dense_logits_from_images).
    has_background_cleaning: ClassVar[bool] = False
    # The evaluate-stage metric (a dotted headline key of metrics/<recipe>.json, higher is better)
    # that decides retrain promotion unless retrain.metrics.<name> overrides it.
    promotion_metric: ClassVar[str]

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                f"{type(cfg).__name__}; build it with dinoalign.recipes.build(name, cfg)"
            )
        self.cfg = cfg

    # ------------------------------------------------------------------ the interface

    @abc.abstractmethod
    def input_spec(self) -> dict[str, ShapeSpec]:
        """Input name -> shape (ints fixed by the config): the batch keys this recipe
        reads, plus ``text`` where ``encode_text`` takes frozen text features."""

    @abc.abstractmethod
    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Scalar training loss and the statistics to log."""

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Same as :meth:`loss`, so that a DDP-wrapped recipe, ``DDP(recipe)(batch)``,
        runs the forward through DDP and synchronises gradients."""
        return self.loss(batch)

    @abc.abstractmethod
    def encode_image(self, batch: Mapping[str, Tensor]) -> Tensor:
        """B×E L2-normalised image embeddings for global tasks."""

    @abc.abstractmethod
    def encode_text(self, text: Tensor | Sequence[str]) -> Tensor:
        """N×E L2-normalised text embeddings."""

    def similarity(self, text_embeddings: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """N×B text-image scores for zero-shot classification and retrieval, from N×E
        ``encode_text`` outputs and a batch of B images: cosines with ``encode_image``
        unless a recipe scores pairs its own way."""
        return text_embeddings.to(self.param_device) @ self.encode_image(batch).T

    def score_scale(self) -> float | None:
        """The factor its contrastive loss multiplies scores by before the softmax (its
        trained logit scale 1/τ), so that ``softmax(scale · scores)`` are the probabilities
        the model was trained to give; None for a recipe trained without one (the
        projector regresses CLIP's image embedding: CLIP's own scale applies)."""
        scale = getattr(self, "logit_scale", None)
        return float(scale().detach()) if isinstance(scale, LogitScale) else None

    @abc.abstractmethod
    def dense_logits(
        self,
        batch: Mapping[str, Tensor],
        class_text_embeddings: Tensor,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """B×N×h×w per-patch class scores from N×E ``encode_text`` outputs."""

    # ------------------------------------------------------------------ image batches

    @classmethod
    def batch_from_features(cls, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This recipe's image batch from feature columns (the store's
        :attr:`image_columns`, or :func:`dinoalign.embed.features.image_features` of a
        backbone forward), B rows each: by default the columns themselves."""
        return {k: features[k] for k in cls.image_columns}

    def batch_from_images(self, images: Tensor, backbone: Any) -> dict[str, Tensor]:
        """Normalised images B×3×H×W through the frozen ``backbone`` (the DINOv2 adapter)
        -> this recipe's image batch, made as the embed stage makes its feature columns.
        Call it under ``torch.no_grad()``."""
        keep_patches = bool({"registers", "patches"} & set(self.image_columns))
        return self.batch_from_features(image_features(backbone(images), keep_patches))

    def index_vectors(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        """(V×E unit vectors for a nearest-neighbour index, vectors per image) of an image
        batch: by default B :meth:`encode_image` rows, one per image."""
        return self.encode_image(batch), 1

    def dense_logits_from_images(
        self,
        images: Tensor,
        backbone: Any,
        class_text_embeddings: Tensor,
        clean_background: bool = False,
        cleaning_lambda: float = 0.2,
    ) -> Tensor:
        """B×N×h×w per-patch class scores of normalised images B×3×H×W (sides multiples
        of the patch size) through the frozen ``backbone``, from N×E ``encode_text``
        outputs. ``clean_background`` applies only where :attr:`has_background_cleaning`.
        Call it under ``torch.no_grad()``."""
        raise NotImplementedError(
            f"{self.name} has no dense head (has_dense_head is False): skip segmentation for it"
        )

    # ------------------------------------------------------------------ training

    @classmethod
    def model_fields_from_features(
        cls, spec: Mapping[str, Any], training: Any
    ) -> dict[str, Any]:
        """The config fields read from the feature store's manifest ``spec`` (its
        ``columns`` shapes and ``backbone``): exactly the ``inferred_model_fields`` of
        the recipe's ``align.<name>`` section ``training``, which params may not set."""
        raise NotImplementedError(f"{cls.__name__} does not say how its widths follow from the features")

    @classmethod
    def config_from_features(cls, training: Any, spec: Mapping[str, Any]) -> Any:
        """The recipe's config dataclass: ``align.<name>.model`` (free choices, checked
        like params) plus the widths :meth:`model_fields_from_features` reads."""
        fields = cls.model_fields_from_features(spec, training)
        if set(fields) != set(training.inferred_model_fields):
            raise TypeError(
                f"{cls.__name__}.model_fields_from_features gives {sorted(fields)} but "
                f"align.{cls.name} declares {sorted(training.inferred_model_fields)} as "
                f"inferred (inferred_model_fields): make the two agree"
            )
        return from_dict(cls.config_class, {**training.model, **fields}, where=f"align.{cls.name}.model")

    @classmethod
    def training_data(
        cls,
        training: Any,
        model_cfg: Any,
        source: Any,
        *,
        image_limits: dict[str, Any],
        seed: int,
    ) -> Any:
        """The :class:`dinoalign.train.data.TrainingData` of this recipe over the train
        uids of ``source`` (a :class:`dinoalign.train.data.FeatureSource`) that have
        features, for its ``align.<name>`` section ``training`` and config ``model_cfg``;
        ``image_limits`` bound image decodes, ``seed`` rebuilds a frozen backbone."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build its training samples")

    # ------------------------------------------------------------------ shared helpers

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    def feature(self, batch: Mapping[str, Tensor], key: str) -> Tensor:
        """``batch[key]`` checked against :meth:`input_spec` and moved to this module's
        device; floating features (fp16 caches) are cast to the parameters' dtype."""
        spec = self.input_spec()[key]
        if key not in batch:
            raise KeyError(
                f"{self.cfg.name}: the batch has no {key!r} ({_describe(spec)}); it has "
                f"{sorted(batch)}. Select the {key!r} feature column in the loader (the "
                f"recipe's input_spec() lists what it reads)."
            )
        return self.check_shape(batch[key], key, spec)

    def check_shape(self, x: Tensor, what: str, spec: ShapeSpec) -> Tensor:
        """``x`` validated against ``spec``, on this module's device and float dtype."""
        if x.ndim != len(spec) or any(
            isinstance(s, int) and s != d for s, d in zip(spec, x.shape, strict=True)
        ):
            raise ValueError(
                f"{self.cfg.name}: {what} has shape {tuple(x.shape)}, expected "
                f"{_describe(spec)}. Make the recipe config ({self.cfg}) match the "
                f"features, e.g. the vision/text widths of the models that made them."
            )
        dtype = self.param_dtype if x.is_floating_point() else x.dtype
        return x.to(device=self.param_device, dtype=dtype)

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimiser groups: weight decay on ≥2-D weights only (not on biases, norms,
        LayerScale gammas or logit scales). Frozen parameters are left out."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str) -> None:
        """Write ``model.safetensors`` (this module's state dict) and ``config.json``
        (recipe name, config, input spec) under ``directory`` (local path or URI);
        :func:`dinoalign.recipes.load_recipe` reads them back."""
        fs, path = fs_for(directory)
        fs.makedirs(path, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with open_uri(join_uri(directory, WEIGHTS_FILE), "wb") as f:
            f.write(safetensors.torch.save(state))
        config = {
            "format_version": SAVE_FORMAT_VERSION,
            "recipe": self.cfg.name,
            "config": dataclasses.asdict(self.cfg),
            "inputs": {k: list(v) for k, v in self.input_spec().items()},
        }
        with open_uri(join_uri(directory, CONFIG_FILE), "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


class LogitScale(nn.Module):
    """The factor 1/τ that multiplies cosine similarities before the InfoNCE softmax.

    Stored as log(1/τ); learnable or fixed. The returned scale is clamped at
    ``max_scale`` (CLIP's 100) so a learnable temperature cannot collapse.
    """

    def __init__(self, temperature: float, learnable: bool, max_scale: float = 100.0) -> None:
        super().__init__()
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            # Fixed: rebuilt from the config, so it is kept out of the saved state.
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> Tensor:
        """0-d tensor: exp(min(log_scale, ln max_scale))."""
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def symmetric_infonce(
    logits_per_text: Tensor, logits_per_image: Tensor, labels: Tensor | None = None
) -> Tensor:
    """½[CE(logits_per_text, labels) + CE(logits_per_image, labels)].

    ``logits_per_text`` is N×M (text rows against image columns), ``logits_per_image``
    the image rows against text columns; ``labels`` (default ``arange``) give each row's
    positive column, e.g. offset by rank when the columns are gathered across workers.
    """
    if labels is None:
        labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return 0.5 * (
        F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_image, labels)
    )


def retrieval_accuracy(logits_per_text: Tensor, labels: Tensor | None = None) -> float:
    """Fraction of text rows whose top-1 column is their positive (in-batch R@1)."""
    if labels is None:
        labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (logits_per_text.argmax(dim=1) == labels).float().mean().item()


def to_grid(scores: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """B×N×P per-patch scores -> B×N×h×w. ``grid`` None means a square grid."""
    num_patches = scores.shape[-1]
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patches do not form a square grid: pass grid=(h, w) "
                f"(BackboneOutput.grid) for non-square crops"
            )
        grid = (side, side)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"grid {grid} does not hold {num_patches} patches")
    return scores.unflatten(-1, grid)


def feature_width(spec: Mapping[str, Any], column: str, recipe: str, axis: int = -1) -> int:
    """Size ``axis`` of feature-store column ``column`` in the manifest ``spec``; a clear
    error naming ``recipe`` when the store lacks it."""
    columns = spec["columns"]
    if column not in columns:
        raise DataError(
            f"{recipe} trains on the {column!r} feature, which the feature store does "
            f"not have (it has {sorted(columns)}); re-run embed with it"
            + (" (embed.keep_patches: true)" if column in ("patches", "registers") else "")
        )
    return int(columns[column][axis])


def join_uri(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def check_positive(cfg: Any, *fields: str) -> None:
    """Raise ValueError naming the first of ``fields`` of ``cfg`` that is not > 0."""
    for field in fields:
        value = getattr(cfg, field)
        if not value > 0:
            raise ValueError(f"{type(cfg).__name__}.{field} must be > 0, got {value!r}")


def _describe(spec: ShapeSpec) -> str:
    return "×".join(str(s) for s in spec)

"""Typed parameters: ``params.yaml`` is the single source of truth.

``load_params(path, overrides=["embed.batch_size=64"])`` reads the YAML, applies dotted
overrides (the same ``key=value`` syntax as ``dvc exp run -S``), and builds one frozen
dataclass per section. Unknown keys are errors that name the closest valid key, so a typo
in a profile never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dinoalign.errors import ConfigError

EMBED_ENGINES = ("ray", "local")  # embed.engine: Ray Data, or a plain in-process loop
EMBED_WRITERS = ("workers", "driver")  # embed.write: who writes the feature shards
CLIP_SECTION_KIND = "clip"  # embed.text_encoders kind: the clip section's text tower

from dinoalign.curate.config import CurateConfig
from dinoalign.data.config import (
    SOURCE_NAMES,
    CocoSourceConfig,
    PairsSourceConfig,
    SyntheticWorldConfig,
    WebDatasetSourceConfig,
)
from dinoalign.evaluate.config import EvaluateConfig
from dinoalign.ops.config import RetrainConfig
from dinoalign.pretrain.config import PretrainConfig
from dinoalign.train.config import AlignConfig


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """MLflow: ``uri`` None means ``$MLFLOW_TRACKING_URI`` or the embedded sqlite store;
    ``system_metrics``: every stage run also records CPU, memory, disk and network use
    (MLflow's system metrics, psutil; GPUs with pynvml)."""

    uri: str | None = None
    # the MLflow experiment; also scopes the registered models: <experiment>-<recipe>
    experiment: str = "dinoalign"
    system_metrics: bool = False

    def __post_init__(self) -> None:
        name = self.experiment
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/:"):
            raise ConfigError(f"tracking.experiment must be a non-empty name without '/' or ':' (it names the "
                              f"registered models <experiment>-<recipe>), got {name!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which source ``prepare`` reads (each source's own config below) and how images are
    validated."""

    source: str = "synthetic"  # synthetic | coco | pairs | webdataset
    synthetic: SyntheticWorldConfig = dataclasses.field(default_factory=SyntheticWorldConfig)
    coco: CocoSourceConfig = dataclasses.field(default_factory=CocoSourceConfig)
    pairs: PairsSourceConfig = dataclasses.field(default_factory=PairsSourceConfig)
    webdataset: WebDatasetSourceConfig = dataclasses.field(default_factory=WebDatasetSourceConfig)
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb limit
    min_side: int = 14  # one patch
    # folders/prefixes the images a pairs table names must resolve under (null: anywhere);
    # a row outside is the reject ``outside_allowed_roots``. `dinoalign retrain --new`
    # always confines new data (default: the folder of the new table).
    allowed_roots: list[str] | None = None
    # bounds on every image read and decode (reject reasons read_timeout, too_large,
    # extreme_aspect_ratio): a total deadline per read, a byte cap, long side / short side
    read_timeout_s: float = 60.0
    max_bytes: int = 64 * 2**20
    max_aspect_ratio: float = 20.0
    # a transient read failure (read_timeout, unavailable) is tried this many times in all,
    # read_backoff_s × 2^k apart (jittered); the embed stage also retries it on its next run
    read_attempts: int = 3
    read_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.source not in SOURCE_NAMES:  # else the registry (its modules load pandas, pyarrow)
            from dinoalign.data.sources import SOURCES

            try:
                SOURCES.get(self.source)
            except KeyError as e:
                raise ConfigError(f"data.source: {e.args[0]}") from None
        if self.allowed_roots is not None:  # the pairs source applies it (data.pairs.allowed_roots)
            if isinstance(self.allowed_roots, str) or not all(isinstance(r, str) and r for r in self.allowed_roots):
                raise ConfigError(f"data.allowed_roots must be a list of folders or URL prefixes, "
                                 f"got {self.allowed_roots!r}")
            if self.pairs.allowed_roots is None:
                object.__setattr__(self, "pairs", dataclasses.replace(self.pairs, allowed_roots=list(self.allowed_roots)))
        _check_at_least(self, "data", 1, "max_pixels", "min_side", "max_bytes", "max_aspect_ratio", "read_attempts")
        if isinstance(self.read_backoff_s, bool) or not isinstance(self.read_backoff_s, (int, float)) \
                or not 0 <= self.read_backoff_s < float("inf"):
            raise ConfigError(f"data.read_backoff_s must be >= 0 seconds, got {self.read_backoff_s!r}")
        if isinstance(self.read_timeout_s, bool) or not isinstance(self.read_timeout_s, (int, float)) \
                or not 0 < self.read_timeout_s < float("inf"):
            raise ConfigError(f"data.read_timeout_s must be > 0, got {self.read_timeout_s!r}")


@dataclasses.dataclass(frozen=True)
class PathsConfig:
    """Every location the pipeline reads or writes, each named once: a path relative to
    the checkout (where params.yaml lives), an absolute path, or an ``s3://`` URI where
    the stage supports one (features, checkpoints). Stages resolve them with
    :func:`dinoalign.storage.under_root`; dvc.yaml lists the ``paths.*`` keys each
    stage reads."""

    pairs: str = "artifacts/pairs"            # prepare -> manifest, rejects, summary
    pretrained: str = "artifacts/pretrain"    # demo: the DINO-pretrained backbone, curve, metrics
    incoming: str | None = "incoming/pairs"   # pairs `dinoalign retrain` appends (null: none)
    teacher: str = "artifacts/teacher"        # the demo's tiny CLIP, its curve and metrics
    features: str = "artifacts/features"      # the embed store (or s3://bucket/prefix)
    curated: str = "artifacts/curated"        # uids.parquet, stats.json, plots/
    models: str = "artifacts/models"          # <models>/<recipe>/: safetensors + config.json
    curves: str = "artifacts/align"           # <curves>/<recipe>/: curve.csv + metrics.json
    checkpoints: str = "artifacts/checkpoints"  # Ray Train checkpoints (or s3://)
    metrics: str = "metrics"                  # <metrics>/<recipe>.json
    plots: str = "plots"                      # <plots>/<recipe>/
    report: str = "report"                    # index.html
    decisions: str = "retrain"                # retrain's decision.json + history.jsonl
    retrain_lock: str = "infra/run/retrain.lock"


# Keys that moved, old dotted key -> what to write instead (README, "Params migration").
MOVED_KEYS = {
    "prepare.out_dir": "paths.pairs",
    "embed.pairs_dir": "paths.pairs",
    "embed.out_dir": "paths.features",
    "data.incoming": "paths.incoming",
    "teacher.out_dir": "paths.teacher",
    "curate.out_dir": "paths.curated",
    "align.curated": "paths.curated (the curate stage's folder; align reads uids.parquet in it) "
                     "and align.use_curated (true/false)",
    "align.out_dir": "paths.models",
    "align.curves_dir": "paths.curves",
    "align.storage_path": "paths.checkpoints",
    "evaluate.metrics_dir": "paths.metrics",
    "evaluate.plots_dir": "paths.plots",
    "evaluate.report_dir": "paths.report",
    "retrain.decisions_dir": "paths.decisions",
    "retrain.lock_file": "paths.retrain_lock",
    "retrain.model_prefix": "tracking.experiment (models are registered as <tracking.experiment>-<recipe>)",
}


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    shard_size: int = 5000
    validate_images: bool = True

    def __post_init__(self) -> None:
        _check_at_least(self, "prepare", 1, "shard_size")


# backbone.weights that name a hub repo, not a file (dinoalign.backbones.dinov2 loads them)
BACKBONE_HUB_PREFIXES = ("hf-hub:", "timm/")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """A timm DINOv2/DINOv3 ViT. ``weights``: None (random init unless ``pretrained``),
    a HF hub name, a local timm file or a torch-hub ``dinov2_*_pretrain.pth`` file (a
    relative path is relative to the checkout: :meth:`at_root`)."""

    name: str = "vit_small_patch14_reg4_dinov2"
    pretrained: bool = False
    weights: str | None = None
    img_size: int = 224
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pretrained and self.weights and not self.weights.startswith(BACKBONE_HUB_PREFIXES):
            raise ConfigError(
                f"backbone.pretrained=true downloads timm's weights, which the file backbone.weights="
                f"{self.weights} would replace: set backbone.weights=null for timm's weights (the demo "
                "params.yaml names the pretrain stage's file) or backbone.pretrained=false for the file"
            )

    def at_root(self, root: str | os.PathLike[str] | None) -> BackboneConfig:
        """This config with a relative ``weights`` file resolved against the checkout
        ``root`` (where params.yaml lives), for code that builds the backbone outside the
        checkout's working directory (Ray actors and workers, a served model). Hub names
        (``hf-hub:``, ``timm/``), URIs (``s3://``) and absolute paths stay as they are;
        ``root`` None changes nothing."""
        weights = self.weights
        if root is None or not weights or weights.startswith(BACKBONE_HUB_PREFIXES):
            return self
        from dinoalign.storage import under_root

        resolved = under_root(weights, root)
        return self if resolved == weights else dataclasses.replace(self, weights=resolved)


RANDOM_INIT = "random init"


def weights_metadata(path: str) -> dict[str, str]:
    """The string metadata (``__metadata__``) of a local ``.safetensors`` file, read from
    its JSON header without loading a tensor; {} for any other file or one that cannot be
    read as such."""
    import json
    import struct

    if not path.endswith(".safetensors") or "://" in path or not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 0 < size <= 100 * 2**20:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def describe_backbone(cfg: BackboneConfig, root: str | os.PathLike[str] | None = None) -> str:
    """What the backbone of ``cfg`` is, in words, as every output names it: the
    ``description`` a weights file carries in its safetensors metadata (the pretrain
    stage's: ``tiny self-supervised (demo)``), else ``pretrained (<hub name>)``,
    ``pretrained (timm's default weights)``, ``weights <file>``, or ``random init``. A
    relative weights file is read from the checkout ``root`` (:meth:`BackboneConfig.at_root`)."""
    weights = cfg.weights
    if not weights:
        return "pretrained (timm's default weights)" if cfg.pretrained else RANDOM_INIT
    if weights.startswith(BACKBONE_HUB_PREFIXES):
        return f"pretrained ({weights})"
    description = weights_metadata(cfg.at_root(root).weights or "").get("description", "").strip()
    return description or f"weights {weights}"


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """A text encoder from the text registry (``open_clip`` towers, ``hf`` sentence encoders).

    ``key`` names its feature column (``text_<key>``). ``kind: clip`` is the text tower of
    the ``clip`` section's model (named there, once); loading the params resolves it to
    ``open_clip`` with that name, so every reader sees the model it is."""

    key: str = "clip"
    kind: str = CLIP_SECTION_KIND
    name: str | None = None  # kind clip: none (the clip section's)
    pretrained: str | None = None  # open_clip tag, hub name or local checkpoint file
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == CLIP_SECTION_KIND:
            if self.name is not None or self.pretrained is not None or self.model_kwargs:
                raise ConfigError(
                    f"embed.text_encoders[{self.key}]: kind clip takes the clip section's model; "
                    "drop name/pretrained/model_kwargs, or use kind open_clip to name another CLIP"
                )
        elif not self.name:
            raise ConfigError(f"embed.text_encoders[{self.key}]: kind {self.kind} needs a name")

    def resolved(self, clip: ClipConfig) -> TextEncoderConfig:
        """``kind: clip`` as the open_clip tower of ``clip``; any other kind as it is."""
        if self.kind != CLIP_SECTION_KIND:
            return self
        return dataclasses.replace(self, kind="open_clip", name=clip.name, pretrained=clip.pretrained)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Tiny CLIP sizes and its training schedule (demo profile)."""

    enabled: bool = True
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_context: int = 32  # demo captions are short; 77 (CLIP's) costs 2.4x more
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    threads: int = 2


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """The CLIP whose image tower is the projector's target and whose text tower talk2dino
    and the projector use. Demo: the teacher stage's tiny CLIP; real: ``ViT-B-16`` +
    ``openai`` (or a local file / hub name)."""

    name: str = "local-dir:artifacts/teacher/model"
    pretrained: str | None = None
    image_features: bool = True  # store clip_image in the features (projector target)


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """The embed stage: Ray Data (or a plain loop) from the pairs manifest to features.

    Images are resized and cropped to ``img_size`` and normalised as each model's own
    config says: the backbone by timm's data config of the built model (mean, std,
    interpolation, crop_pct, crop_mode), CLIP by open_clip's preprocess config of the
    loaded model. ``interpolation``: null takes the backbone's; a PIL filter name
    (bicubic, bilinear, ...) overrides it. What was used is recorded in the features'
    manifest (``spec.preprocessing``)."""

    engine: str = "ray"  # ray | local
    img_size: int = 224
    interpolation: str | None = None  # null: the backbone's own (timm data config)
    batch_size: int = 64
    decode_batch_size: int = 32
    num_actors: int = 1
    actor_num_cpus: float = 1.0
    actor_num_gpus: float = 0.0
    decode_num_cpus: float = 0.5
    torch_threads: int = 2
    loader_workers: int = 1  # local engine: DataLoader workers
    shard_rows: int = 1024
    write: str = "workers"  # workers | driver
    actor_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    keep_patches: bool = False
    text_batch_size: int = 256
    text_encoders: list[TextEncoderConfig] = dataclasses.field(
        default_factory=lambda: [TextEncoderConfig()]
    )

    def __post_init__(self) -> None:
        if self.engine not in EMBED_ENGINES:
            close = difflib.get_close_matches(self.engine, EMBED_ENGINES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"embed.engine={self.engine!r}{hint}: use one of {list(EMBED_ENGINES)}")
        _check_at_least(
            self, "embed", 1, "img_size", "batch_size", "decode_batch_size", "num_actors",
            "torch_threads", "shard_rows", "text_batch_size",
        )
        _check_at_least(self, "embed", 0, "loader_workers", "actor_num_gpus")
        if self.write not in EMBED_WRITERS:
            raise ConfigError(f"embed.write={self.write!r}: use one of {list(EMBED_WRITERS)}")
        for name, amount in self.actor_resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                raise ConfigError(f"embed.actor_resources.{name} must be a number > 0, got {amount!r}")
        for name in ("actor_num_cpus", "decode_num_cpus"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"embed.{name} must be > 0, got {getattr(self, name)!r}")
        if self.interpolation is not None:
            from dinoalign.data.images import INTERPOLATIONS  # PIL's filters, loaded only when named

            if self.interpolation not in INTERPOLATIONS:
                raise ConfigError(
                    f"embed.interpolation={self.interpolation!r}: use one of {sorted(INTERPOLATIONS)}, "
                    "or null for the backbone's own (timm's data config of the model)"
                )


def _check_at_least(section: Any, where: str, low: int, *names: str) -> None:
    """``section.<name> >= low`` for each name, else a ValueError naming ``where.<name>``."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise ConfigError(f"{where}.{name} must be >= {low}, got {value!r}")


def patch_size_of(backbone: BackboneConfig) -> int | None:
    """The patch size a timm ViT config implies: ``model_kwargs.patch_size``, else the
    ``patch<N>`` in its name (``vit_small_patch14_reg4_dinov2`` -> 14); None if neither."""
    if "patch_size" in backbone.model_kwargs:
        return int(backbone.model_kwargs["patch_size"])
    match = re.search(r"patch(\d+)", backbone.name)
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Params:
    """Every section of ``params.yaml``. Sections the code does not know are rejected."""

    profile: str = "demo"
    seed: int = 123
    paths: PathsConfig = dataclasses.field(default_factory=PathsConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    embed: EmbedConfig = dataclasses.field(default_factory=EmbedConfig)
    curate: CurateConfig = dataclasses.field(default_factory=CurateConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    retrain: RetrainConfig = dataclasses.field(default_factory=RetrainConfig)

    def __post_init__(self) -> None:
        # the CLIP is named once (clip:); text encoders of kind clip point at it
        encoders = [t.resolved(self.clip) for t in self.embed.text_encoders]
        object.__setattr__(self, "embed", dataclasses.replace(self.embed, text_encoders=encoders))
        patch = patch_size_of(self.backbone)
        for where, size in (("backbone.img_size", self.backbone.img_size),
                            ("embed.img_size", self.embed.img_size)):
            if patch and size % patch:
                raise ConfigError(
                    f"{where}={size} is not a multiple of the patch size {patch} of "
                    f"{self.backbone.name}: use {size // patch * patch or patch} or "
                    f"{(size // patch + 1) * patch}"
                )


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"embed.batch_size=64"`` -> (["embed", "batch_size"], 64); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return parts, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({problem}); quote the whole "
            "key=value for the shell, e.g. 'embed.text_encoders=[{key: clip}]'"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted override set (intermediate dicts created)."""
    out = _deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_params(
    path: str | Path = "params.yaml", overrides: typing.Iterable[str] = ()
) -> Params:
    """Load ``path`` (missing file = all defaults), apply overrides, build ``Params``."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides)
    _refuse_moved_keys(raw, str(path))
    return from_dict(Params, raw, where=str(path))


def _refuse_moved_keys(raw: dict[str, Any], where: str) -> None:
    """A key of :data:`MOVED_KEYS` (in the file or an override) is an error naming the
    key that replaced it, not a generic "unknown key"."""
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{where}: {old} has moved: set {new} instead (README, Params migration)")


def from_dict(cls: type, data: Any, where: str = "params") -> Any:
    """Build dataclass ``cls`` from nested dicts, checking keys and coercing types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{where}: unknown key {k!r} in {cls.__name__}{hint}; valid keys: {sorted(fields)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a section's own validation (__post_init__)
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (for logging the resolved config)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value] if args else list(value)
    if origin is tuple:  # a scalar is a one-element tuple (``urls: a.tar``)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(args[0], v, where) for v in items) if args else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d

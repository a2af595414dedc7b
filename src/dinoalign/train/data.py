"""Training samples of each recipe, built from the feature store, and the sampler that
deals them out to the DDP workers.

- talk2dino: one sample per caption: ``text`` (the caption's ``text_<encoder>`` row, T)
  with its image's ``head_embeddings`` (H×D);
- projector: one sample per image: ``token_mean`` (D) -> ``clip_image`` (E);
- dinotxt: one sample per image with one of its captions (drawn per epoch) as CLIP BPE
  ``tokens``; the vision side is either the cached ``[cls; registers; patches]`` tokens
  (``inputs: tokens``) or the decoded image, RandomResizedCrop + flip, through the
  frozen backbone on the worker (``inputs: images``).

Only train-split uids are ever read (:func:`train_uids`). Every random draw (epoch order,
caption choice, crop, flip) is a function of ``(seed, epoch, step, rank)``
(:func:`derive_seed`), so a run resumed at step ``s`` sees exactly the batches an
uninterrupted run sees from ``s`` on.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from dinoalign.config import BackboneConfig, from_dict
from dinoalign.data.schema import CURATED_FEATURES_KEY
from dinoalign.embed.store import (
    FeatureStore,
    check_preprocessing,
    column_to_numpy,
    load_image_features,
    recorded_preprocessing,
)
from dinoalign.errors import ConfigError, DataError, DataFileMissing
from dinoalign.storage import fs_for, is_remote, open_uri
from dinoalign.train.config import (
    DinoTxtTrainingConfig,
    RecipeTrainingConfig,
    Talk2DINOTrainingConfig,
)

# Streams of derive_seed: independent random sequences for each kind of draw.
ORDER_STREAM, CAPTION_STREAM, AUGMENT_STREAM, STEP_STREAM = 1, 2, 3, 4


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (seed, stream, epoch, ...)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ----------------------------------------------------------------------------- uids


@dataclasses.dataclass(frozen=True)
class TrainSelection:
    """The train uids a run uses and how they were chosen."""

    uids: list[str]  # sorted
    n_train: int  # train-split uids in the pairs manifest
    curated: str | None  # the curated uid file applied, None when absent


def train_uids(manifest: pa.Table, curated: str | None, features_digest: str | None = None) -> TrainSelection:
    """Train-split uids of the pairs ``manifest``, intersected with the ``kept`` uids of
    the curate stage's ``uids.parquet`` when ``curated`` names an existing file. A
    curation computed from other features than ``features_digest`` (its metadata names
    theirs: the features were embedded again since, e.g. retrain's edited pairs) is an
    error: it would select by stale clusters."""
    train = manifest.filter(pc.equal(manifest.column("split"), "train")).column("uid").to_pylist()
    if not train:
        raise DataError("the pairs manifest has no 'train' split: nothing to align on")
    selected = set(train)
    used = None
    if curated is not None and _exists(curated):
        with open_uri(curated, "rb") as f:
            table = pq.read_table(f)
        missing = {"uid", "kept"} - set(table.column_names)
        if missing:
            raise DataError(
                f"{curated} lacks the columns {sorted(missing)}; it must be the curate "
                f"stage's uids.parquet (uid, kept, ...)"
            )
        made_from = (table.schema.metadata or {}).get(CURATED_FEATURES_KEY.encode(), b"").decode()
        if features_digest is not None and made_from and made_from != features_digest:
            raise DataError(
                f"{curated} was curated from other features (digest {made_from}) than those "
                f"align reads now ({features_digest}): the features were embedded again since; "
                "run the curate stage first (dvc repro curate), or set align.use_curated=false"
            )
        kept = table.filter(table.column("kept")).column("uid").to_pylist()
        selected &= set(kept)
        used = curated
        if not selected:
            raise DataError(f"{curated} keeps none of the {len(train)} train uids")
    return TrainSelection(sorted(selected), len(train), used)


def _exists(uri: str) -> bool:
    fs, path = fs_for(uri)
    return bool(fs.exists(path))


def uids_digest(uids: list[str]) -> str:
    """Short hash of a sorted uid list (part of a run's identity)."""
    h = hashlib.blake2b(digest_size=8)
    for u in uids:
        h.update(u.encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model dims


def model_config(recipe: str, training: RecipeTrainingConfig, spec: Mapping[str, Any]) -> Any:
    """The recipe's config dataclass: ``align.<recipe>.model`` (free choices, checked like
    params) plus the widths the recipe reads from the features' manifest ``spec``
    (:meth:`dinoalign.recipes.Recipe.config_from_features`)."""
    from dinoalign.recipes import RECIPES

    return RECIPES.get(recipe).config_from_features(training, spec)


# ----------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class EpochSampler:
    """Deals a seeded permutation of ``num_samples`` per epoch into global batches of
    ``batch_size``; rank r takes the r-th of ``world_size`` equal slices of each. The
    last incomplete batch of an epoch is dropped (every rank needs the same B)."""

    num_samples: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch size {self.batch_size} does not split over {self.world_size} workers"
            )
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{self.num_samples} training samples do not fill one batch of "
                f"{self.batch_size}: lower the recipe's batch_size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def rows(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices (local B) of this rank for ``step`` (0-based) of ``epoch``."""
        order = _epoch_draw(self.seed, ORDER_STREAM, epoch, self.num_samples, permutation=True)
        start = step * self.batch_size + self.rank * self.local_batch_size
        return order[start : start + self.local_batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_draw(seed: int, stream: int, epoch: int, n: int, permutation: bool) -> np.ndarray:
    """One epoch's draw of ``stream``: a permutation of ``n`` or ``n`` uniforms in [0, 1)
    (cached: every step of the epoch reads it; read-only)."""
    rng = np.random.default_rng(derive_seed(seed, stream, epoch))
    out = rng.permutation(n) if permutation else rng.random(n)
    out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------- data sets


@dataclasses.dataclass(frozen=True)
class Draw:
    """Which batch is being built: the keys of its random draws."""

    seed: int
    epoch: int
    step: int
    rank: int


class TrainingData(abc.ABC):
    """In-memory training samples of one recipe (numpy arrays, shipped to each worker)."""

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """Samples per epoch."""

    @abc.abstractmethod
    def batch(self, rows: np.ndarray, draw: Draw) -> dict[str, Tensor]:
        """The recipe's batch dict for sample indices ``rows``."""

    def attach(self, device: torch.device, seed: int) -> None:
        """Worker-side setup before the first batch (models the batches need)."""

    def describe(self) -> dict[str, int]:
        """Counts to log."""
        return {"samples": self.num_samples}


@dataclasses.dataclass
class Talk2DINOData(TrainingData):
    """One sample per caption: ``text`` C×T and the index of its image into
    ``head_embeddings`` I×H×D."""

    text: np.ndarray
    image_index: np.ndarray
    head_embeddings: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.text)

    def batch(self, rows: np.ndarray, draw: Draw) -> dict[str, Tensor]:
        """{"text": B×T, "head_embeddings": B×H×D} (image features repeated per caption)."""
        return {
            "text": torch.from_numpy(self.text[rows]),
            "head_embeddings": torch.from_numpy(self.head_embeddings[self.image_index[rows]]),
        }

    def describe(self) -> dict[str, int]:
        return {"samples": self.num_samples, "images": len(self.head_embeddings)}


@dataclasses.dataclass
class ProjectorData(TrainingData):
    """One sample per image: ``token_mean`` I×D and its target ``clip_image`` I×E."""

    token_mean: np.ndarray
    clip_image: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.token_mean)

    def batch(self, rows: np.ndarray, draw: Draw) -> dict[str, Tensor]:
        """{"token_mean": B×D, "clip_image": B×E}."""
        return {
            "token_mean": torch.from_numpy(self.token_mean[rows]),
            "clip_image": torch.from_numpy(self.clip_image[rows]),
        }


@dataclasses.dataclass
class CaptionTokens:
    """The CLIP BPE tokens of every caption, grouped per image: image i owns rows
    ``start[i] : start[i] + count[i]`` of ``tokens`` (C×context int32)."""

    tokens: np.ndarray
    start: np.ndarray
    count: np.ndarray

    def draw(self, rows: np.ndarray, draw: Draw) -> Tensor:
        """B×context int64: one caption per image of ``rows``, drawn uniformly per epoch
        (the same draw on every rank and step of that epoch)."""
        uniform = _epoch_draw(draw.seed, CAPTION_STREAM, draw.epoch, len(self.count), permutation=False)
        pick = (uniform * self.count).astype(np.int64)
        return torch.from_numpy(self.tokens[self.start[rows] + pick[rows]].astype(np.int64))


@dataclasses.dataclass
class DinoTxtTokenData(TrainingData):
    """dinotxt without augmentation: cached ``cls`` I×D, ``registers`` I×R×D and
    ``patches`` I×P×D (fp16 in the store) -> ``tokens_vision`` B×(1+R+P)×D."""

    cls: np.ndarray
    registers: np.ndarray
    patches: np.ndarray
    captions: CaptionTokens

    @property
    def num_samples(self) -> int:
        return len(self.cls)

    def batch(self, rows: np.ndarray, draw: Draw) -> dict[str, Tensor]:
        """{"tokens_vision": B×(1+R+P)×D float32, "tokens": B×context}."""
        parts = [self.cls[rows][:, None], self.registers[rows], self.patches[rows]]
        vision = np.concatenate([p.astype(np.float32) for p in parts], axis=1)
        return {"tokens_vision": torch.from_numpy(vision), "tokens": self.captions.draw(rows, draw)}

    def describe(self) -> dict[str, int]:
        return {"samples": self.num_samples, "captions": len(self.captions.tokens)}


@dataclasses.dataclass
class DinoTxtImageData(TrainingData):
    """dinotxt with augmentation: each batch decodes its images, applies RandomResizedCrop
    (``crop_scale``, ``interpolation``: the features' recorded backbone interpolation, to
    ``img_size``) and a horizontal flip (``hflip``), and runs the frozen ``backbone``
    (rebuilt on the worker by :meth:`attach`, normalising with its model's mean/std) ->
    ``tokens_vision`` B×(1+R+P)×D."""

    image_uris: list[str]
    captions: CaptionTokens
    backbone_config: BackboneConfig
    img_size: int
    crop_scale: tuple[float, ...]
    hflip: bool
    image_limits: dict[str, Any]  # load_image's bounds (dinoalign.data.images.image_limits)
    backbone: Any = None
    interpolation: str = "bicubic"

    @property
    def num_samples(self) -> int:
        return len(self.image_uris)

    def attach(self, device: torch.device, seed: int) -> None:
        """Build the frozen backbone exactly as the embed stage did (same config, seed)."""
        from dinoalign.backbones.dinov2 import build_backbone_from

        self.backbone = build_backbone_from(self.backbone_config, seed).to(device)

    def augment(self, images: list[np.ndarray], draw: Draw) -> Tensor:
        """H×W×3 uint8 images -> B×3×S×S uint8 crops; the crops and flips are a function
        of ``draw``."""
        from torchvision.transforms import v2

        transform = v2.Compose(
            [
                v2.RandomResizedCrop(
                    self.img_size,
                    scale=tuple(self.crop_scale),
                    interpolation=v2.InterpolationMode(self.interpolation),
                    antialias=True,
                ),
                v2.RandomHorizontalFlip(0.5 if self.hflip else 0.0),
            ]
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(draw.seed, AUGMENT_STREAM, draw.epoch, draw.step, draw.rank))
            return torch.stack(
                [transform(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)) for im in images]
            )

    def batch(self, rows: np.ndarray, draw: Draw) -> dict[str, Tensor]:
        """{"tokens_vision": B×(1+R+P)×D (frozen backbone on the crops), "tokens": B×context}."""
        from dinoalign.data.images import load_image

        if self.backbone is None:
            raise RuntimeError("DinoTxtImageData.attach(device, seed) must run before batch()")
        images = [
            load_image(self.image_uris[i], **self.image_limits)
            for i in rows
        ]
        x = self.backbone.normalize(self.augment(images, draw))
        with torch.no_grad():
            out = self.backbone(x)
        vision = torch.cat([out.cls.unsqueeze(1), out.registers, out.patches], dim=1)
        return {"tokens_vision": vision, "tokens": self.captions.draw(rows, draw)}

    def describe(self) -> dict[str, int]:
        return {"samples": self.num_samples, "captions": len(self.captions.tokens)}


# ----------------------------------------------------------------------------- building


@dataclasses.dataclass(frozen=True)
class FeatureSource:
    """Where a run's features come from: the store URI, its manifest spec, the pairs
    manifest (image URIs, resolved against ``root``) and the selected train uids."""

    features: str
    spec: Mapping[str, Any]
    manifest: pa.Table
    uids: list[str]
    root: Path


def read_spec(features: str) -> dict[str, Any]:
    """The feature store's manifest spec; a clear error when embed has not finished."""
    manifest = FeatureStore(features).read_manifest()
    if manifest is None:
        raise DataFileMissing(
            f"{features}/manifest.json is missing: run the embed stage first (dvc repro embed)"
        )
    return manifest["spec"]


def build_training_data(
    recipe: str,
    training: RecipeTrainingConfig,
    model_cfg: Any,
    source: FeatureSource,
    *,
    image_limits: dict[str, Any],
    seed: int,
) -> TrainingData:
    """The recipe's training samples over ``source.uids`` that have features (uids the
    embed stage rejected are skipped; :meth:`TrainingData.describe` counts what is left),
    as the recipe builds them (:meth:`dinoalign.recipes.Recipe.training_data`, which calls
    one of the builders below)."""
    from dinoalign.recipes import RECIPES

    return RECIPES.get(recipe).training_data(
        training, model_cfg, source, image_limits=image_limits, seed=seed
    )


def talk2dino_data(
    training: Talk2DINOTrainingConfig, source: FeatureSource, image_column: str = "head_embeddings"
) -> Talk2DINOData:
    """One sample per caption: its ``text_<align.talk2dino.text_encoder>`` row and the
    index of its image into ``head_embeddings`` (I×H×D; ``image_column`` when it is another
    one: a single vector per image becomes I×1×D)."""
    images = load_image_features(source.features, [image_column], source.uids)
    column = f"text_{training.text_encoder}"
    captions = _captions(source, images["uid"], [column])
    heads = images[image_column]
    return Talk2DINOData(
        text=column_to_numpy(captions.column(column), tuple(source.spec["columns"][column])),
        image_index=np.searchsorted(images["uid"], np.asarray(captions.column("uid").to_pylist())),
        head_embeddings=heads if heads.ndim == 3 else heads[:, None],
    )


def projector_data(source: FeatureSource) -> ProjectorData:
    """One sample per image: ``token_mean`` and its target ``clip_image``."""
    images = load_image_features(source.features, ["token_mean", "clip_image"], source.uids)
    return ProjectorData(token_mean=images["token_mean"], clip_image=images["clip_image"])


def dinotxt_data(
    training: DinoTxtTrainingConfig,
    model_cfg: Any,
    source: FeatureSource,
    *,
    image_limits: dict[str, Any],
) -> DinoTxtTokenData | DinoTxtImageData:
    """One sample per image with its captions' tokens (``model_cfg``'s tokenizer): the
    cached tokens for ``inputs: tokens``, the decoded images for ``inputs: images``."""
    if training.inputs == "tokens":
        images = load_image_features(
            source.features, ["cls", "registers", "patches"], source.uids
        )
        return DinoTxtTokenData(
            cls=images["cls"],
            registers=images["registers"],
            patches=images["patches"],
            captions=_caption_tokens(source, images["uid"], model_cfg),
        )
    # Only the uids that have features: the backbone must see what evaluation sees.
    uids = load_image_features(source.features, [], source.uids)["uid"]
    return DinoTxtImageData(
        image_uris=_image_uris(source, uids),
        captions=_caption_tokens(source, uids, model_cfg),
        backbone_config=features_backbone(source.spec, source.root),  # built on the Ray Train workers
        img_size=int(source.spec["img_size"]),
        crop_scale=training.crop_scale,
        hflip=training.hflip,
        image_limits=image_limits,
        interpolation=(recorded_preprocessing(source.spec, "backbone") or {}).get(
            "interpolation", "bicubic"
        ),
    )


def _captions(source: FeatureSource, image_uids: np.ndarray, columns: list[str]) -> pa.Table:
    """Caption rows (uid, caption_index, ``columns``) of ``image_uids``, sorted by
    (uid, caption_index)."""
    table = FeatureStore(source.features).read_all("captions", ["uid", "caption_index", *columns])
    table = table.filter(pc.is_in(table.column("uid"), value_set=pa.array(list(image_uids))))
    return table.sort_by([("uid", "ascending"), ("caption_index", "ascending")])


def _caption_tokens(source: FeatureSource, image_uids: np.ndarray, model_cfg: Any) -> CaptionTokens:
    """CLIP BPE tokens of the captions of ``image_uids`` (sorted), grouped per image."""
    import open_clip

    table = _captions(source, image_uids, ["caption"])
    owners = np.searchsorted(image_uids, np.asarray(table.column("uid").to_pylist()))
    count = np.bincount(owners, minlength=len(image_uids))
    if (count == 0).any():
        raise DataError(f"{int((count == 0).sum())} train images have no embedded caption")
    tokenizer = open_clip.get_tokenizer(model_cfg.tokenizer, context_length=model_cfg.context_length)
    tokens = tokenizer(table.column("caption").to_pylist()).numpy().astype(np.int32)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return CaptionTokens(tokens=tokens, start=start, count=count)


def _image_uris(source: FeatureSource, uids: np.ndarray) -> list[str]:
    """Image URIs of ``uids`` from the pairs manifest; repo-relative paths made absolute
    (Ray workers do not run in the repo)."""
    lookup = dict(zip(source.manifest.column("uid").to_pylist(), source.manifest.column("image_uri").to_pylist()))
    out = []
    for uid in uids:
        uri = lookup[str(uid)]
        out.append(uri if is_remote(uri) or Path(uri).is_absolute() else str(source.root / uri))
    return out


def features_backbone(spec: Mapping[str, Any], root: Path | None = None) -> BackboneConfig:
    """The BackboneConfig the features were made with (``spec["backbone"]`` also carries
    derived entries such as the weights hash, left out here). The spec records
    ``weights`` as params give it; a relative file is resolved against the checkout
    ``root`` (Ray Train workers do not run in it: :meth:`BackboneConfig.at_root`)."""
    names = {f.name for f in dataclasses.fields(BackboneConfig)}
    fields = {k: v for k, v in spec["backbone"].items() if k in names}
    return from_dict(BackboneConfig, fields, where="features manifest spec.backbone").at_root(root)


def check_backbone(
    spec: Mapping[str, Any], seed: int, features: str = "the features", root: Path | None = None
) -> None:
    """Raise unless the backbone rebuilt from the features' spec with ``seed`` (a relative
    weights file resolved against ``root``) has the weights and the preprocessing
    (mean/std, crop) that made the features at ``features`` (dinotxt's online mode must
    see what evaluation sees)."""
    from dinoalign.backbones.dinov2 import build_backbone_from, state_hash

    expected = spec["backbone"]["weights_sha"]
    backbone = build_backbone_from(features_backbone(spec, root), seed)
    recorded = recorded_preprocessing(spec, "backbone") or {}
    current = backbone.preprocessing(int(spec["img_size"]), recorded.get("interpolation"))
    check_preprocessing(spec, "backbone", current, features=features,
                        user="dinotxt's online images (the backbone rebuilt from the manifest)")
    got = state_hash(backbone)
    if got != expected:
        raise DataError(
            f"the backbone rebuilt from the features' manifest with seed {seed} has weights "
            f"{got}, but the features were made with {expected}: train with the seed (and "
            f"weights) the embed stage used, or re-run embed"
        )

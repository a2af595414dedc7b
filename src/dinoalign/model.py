"""A trained recipe together with the frozen towers it needs at inference time.

A saved recipe (``model.safetensors`` + ``config.json``) holds only what was trained;
the frozen DINOv2 backbone and, for talk2dino and the projector, the CLIP text tower
are rebuilt from the params sections in :class:`Towers` exactly as the embed stage builds them
(:func:`dinoalign.backbones.dinov2.build_backbone_from`: ``backbone`` + ``seed``; the
images resized and centre-cropped to ``embed.img_size``), so evaluation, the inference
commands and the training features all see the same image path.

Notation: B images, N texts, E joint width, D backbone width, H heads, P patches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinoalign.config import BackboneConfig, ClipConfig, EmbedConfig, TextEncoderConfig, describe_backbone
from dinoalign.errors import InferenceError
from dinoalign.recipes import Recipe, load_recipe
from dinoalign.recipes.base import (
    CLIP_TEXT,
    CONFIG_FILE,
    OWN_TEXT,
    TEXT_ENCODER,
    WEIGHTS_FILE,
    join_uri,
)
from dinoalign.storage import fs_for, model_name_at_root, read_bytes, under_root
from dinoalign.train.config import AlignConfig, recipe_names

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Where a model came from: the reference the user gave, the recipe, the sha256 of
    its weights file and its saved config."""

    reference: str
    recipe: str
    weights_sha256: str
    config: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceError(
            "device 'cuda' was asked for but no CUDA GPU is visible; use auto or cpu"
        )
    return torch.device(name)


def load_model(reference: str, root: Path, tracking_uri: str | None = None) -> tuple[Recipe, ModelInfo]:
    """The recipe saved under ``reference``: a folder (path relative to ``root``, absolute,
    or an ``s3://`` URI) or an MLflow model URI (``models:/dinoalign-talk2dino@champion``,
    ``runs:/<id>/model``) resolved against ``tracking_uri``."""
    if reference.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="dinoalign-model-") as tmp:
            local = _download_mlflow_model(reference, tracking_uri, Path(tmp))
            return _load_dir(str(local), reference)
    return _load_dir(under_root(reference, root), reference)


def _load_dir(directory: str, reference: str) -> tuple[Recipe, ModelInfo]:
    fs, path = fs_for(directory)
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not fs.exists(f"{path.rstrip('/')}/{n}")]
    if missing:
        raise InferenceError(
            f"no trained model at {reference!r}: {directory} lacks {', '.join(missing)}. Pass a "
            "folder written by the align stage (artifacts/models/<recipe>) or an MLflow URI "
            "such as models:/dinoalign-talk2dino@champion"
        )
    recipe = load_recipe(directory)  # a corrupt config.json or weights file: InferenceError
    config = json.loads(read_bytes(join_uri(directory, CONFIG_FILE)))
    weights_sha = hashlib.sha256(read_bytes(join_uri(directory, WEIGHTS_FILE))).hexdigest()
    return recipe, ModelInfo(reference, config["recipe"], weights_sha, config)


def _download_mlflow_model(reference: str, tracking_uri: str | None, dst: Path) -> Path:
    """Download an MLflow model's artifacts and return the folder in them that holds the
    recipe files (the model may have been logged as a plain folder or inside a flavour)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(dst)))
    except MlflowException as e:
        raise InferenceError(
            f"MLflow could not resolve {reference!r} at {mlflow.get_tracking_uri()}: {e.message.rstrip('.')}. "
            "Check the registered model name and alias (the align stage registers "
            "<tracking.experiment>-<recipe>, e.g. dinoalign-talk2dino, with alias 'candidate') and tracking.uri"
        ) from None
    candidates = sorted(
        p.parent for p in local.rglob(CONFIG_FILE) if (p.parent / WEIGHTS_FILE).is_file()
    )
    if not candidates:
        raise InferenceError(
            f"{reference} resolved to {local}, which holds no {CONFIG_FILE} + {WEIGHTS_FILE} "
            "pair: it is not a dinoalign recipe model"
        )
    return candidates[0]


@dataclasses.dataclass(frozen=True)
class Towers:
    """What rebuilds the frozen towers around a trained recipe, exactly as the embed stage
    built them: the backbone section and the seed (random-init backbones; a relative weights
    file is read from the model's root), the image size
    and interpolation of ``embed``, the CLIP, the embed text encoders and which one each
    recipe was trained on (``align.<recipe>.text_encoder``). :meth:`from_sections` picks them
    from those params sections."""

    backbone: BackboneConfig
    seed: int
    img_size: int
    interpolation: str | None
    clip: ClipConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    text_encoder_keys: Mapping[str, str]  # recipe -> embed text encoder key

    @classmethod
    def from_sections(
        cls, backbone: BackboneConfig, seed: int, embed: EmbedConfig, clip: ClipConfig, align: AlignConfig
    ) -> Towers:
        """The towers of these params sections: ``embed`` gives the image size,
        interpolation and text encoders, ``align`` each recipe's ``text_encoder``, as in
        ``Towers.from_sections(params.backbone, params.seed, params.embed, params.clip,
        params.align)``."""
        keys = {}
        for name in recipe_names():
            key = getattr(getattr(align, name, None), "text_encoder", None)
            if key is not None:
                keys[name] = key
        return cls(backbone, seed, embed.img_size, embed.interpolation, clip, tuple(embed.text_encoders), keys)


class AlignedModel:
    """``recipe`` + the frozen backbone and text tower of ``towers``.

    Image batches are ``dict[str, Tensor]`` with the keys the recipe reads
    (talk2dino ``head_embeddings`` B×H×D, projector ``token_mean`` B×D, dinotxt
    ``tokens_vision`` B×(1+R+P)×D); they come from raw images (:meth:`image_batch`) or
    from the embed stage's feature store (:meth:`store_batch`). What differs between
    recipes is asked of the recipe class (``image_columns``, ``text_input``,
    ``has_clip_reference`` ... in :class:`~dinoalign.recipes.Recipe`), never its name.
    """

    def __init__(
        self,
        recipe: Recipe,
        towers: Towers,
        root: Path,
        device: torch.device | str = "cpu",
        info: ModelInfo | None = None,
        batch_size: int = 64,
    ) -> None:
        self.recipe = recipe.to(device).eval()
        self.name: str = recipe.cfg.name
        self.towers = towers
        self.root = root
        self.device = torch.device(device)
        self.info = info
        self.batch_size = batch_size

    @classmethod
    def load(
        cls, reference: str, towers: Towers, root: Path, device: str = "auto", batch_size: int = 64,
        tracking_uri: str | None = None,
    ) -> AlignedModel:
        """The model at ``reference`` (:func:`load_model`; an MLflow URI is resolved
        against ``tracking_uri``) with ``towers``."""
        recipe, info = load_model(reference, root, tracking_uri)
        return cls(recipe, towers, root, resolve_device(device), info, batch_size)

    # ------------------------------------------------------------------ frozen towers

    @functools.cached_property
    def backbone(self) -> Any:
        """The frozen DINOv2 of ``towers.backbone``, seeded as the embed stage seeds it; a
        relative weights file is read from the root (the demo's pretrained backbone lives
        at ``artifacts/pretrain/model.safetensors``)."""
        from dinoalign.backbones.dinov2 import build_backbone_from

        cfg = self.towers.backbone
        recipe_backbone = getattr(self.recipe.cfg, "backbone", cfg.name)
        if recipe_backbone != cfg.name:
            raise InferenceError(
                f"the {self.name} model was trained on backbone {recipe_backbone!r} but "
                f"params name {cfg.name!r}: run with backbone.name={recipe_backbone}"
            )
        backbone = build_backbone_from(cfg.at_root(self.root), self.towers.seed).to(self.device)
        vision_dim = getattr(self.recipe.cfg, "vision_dim", backbone.embed_dim)
        if backbone.embed_dim != vision_dim:
            raise InferenceError(
                f"backbone {cfg.name} with {cfg.model_kwargs or 'default sizes'} is "
                f"{backbone.embed_dim} wide but the {self.name} model expects {vision_dim}: "
                "use the backbone params the model was trained with"
            )
        return backbone

    @functools.cached_property
    def text_tower(self) -> Any:
        """The frozen text encoder whose features the recipe reads (its ``text_input``):
        ``text_encoder`` (talk2dino) the embed text encoder it was trained on
        (``align.<recipe>.text_encoder``, a key of ``embed.text_encoders``), ``clip_text``
        (the projector) the text tower of its CLIP (``towers.clip``). A recipe with its
        own text tower (dinotxt) has none."""
        from dinoalign.backbones.text import build_text_encoder

        text_input = self.recipe.text_input
        if text_input == CLIP_TEXT:
            clip = self.towers.clip
            return build_text_encoder(
                "open_clip", self._under_root(clip.name), pretrained=clip.pretrained
            ).to(self.device)
        if text_input != TEXT_ENCODER:
            raise InferenceError(
                f"{self.name} encodes strings with its own text tower: it has no frozen one"
            )
        key = self.towers.text_encoder_keys[self.name]
        configs = {t.key: t for t in self.towers.text_encoders}
        if key not in configs:
            raise InferenceError(
                f"align.{self.name}.text_encoder is {key!r} but embed.text_encoders has only {sorted(configs)}"
            )
        t = configs[key]
        return build_text_encoder(
            t.kind, self._under_root(t.name), pretrained=t.pretrained, model_kwargs=t.model_kwargs
        ).to(self.device)

    @functools.cached_property
    def clip(self) -> tuple[Any, dict[str, Any]]:
        """(the full CLIP of ``towers.clip`` in eval mode, its open_clip preprocess config):
        the projector's teacher, whose own retrieval is the projector's reference."""
        from dinoalign.backbones.text import load_open_clip

        model, preprocess, _ = load_open_clip(
            self._under_root(self.towers.clip.name), self.towers.clip.pretrained
        )
        return model.eval().to(self.device), preprocess

    @functools.cached_property
    def preprocessing(self) -> dict[str, Any]:
        """How images reach the backbone, as the embed stage records it (the model's data
        config at ``embed.img_size``, ``embed.interpolation`` overriding when set)."""
        return self.backbone.preprocessing(self.towers.img_size, self.towers.interpolation)

    def _resize_crop(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 images -> B×S×S×3 crops at ``embed.img_size`` by the backbone's preprocessing."""
        from dinoalign.data.images import resize_crop

        p = self.preprocessing
        size = self.towers.img_size
        return np.stack(
            [resize_crop(img, size, p["interpolation"], p["crop_pct"], p["crop_mode"]) for img in images]
        )

    def check_store_preprocessing(self, store_uri: str) -> None:
        """Refuse features whose recorded preprocessing is not what this model's towers
        apply to the images they embed here: the backbone's, and for a recipe with a CLIP
        reference (the projector: the store's ``clip_image``) CLIP's."""
        from dinoalign.backbones.text import clip_preprocessing
        from dinoalign.embed.store import FeatureStore, check_preprocessing
        from dinoalign.errors import PreprocessingMismatch

        manifest = FeatureStore(store_uri).read_manifest()
        if manifest is None:
            return  # reading the features raises its own error
        spec = manifest["spec"]
        try:
            check_preprocessing(spec, "backbone", self.preprocessing, features=store_uri,
                                user=f"{self.name}'s backbone here (params backbone + embed)")
            if self.recipe.has_clip_reference and "clip_image" in spec["columns"]:
                check_preprocessing(spec, "clip", clip_preprocessing(self.clip[1]),
                                    features=store_uri, user="the CLIP of params.clip")
        except PreprocessingMismatch as err:
            raise InferenceError(str(err)) from None

    def clip_image_features(self, images: Sequence[np.ndarray]) -> Tensor:
        """B×E normalised CLIP image embeddings of raw uint8 images, made as the embed
        stage makes its ``clip_image`` column (resize + crop to ``embed.img_size``, then
        CLIP's own resize and normalisation)."""
        from dinoalign.backbones.text import to_clip_input

        model, preprocess = self.clip
        pixels = self._resize_crop(images)
        with torch.no_grad():
            return (
                model.encode_image(to_clip_input(pixels, preprocess, self.device), normalize=True)
                .float()
                .cpu()
            )

    @property
    def backbone_description(self) -> str:
        """The backbone in words (:func:`dinoalign.config.describe_backbone`: the weights
        file's own description, e.g. ``tiny self-supervised (demo)``, or ``random init``)."""
        return describe_backbone(self.towers.backbone, self.root)

    def _under_root(self, name: str) -> str:
        """An open_clip model name with a relative ``local-dir:`` path resolved against
        the root (:func:`dinoalign.storage.model_name_at_root`)."""
        return model_name_at_root(name, self.root)

    # ------------------------------------------------------------------ images

    def image_batch(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        """Raw uint8 H×W×3 images (any sizes) -> the recipe's image batch, through the
        embed stage's path: short side to ``embed.img_size`` + centre crop, the backbone,
        :func:`dinoalign.embed.features.image_features`."""
        x = self.backbone.normalize(torch.from_numpy(self._resize_crop(images)))
        return self._batch_from_backbone(x)

    def _batch_from_backbone(self, x: Tensor) -> dict[str, Tensor]:
        """Normalised images B×3×H×W -> the recipe's image batch (on the CPU), by
        :meth:`~dinoalign.recipes.Recipe.batch_from_images`."""
        with torch.no_grad():
            batch = self.recipe.batch_from_images(x, self.backbone)
        return {k: v.float().cpu() for k, v in batch.items()}

    def store_columns(self) -> tuple[str, ...]:
        """The feature-store columns :meth:`store_batch` reads for this recipe (its
        ``image_columns``)."""
        return self.recipe.image_columns

    def store_batch(self, store_uri: str, uids: Sequence[str]) -> dict[str, Tensor]:
        """The image batch of ``uids`` (in that order) from the embed stage's features.
        Every uid must have been embedded, with this model's preprocessing."""
        from dinoalign.embed.store import load_image_features

        self.check_store_preprocessing(store_uri)
        columns = self.store_columns()
        loaded = load_image_features(store_uri, columns, uids)
        row = {uid: i for i, uid in enumerate(loaded["uid"].tolist())}
        missing = [u for u in uids if u not in row]
        if missing:
            raise InferenceError(
                f"{len(missing)} of {len(uids)} images have no features in {store_uri} (e.g. "
                f"{missing[0]}): run the embed stage on them first"
            )
        order = np.asarray([row[u] for u in uids], dtype=np.int64)
        arrays = {c: torch.from_numpy(loaded[c][order].astype(np.float32)) for c in columns}
        return self.recipe.batch_from_features(arrays)

    def store_has_columns(self, store_uri: str) -> bool:
        """Whether the feature store holds every column :meth:`store_batch` needs."""
        from dinoalign.embed.store import FeatureStore

        manifest = FeatureStore(store_uri).read_manifest()
        return manifest is not None and all(
            c in manifest["spec"]["columns"] for c in self.store_columns()
        )

    # ------------------------------------------------------------------ texts

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """N strings -> N×E normalised text embeddings (the frozen :attr:`text_tower`
        first, unless the recipe has its own text tower: ``text_input`` ``own``)."""
        if not texts:
            raise InferenceError("no text to encode")
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                part = list(texts[start : start + self.batch_size])
                if self.recipe.text_input == OWN_TEXT:
                    chunks.append(self.recipe.encode_text(part))
                else:
                    raw = self.text_tower.encode(part, batch_size=self.batch_size)
                    chunks.append(self.recipe.encode_text(raw))
        return torch.cat(chunks).float()

    def class_embeddings(
        self, class_names: Sequence[str], templates: str | Sequence[str]
    ) -> Tensor:
        """N×E class embeddings from names × templates. Recipes that average prompt
        features (``averages_prompt_features``: talk2dino, as its paper does): the raw
        text features of the templates are averaged, then ``encode_text`` (ψ, normalise);
        the others by the CLIP protocol (normalise, average, re-normalise)."""
        from dinoalign.evaluate.templates import resolve_templates
        from dinoalign.evaluate.zeroshot import class_text_embeddings

        if not self.recipe.averages_prompt_features:
            return class_text_embeddings(self.encode_texts, class_names, templates, self.batch_size)
        prompts_per_class = resolve_templates(templates)
        prompts = [t.replace("{}", name) for name in class_names for t in prompts_per_class]
        with torch.no_grad():
            raw = self.text_tower.encode(prompts, batch_size=self.batch_size)
            mean = raw.view(len(class_names), len(prompts_per_class), -1).mean(dim=1)
            return self.recipe.encode_text(mean).float()

    # ------------------------------------------------------------------ scores

    def scores(self, text_embeddings: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """N×B text-image scores (the recipe's :meth:`~Recipe.similarity`: best head for
        talk2dino, cosine otherwise), images taken ``batch_size`` at a time."""
        n_images = next(iter(batch.values())).shape[0]
        parts = []
        with torch.no_grad():
            for start in range(0, n_images, self.batch_size):
                part = {k: v[start : start + self.batch_size] for k, v in batch.items()}
                parts.append(
                    self.recipe.similarity(text_embeddings.to(self.device), part).float().cpu()
                )
        return torch.cat(parts, dim=1)

    def logit_scale(self) -> float:
        """The scale of :meth:`scores` in a softmax: the recipe's trained one
        (:meth:`~dinoalign.recipes.Recipe.score_scale`), else its CLIP's (the projector's
        scores are cosines in CLIP's image space), else CLIP's customary 100."""
        scale = self.recipe.score_scale()
        if scale is not None:
            return scale
        if self.recipe.has_clip_reference:
            clip_scale = getattr(self.clip[0], "logit_scale", None)
            if clip_scale is not None:
                return float(clip_scale.detach().exp().clamp(max=100.0))
        return 100.0

    def score_batches(
        self, text_embeddings: Tensor, batches: Iterator[Mapping[str, Tensor]]
    ) -> Tensor:
        """N×M scores against image batches streamed one at a time (large sets whose
        features would not fit in memory at once, e.g. dinotxt's tokens)."""
        return torch.cat([self.scores(text_embeddings, b) for b in batches], dim=1)

    def index_vectors(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        """(V×E unit vectors for a nearest-neighbour index, vectors per image), on the CPU:
        the recipe's :meth:`~dinoalign.recipes.Recipe.index_vectors` (talk2dino indexes
        each image's H normalised head embeddings, so that the best inner product over an
        image's vectors is its best-head score; the others index encode_image)."""
        with torch.no_grad():
            vectors, per_image = self.recipe.index_vectors(batch)
        return vectors.float().cpu(), per_image

    # ------------------------------------------------------------------ dense

    def dense_logits_fn(
        self, class_embeddings: Tensor, clean_background: bool = False, cleaning_lambda: float = 0.2
    ) -> Any:
        """A :data:`dinoalign.evaluate.segmentation.LogitsFn` for ``class_embeddings``
        N×E: crop B×3×h×w (RGB 0–255) -> B×N×h'×w' scores on the patch grid.

        Crops whose sides are not multiples of the patch size are resized to the nearest
        multiples first, then go through the recipe's
        :meth:`~dinoalign.recipes.Recipe.dense_logits_from_images`. talk2dino: sigmoid
        maps, with background cleaning if asked (``has_background_cleaning``); dinotxt:
        cosines of its dense features with the second half of the text embedding. The
        projector has no dense head."""
        if not self.recipe.has_dense_head:
            raise InferenceError(
                f"{self.name} has no dense head (it maps one global feature per image): it "
                "cannot segment; use talk2dino or dinotxt"
            )
        backbone = self.backbone
        text = class_embeddings.to(self.device)
        patch = backbone.patch_size

        def logits(crop: Tensor) -> Tensor:
            height, width = crop.shape[-2:]
            size = (
                max(patch, round(height / patch) * patch),
                max(patch, round(width / patch) * patch),
            )
            x = crop.float().to(self.device)
            if size != (height, width):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = (x / 255.0 - backbone.mean[:, None, None]) / backbone.std[:, None, None]
            with torch.no_grad():
                return self.recipe.dense_logits_from_images(
                    x, backbone, text, clean_background, cleaning_lambda
                )

        return logits

"""The one inference path: segment, classify and embed with a trained recipe.

:class:`Predictor` is what both callers use: the ``dinoalign segment`` / ``classify``
commands (:mod:`dinoalign.infer`, a model folder or MLflow URI plus the params) and the
MLflow pyfunc model that ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run
(:mod:`dinoalign.serve`, a self-contained bundle). The same image bytes and class names
give the same label map, byte for byte, whichever door they came in by.

    towers = Towers.from_sections(params.backbone, params.seed, params.embed, params.clip, params.align)
    model = AlignedModel.load("artifacts/models/talk2dino", towers, root)
    predictor = Predictor(model, params.evaluate, params.data)
    result = predictor.segment(image, ["red circle", "blue square"])   # Segmentation
    png = result.png()                                                 # palette PNG bytes

Scores of ``classify`` are the recipe's own similarity (best head for talk2dino, cosine
otherwise); probabilities are ``softmax(scale · score)`` at the scale the model was trained
with (:meth:`~dinoalign.model.AlignedModel.logit_scale`), not CLIP's 100 for every model.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinoalign.errors import InferenceError

if TYPE_CHECKING:
    from dinoalign.config import DataConfig
    from dinoalign.evaluate.config import EvaluateConfig
    from dinoalign.model import AlignedModel
    from dinoalign.recipes import Recipe

MAX_SEGMENT_CLASSES = 254  # labels 0..255 in an 8-bit PNG, one reserved for background
_WORD = re.compile(r"[a-z0-9]+")
PARAMS_THRESHOLD = "params"


def check_classes(names: Sequence[str], max_classes: int | None = None) -> list[str]:
    """Class names as given, stripped; an empty list, empty names, repeats (ignoring case)
    and more than ``max_classes`` names are errors."""
    names = [str(n).strip() for n in names]
    if not names:
        raise InferenceError("no class names: give at least one")
    if any(not n for n in names):
        raise InferenceError(f"an empty class name in {names}: every class needs a name")
    seen: set[str] = set()
    for name in names:
        if name.lower() in seen:
            raise InferenceError(f"class {name!r} is given twice")
        seen.add(name.lower())
    if max_classes is not None and len(names) > max_classes:
        raise InferenceError(f"{len(names)} classes; at most {max_classes} fit in an 8-bit label map")
    return names


def caption_vocabulary(captions: Sequence[Sequence[str]]) -> set[str]:
    """Lower-case words of ``captions`` (one list per image): what a text encoder trained
    only on them has seen."""
    words: set[str] = set()
    for per_image in captions:
        for caption in per_image:
            words.update(_WORD.findall(caption.lower()))
    return words


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """A label map H×W (uint8; 0 = background when ``bg_threshold`` is set), its label
    names, each label's pixel fraction, and how it was made."""

    labels: np.ndarray
    names: list[str]
    bg_threshold: float | None
    bg_threshold_from: str
    pamr: bool

    @property
    def background(self) -> bool:
        return self.bg_threshold is not None

    def pixel_fraction(self) -> dict[str, float]:
        return {n: float((self.labels == i).mean()) for i, n in enumerate(self.names)}

    def palette(self) -> np.ndarray:
        from dinoalign.evaluate.visualize import class_palette

        return class_palette(self.names, background=self.background)

    def png(self) -> bytes:
        """The label map as a palette PNG (pixel values = labels, colours for viewing)."""
        from PIL import Image

        mask = Image.fromarray(self.labels)
        mask.putpalette(self.palette().reshape(-1).tolist())  # L -> P, the indices stay the labels
        out = io.BytesIO()
        mask.save(out, format="PNG")
        return out.getvalue()

    def overlay_png(self, image: np.ndarray) -> bytes:
        """``image`` with the labels blended over it and a colour key of those present."""
        from PIL import Image

        from dinoalign.evaluate.visualize import overlay, with_legend

        palette = self.palette()
        keep = (0,) if self.background else ()
        picture = Image.fromarray(overlay(image, self.labels, palette, keep=keep))
        present = sorted(np.unique(self.labels).tolist())
        out = io.BytesIO()
        with_legend(picture, self.names, palette, present).save(out, format="PNG")
        return out.getvalue()


class Predictor:
    """A loaded :class:`~dinoalign.model.AlignedModel` with the settings inference needs:
    the ``evaluate`` section (templates, segmentation windows, background cleaning), the
    image bounds of ``data`` and, for a text encoder that learnt only the train captions,
    their vocabulary (class words outside it are refused unless ``allow_unknown``)."""

    def __init__(
        self,
        model: AlignedModel,
        evaluate: EvaluateConfig,
        data: DataConfig,
        vocabulary: set[str] | None = None,
        reference: str | None = None,
    ) -> None:
        self.model = model
        self.evaluate = evaluate
        self.data = data
        self.vocabulary = vocabulary
        self.reference = reference or (model.info.reference if model.info else model.name)

    @property
    def name(self) -> str:
        return self.model.name

    # ------------------------------------------------------------------ inputs

    def read_image(self, uri: str) -> np.ndarray:
        return read_image(uri, self.data)

    def decode_image(self, data: bytes, what: str = "the image") -> np.ndarray:
        from dinoalign.data.images import ImageRejected, decode_image, image_limits

        limits = image_limits(self.data)
        if len(data) > limits["max_bytes"]:
            raise InferenceError(
                f"cannot use {what}: {len(data)} bytes, over data.max_bytes={limits['max_bytes']}"
            )
        try:
            return decode_image(
                data, max_pixels=limits["max_pixels"], min_side=limits["min_side"],
                max_aspect_ratio=limits["max_aspect_ratio"],
            )
        except ImageRejected as e:
            raise InferenceError(f"cannot use {what}: {e}") from None

    def check_known(self, texts: Sequence[str]) -> None:
        """Refuse words a caption-only text encoder never saw (see :func:`needs_vocabulary`)."""
        if self.vocabulary is None:
            return
        unknown = {t: [w for w in _WORD.findall(t.lower()) if w not in self.vocabulary] for t in texts}
        unknown = {t: words for t, words in unknown.items() if words}
        if unknown:
            listed = "; ".join(f"{t!r} ({', '.join(w)})" for t, w in unknown.items())
            raise InferenceError(
                f"unknown classes for this {self.name} model: {listed}. Its text encoder was "
                "trained only on the demo captions, which never use these words, so it cannot "
                "recognise them; allow unknown classes (--allow-unknown, allow_unknown: true) to "
                "score them anyway"
            )

    # ------------------------------------------------------------------ tasks

    def default_bg_threshold(self) -> float | None:
        return self.evaluate.segmentation_for(self.name).bg_threshold

    def segment(
        self,
        image: np.ndarray,
        classes: Sequence[str],
        bg_threshold: float | None | str = PARAMS_THRESHOLD,
        bg_threshold_from: str = "params",
        background: bool = True,
        pamr: bool = False,
        allow_unknown: bool = False,
    ) -> Segmentation:
        """Label map of ``image`` (H×W×3 uint8) over ``classes``: label 0 is background
        wherever no class scores above the threshold (``background``; the threshold of the
        params unless ``bg_threshold`` is given), classes 1..N; without ``background``
        classes are 0..N-1. ``pamr`` refines with PAMR."""
        import torch

        from dinoalign.evaluate.config import DEMO_DATASET
        from dinoalign.evaluate.segmentation import segment

        classes = check_classes(classes, MAX_SEGMENT_CLASSES)
        if not allow_unknown:
            self.check_known(classes)
        threshold: float | None = None
        if background:
            threshold = self.default_bg_threshold() if bg_threshold == PARAMS_THRESHOLD else bg_threshold
            if bg_threshold == PARAMS_THRESHOLD:
                bg_threshold_from = "params"
        else:
            bg_threshold_from = "no background"
        cfg = self.evaluate.segmentation_for(self.name)
        cfg = dataclasses.replace(cfg, pamr=cfg.pamr or pamr)
        # One image with a background threshold cleans as the demo world and VOC do (``auto``).
        clean = (
            self.evaluate.cleans_background(threshold is not None, DEMO_DATASET)
            and self.model.recipe.has_background_cleaning
        )
        embeddings = self.model.class_embeddings(classes, self.evaluate.dense_templates)
        logits_fn = self.model.dense_logits_fn(embeddings, clean, self.evaluate.cleaning_lambda)
        pixels = (
            torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(self.model.device)
        )
        with torch.no_grad():
            labels = segment(pixels, logits_fn, len(classes), cfg, threshold)[0]
        names = (["background"] if threshold is not None else []) + list(classes)
        return Segmentation(
            labels.cpu().numpy().astype(np.uint8), names, threshold, bg_threshold_from, cfg.pamr
        )

    def classify(
        self, images: Sequence[np.ndarray], classes: Sequence[str], allow_unknown: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, probabilities), each B×N for ``images`` against ``classes``: the
        recipe's similarity to template-averaged class embeddings, and its softmax at the
        model's own logit scale."""
        import torch

        classes = check_classes(classes)
        if not allow_unknown:
            self.check_known(classes)
        embeddings = self.model.class_embeddings(classes, self.evaluate.zeroshot_templates)
        scores = self.model.scores(embeddings, self.model.image_batch(list(images))).T  # B×N
        probabilities = torch.softmax(self.model.logit_scale() * scores, dim=1)
        return scores.numpy(), probabilities.numpy()

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """B×V×E unit vectors: what a nearest-neighbour index of this model holds per image
        (talk2dino: one per attention head, its best one scores; the others: V = 1)."""
        vectors, per_image = self.model.index_vectors(self.model.image_batch(list(images)))
        return vectors.numpy().reshape(len(images), per_image, -1)

    def embed_texts(self, texts: Sequence[str], allow_unknown: bool = False) -> np.ndarray:
        """N×E unit text vectors in the model's joint space."""
        texts = [str(t) for t in texts]
        if not texts or any(not t.strip() for t in texts):
            raise InferenceError("an empty text: give at least one non-blank text")
        if not allow_unknown:
            self.check_known(texts)
        return self.model.encode_texts(texts).numpy()


def read_image(uri: str, data: Any) -> np.ndarray:
    """The image at ``uri`` (H×W×3 uint8) within the bounds of ``data`` (a ``DataConfig``);
    a reject (unreadable, too large, a strip ...) is one InferenceError line."""
    from dinoalign.data.images import ImageRejected, image_limits, load_image

    try:
        return load_image(uri, **image_limits(data))
    except ImageRejected as e:
        raise InferenceError(f"cannot use image {uri}: {e}") from None


def needs_vocabulary(recipe: Recipe, teacher_clip: bool) -> bool:
    """Whether ``recipe``'s text encoder learnt only this project's captions: its own text
    tower (dinotxt), or any when the CLIP is the demo teacher trained on them
    (``teacher_clip``: ``teacher.enabled``)."""
    from dinoalign.recipes.base import OWN_TEXT

    return recipe.text_input == OWN_TEXT or teacher_clip


def training_vocabulary(pairs_dir: Path) -> set[str] | None:
    """Words of the train-split captions of the pairs manifest in ``pairs_dir`` (the
    prepare stage's folder, ``paths.pairs``), None when it is not here."""
    from dinoalign.data.prepare import read_pairs

    if not (pairs_dir / "summary.json").is_file():
        return None
    table = read_pairs(pairs_dir)
    return caption_vocabulary(
        [c for s, c in zip(table.column("split").to_pylist(), table.column("captions").to_pylist())
         if s == "train"]
    )


def to_builtin(value: Any) -> Any:
    """numpy scalars/arrays -> Python numbers/lists (JSON and pydantic friendly)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value

"""A trained recipe as an MLflow Model (pyfunc): load it anywhere, serve it, call it.

The align stage logs every trained recipe with :func:`log_model` and registers it as a
version of ``dinoalign-<recipe>``; then, in any process with dinoalign installed::

    model = mlflow.pyfunc.load_model("models:/dinoalign-talk2dino@candidate")
    model.predict([{"task": "segment", "image_b64": b64, "classes": ["red circle", "blue square"]}])

    mlflow models serve -m models:/dinoalign-talk2dino@candidate --env-manager local \\
        -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"inputs": [{"task": "classify", "image_b64": "...", "classes": ["red circle"]}]}'

The schema is defined once, as the pydantic models :class:`Request` and :class:`Response`;
MLflow derives the model signature from the type hints of :meth:`DinoalignModel.predict`
and validates every request against it (a wrong field type is a 400 before the model
runs). Tasks:

- ``segment`` (talk2dino, dinotxt): one image + class names -> the label map as a palette
  PNG (``mask_png_b64``; or ``mask`` as rows of label ids with ``mask_format: array``),
  the label names (index = label, 0 = background unless ``background: false``), each
  label's pixel fraction. ``bg_threshold`` / ``pamr`` as the ``segment`` command's options.
- ``classify``: one image + class names -> every class with its score and probability,
  best first (``top_k`` to keep the best k).
- ``embed``: an image -> its vectors (V×E: talk2dino one per attention head, else one), or
  a ``text`` -> its vector (1×E), in the model's joint space.

Images come as ``image_b64`` (the encoded file, base64) or ``image_uri``: a path or URI
the model process reads, allowed only under the folders / URL prefixes listed in
``$DINOALIGN_IMAGE_ROOTS`` (comma-separated; unset: none), so that a served model does not
read whatever file a request names. A bad request (not an image, no classes, an unknown
task, a segment request to the projector) is refused with one line and HTTP 400; the
server keeps serving.

What the model holds (its one artifact, the bundle folder, made by :func:`write_bundle`):
``recipe/`` (the trained weights and config.json), ``params.json`` (the resolved params the
towers and inference settings come from, ``tracking`` left out), ``towers/`` (copies of the
local frozen towers it needs: the demo teacher CLIP, a backbone weights file such as the
demo's pretrained one; a hub name stays a name and is downloaded by timm / open_clip where
the model runs), ``vocabulary.json`` (the train captions' words, for a text encoder that
knows only them) and ``bundle.json`` (recipe, weights and file sha256s, where each tower
came from and the backbone in words, dinoalign version and git commit).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pydantic
from mlflow.pyfunc import PythonModel

from dinoalign.errors import InferenceError

if TYPE_CHECKING:
    from dinoalign.config import Params
    from dinoalign.predict import Predictor

TASKS = ("segment", "classify", "embed")
MASK_FORMATS = ("png", "array")
IMAGE_ROOTS_ENV = "DINOALIGN_IMAGE_ROOTS"
BUNDLE = "bundle"  # the model's one artifact folder
BUNDLE_INFO, PARAMS_FILE, VOCABULARY_FILE = "bundle.json", "params.json", "vocabulary.json"
RECIPE_DIR, TOWERS_DIR = "recipe", "towers"


class Request(pydantic.BaseModel):
    """One request: a task, one image (``image_b64`` or ``image_uri``) or a ``text``, the
    class names, and the task's options (None: the model's defaults)."""

    task: str
    image_b64: Optional[str] = None
    image_uri: Optional[str] = None
    text: Optional[str] = None
    classes: Optional[list[str]] = None
    bg_threshold: Optional[float] = None
    background: Optional[bool] = None
    pamr: Optional[bool] = None
    mask_format: Optional[str] = None
    top_k: Optional[int] = None
    allow_unknown: Optional[bool] = None


class Prediction(pydantic.BaseModel):
    """One class of a ``classify`` answer."""

    label: str
    score: float
    probability: float


class Response(pydantic.BaseModel):
    """The answer to one :class:`Request`; fields of other tasks stay None."""

    task: str
    recipe: str
    labels: Optional[list[str]] = None
    mask_png_b64: Optional[str] = None
    mask: Optional[list[list[int]]] = None
    pixel_fraction: Optional[dict[str, float]] = None
    bg_threshold: Optional[float] = None
    predictions: Optional[list[Prediction]] = None
    vectors: Optional[list[list[float]]] = None


class DinoalignModel(PythonModel):
    """The pyfunc model: :meth:`load_context` builds a :class:`~dinoalign.predict.Predictor`
    from the bundle; :meth:`predict` answers a list of :class:`Request`."""

    def load_context(self, context: Any) -> None:
        self.predictor = load_bundle(Path(context.artifacts[BUNDLE]))

    def predict(self, context: Any, model_input: list[Request], params: Optional[dict[str, Any]] = None) -> list[Response]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return [answer(self.predictor, request) for request in model_input]
        except InferenceError as e:  # the user's request: HTTP 400 with the reason
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def answer(predictor: Predictor, request: Request) -> Response:
    """One request through the predictor (the same calls the CLI makes)."""
    from dinoalign.predict import to_builtin

    if request.task not in TASKS:
        raise InferenceError(f"unknown task {request.task!r}: use one of {', '.join(TASKS)}")
    allow_unknown = bool(request.allow_unknown)
    out = Response(task=request.task, recipe=predictor.name)
    if request.task == "embed" and request.text is not None:
        if request.image_b64 is not None or request.image_uri is not None:
            raise InferenceError("embed takes an image or a text, not both")
        out.vectors = to_builtin(predictor.embed_texts([request.text], allow_unknown))
        return out
    image = request_image(predictor, request)
    if request.task == "embed":
        out.vectors = to_builtin(predictor.embed_images([image])[0])
        return out
    if not request.classes:
        raise InferenceError(f"{request.task} needs classes: a list of class names")
    if request.task == "classify":
        scores, probabilities = predictor.classify([image], request.classes, allow_unknown)
        order = scores[0].argsort()[::-1]
        if request.top_k is not None:
            if request.top_k < 1:
                raise InferenceError(f"top_k must be >= 1, got {request.top_k}")
            order = order[: request.top_k]
        out.predictions = [
            Prediction(label=request.classes[i], score=float(scores[0, i]),
                       probability=float(probabilities[0, i]))
            for i in order
        ]
        return out
    mask_format = request.mask_format or "png"
    if mask_format not in MASK_FORMATS:
        raise InferenceError(f"mask_format {mask_format!r}: use one of {', '.join(MASK_FORMATS)}")
    if not predictor.model.recipe.has_dense_head:
        raise InferenceError(f"{predictor.name} has no dense head: it cannot segment (use talk2dino or dinotxt)")
    threshold: Any = request.bg_threshold if request.bg_threshold is not None else "params"
    result = predictor.segment(
        image, request.classes, threshold, "request", request.background is not False,
        bool(request.pamr), allow_unknown,
    )
    out.labels = result.names
    out.pixel_fraction = result.pixel_fraction()
    out.bg_threshold = result.bg_threshold
    if mask_format == "png":
        out.mask_png_b64 = base64.b64encode(result.png()).decode("ascii")
    else:
        out.mask = result.labels.astype(int).tolist()
    return out


def request_image(predictor: Predictor, request: Request) -> Any:
    """The request's image, H×W×3 uint8: decoded from ``image_b64`` or read from an
    ``image_uri`` under ``$DINOALIGN_IMAGE_ROOTS``."""
    from dinoalign.data.sources.pairs import within_roots

    if (request.image_b64 is None) == (request.image_uri is None):
        raise InferenceError(f"{request.task} needs one image: image_b64 (base64 of the file) or image_uri")
    if request.image_b64 is not None:
        try:
            data = base64.b64decode(request.image_b64, validate=False)
        except (binascii.Error, ValueError):
            raise InferenceError("image_b64 is not base64") from None
        return predictor.decode_image(data, "image_b64")
    roots = [r.strip() for r in os.environ.get(IMAGE_ROOTS_ENV, "").split(",") if r.strip()]
    if not within_roots(request.image_uri, roots):
        raise InferenceError(
            f"image_uri {request.image_uri!r} is not under ${IMAGE_ROOTS_ENV} ({roots or 'unset'}): "
            "send the image itself as image_b64, or list its folder in that variable where the model runs"
        )
    return predictor.read_image(request.image_uri)


# ----------------------------------------------------------------------------- the bundle


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_local(value: str, root: Path, dst: Path) -> bool:
    """Copy the local file or folder ``value`` (relative to ``root``) to ``dst``; False when
    ``value`` is not a local path (a hub or open_clip name stays a name)."""
    from dinoalign.storage import under_root

    if "://" in value:
        return False
    src = Path(under_root(value, root))
    if src.is_dir():
        shutil.copytree(src, dst)
        return True
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return True
    return False


def _bundle_tower(section: dict[str, Any], key: str, root: Path, out: Path, towers: dict[str, Any]) -> None:
    """Copy a tower's local ``name`` (``local-dir:``) and ``pretrained`` file into
    ``towers/<key>/`` and point ``section`` at the copies (relative to the bundle)."""
    from dinoalign.storage import LOCAL_DIR

    origin = {"name": section.get("name"), "pretrained": section.get("pretrained")}
    name = section.get("name") or ""
    if name.startswith(LOCAL_DIR) and _copy_local(name[len(LOCAL_DIR):], root, out / TOWERS_DIR / key):
        section["name"] = f"{LOCAL_DIR}{TOWERS_DIR}/{key}"
    pretrained = section.get("pretrained")
    if pretrained and _copy_local(pretrained, root, out / TOWERS_DIR / f"{key}-weights" / Path(pretrained).name):
        section["pretrained"] = f"{TOWERS_DIR}/{key}-weights/{Path(pretrained).name}"
    towers[key] = {"from": origin, "bundled": section.get("name") != origin["name"]
                   or section.get("pretrained") != origin["pretrained"]}


def write_bundle(model_dir: str | Path, params: Params, root: Path, out: Path) -> Path:
    """The self-contained folder :class:`DinoalignModel` loads (module docstring)."""
    from dinoalign.config import BackboneConfig, describe_backbone, to_dict
    from dinoalign.predict import needs_vocabulary, training_vocabulary
    from dinoalign.recipes import load_recipe
    from dinoalign.recipes.base import CLIP_TEXT, CONFIG_FILE, TEXT_ENCODER, WEIGHTS_FILE
    from dinoalign.storage import under_root
    from dinoalign.tracking import git_commit

    model_dir = Path(model_dir)
    out.mkdir(parents=True)
    (out / RECIPE_DIR).mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(model_dir / name, out / RECIPE_DIR / name)
    recipe = load_recipe(str(out / RECIPE_DIR))

    raw = to_dict(params)
    raw.pop("tracking", None)  # where runs go is not part of the model (and may hold a host)
    towers: dict[str, Any] = {}
    backbone = raw["backbone"]
    towers["backbone"] = {"from": {"name": backbone["name"], "weights": backbone.get("weights")}, "bundled": False,
                          "description": describe_backbone(BackboneConfig(**backbone), root)}  # e.g. tiny self-supervised (demo)
    if backbone.get("weights") and _copy_local(
        backbone["weights"], root, out / TOWERS_DIR / "backbone" / Path(backbone["weights"]).name
    ):
        backbone["weights"] = f"{TOWERS_DIR}/backbone/{Path(backbone['weights']).name}"
        towers["backbone"]["bundled"] = True
    if recipe.text_input == TEXT_ENCODER:
        key = getattr(params.align, recipe.cfg.name).text_encoder
        entries = [e for e in raw["embed"]["text_encoders"] if e["key"] == key]
        raw["embed"]["text_encoders"] = entries  # the one it was trained on
        for entry in entries:
            _bundle_tower(entry, f"text-{key}", root, out, towers)
    if recipe.text_input == CLIP_TEXT or recipe.has_clip_reference:
        _bundle_tower(raw["clip"], "clip", root, out, towers)
    (out / PARAMS_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")

    vocabulary = None
    if needs_vocabulary(recipe, params.teacher.enabled):
        words = training_vocabulary(Path(under_root(params.paths.pairs, root)))
        vocabulary = sorted(words) if words is not None else None
    (out / VOCABULARY_FILE).write_text(json.dumps(vocabulary) + "\n")

    from dinoalign.cli import package_version

    info = {
        "recipe": recipe.cfg.name,
        "weights_sha256": _sha256(out / RECIPE_DIR / WEIGHTS_FILE),
        "towers": towers,
        "dinoalign_version": package_version(),
        "git_commit": git_commit(root),
        "files": {
            str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()
        },
    }
    (out / BUNDLE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def read_bundle_info(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / BUNDLE_INFO).read_text())


def load_bundle(bundle: Path, device: str | None = None) -> Predictor:
    """A :class:`~dinoalign.predict.Predictor` from a bundle folder; every file checked
    against the sha256 recorded when it was written."""
    import torch

    from dinoalign.config import Params, from_dict
    from dinoalign.model import AlignedModel, ModelInfo, Towers
    from dinoalign.predict import Predictor
    from dinoalign.recipes import load_recipe

    bundle = Path(bundle).resolve()
    info = read_bundle_info(bundle)
    for name, digest in info["files"].items():
        path = bundle / name
        if not path.is_file() or _sha256(path) != digest:
            raise InferenceError(f"the model bundle {bundle} is damaged: {name} is missing or changed")
    raw = json.loads((bundle / PARAMS_FILE).read_text())
    if raw["backbone"].get("weights") and raw["backbone"]["weights"].startswith(f"{TOWERS_DIR}/"):
        raw["backbone"]["weights"] = str(bundle / raw["backbone"]["weights"])
    for section in [raw["clip"], *raw["embed"]["text_encoders"]]:
        if section.get("pretrained") and str(section["pretrained"]).startswith(f"{TOWERS_DIR}/"):
            section["pretrained"] = str(bundle / section["pretrained"])
    bundled = from_dict(Params, raw, where=str(bundle / PARAMS_FILE))  # as they were at logging
    vocabulary = json.loads((bundle / VOCABULARY_FILE).read_text())
    recipe = load_recipe(str(bundle / RECIPE_DIR))
    torch.set_num_threads(bundled.evaluate.torch_threads)
    from dinoalign.model import resolve_device

    model_info = ModelInfo(str(bundle), info["recipe"], info["weights_sha256"],
                           json.loads((bundle / RECIPE_DIR / "config.json").read_text()))
    towers = Towers.from_sections(bundled.backbone, bundled.seed, bundled.embed, bundled.clip, bundled.align)
    model = AlignedModel(recipe, towers, bundle, resolve_device(device or bundled.evaluate.device),
                         model_info, bundled.evaluate.batch_size)
    words = set(vocabulary) if vocabulary is not None else None
    return Predictor(model, bundled.evaluate, bundled.data, words, str(bundle))


# ----------------------------------------------------------------------------- logging


def example_request(predictor: Predictor) -> dict[str, Any]:
    """A small valid request for the model's input example: a classify of a drawn disc
    against two class names the model knows."""
    import io

    from PIL import Image, ImageDraw

    from dinoalign.data.synthetic import CLASSES

    picture = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(picture).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    known = [c for c in CLASSES if predictor.vocabulary is None
             or all(w in predictor.vocabulary for w in c.split())]
    classes = known[:2] if len(known) >= 2 else ["a photo of a cat", "a photo of a dog"]
    return {"task": "classify", "image_b64": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "classes": classes}


@dataclasses.dataclass(frozen=True)
class LoggedModel:
    """What :func:`log_model` logged: the MLflow model URI (``models:/m-...``), its id and
    the bundle's record (recipe, weights sha256, towers)."""

    model_uri: str
    model_id: str
    info: dict[str, Any]


def log_model(model_dir: str | Path, params: Params, root: Path, name: str) -> LoggedModel:
    """Log the recipe at ``model_dir`` as a pyfunc model ``name`` of the active run, with
    its signature (from :class:`Request` / :class:`Response`) and an input example that
    MLflow runs through the loaded model before it accepts the log."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="dinoalign-bundle-") as tmp:
        kwargs, info = _pyfunc_kwargs(model_dir, params, root, Path(tmp))
        logged = mlflow.pyfunc.log_model(
            name=name, tags={"dinoalign.recipe": info["recipe"], "dinoalign.weights_sha256": info["weights_sha256"]},
            **kwargs,
        )
    return LoggedModel(logged.model_uri, logged.model_id, info)


def save_model(model_dir: str | Path, params: Params, root: Path, path: Path) -> dict[str, Any]:
    """The same MLflow model as :func:`log_model`, written to the folder ``path`` without a
    tracking server (``mlflow models serve -m <path>``); returns the bundle's record."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="dinoalign-bundle-") as tmp:
        kwargs, info = _pyfunc_kwargs(model_dir, params, root, Path(tmp))
        mlflow.pyfunc.save_model(str(path), **kwargs)
    return info


def _pyfunc_kwargs(model_dir: str | Path, params: Params, root: Path, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arguments of ``mlflow.pyfunc.log_model`` / ``save_model`` shared by both, with
    the bundle written under ``tmp``, and the bundle's record."""
    bundle = write_bundle(model_dir, params, root, tmp / BUNDLE)
    info = read_bundle_info(bundle)
    example = example_request(load_bundle(bundle, device="cpu"))
    kwargs = {
        "python_model": DinoalignModel(),
        "artifacts": {BUNDLE: str(bundle)},
        "input_example": [example],
        "pip_requirements": _requirements(),
        "metadata": {k: info[k] for k in ("recipe", "weights_sha256", "dinoalign_version", "git_commit")},
    }
    return kwargs, info


def _requirements() -> list[str]:
    """The packages the model needs where it runs, at the versions it was logged with
    (dinoalign itself is installed from its repository at the bundle's git commit)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "timm", "open_clip_torch", "safetensors", "numpy",
                    "pillow", "pydantic", "pyarrow", "pyyaml", "fsspec", "s3fs"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return out

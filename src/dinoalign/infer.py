"""The inference commands of ``dinoalign``: segment, classify, index and retrieve (their
arguments: :mod:`dinoalign.infer_cli`, which imports this module only when one runs).

    dinoalign segment  --model M --image I --classes "cat,dog,sky" --out mask.png [--overlay overlay.png]
    dinoalign classify --model M --image I --classes "cat,dog,sky" [--top-k 5]
    dinoalign index    --model M --out DIR [--split test]     FAISS index of embedded images
    dinoalign retrieve --model M --index DIR --text "a red circle" [-k 5]

``M`` is a model folder (``artifacts/models/talk2dino``) or an MLflow model URI
(``models:/dinoalign-talk2dino@champion``). The frozen backbone and CLIP text tower come
from the params (``-p params.yaml`` and ``key=value`` overrides), as in every stage.
Results are printed as JSON on stdout; problems (a missing model, an unreadable image, a
bad class list, an index of another model) end with a message on stderr and exit code 2.

Unknown classes: a text encoder trained only on this project's captions (dinotxt's
text tower; the demo teacher CLIP of talk2dino and the projector) has never seen words
outside them, so a class with such a word is refused (``--allow-unknown`` to go on).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinoalign.config import Params, load_params
from dinoalign.errors import InferenceError
from dinoalign.predict import MAX_SEGMENT_CLASSES
from dinoalign.storage import under_root

if TYPE_CHECKING:
    from dinoalign.model import AlignedModel
    from dinoalign.predict import Predictor

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
INDEX_META = "index.json"


def _check_output(path: Path | None, flag: str) -> None:
    """An output PNG path that is not a folder (refused before the model is loaded)."""
    if path is not None and path.is_dir():
        raise InferenceError(f"{flag} {path} is a folder; give a file name such as {path}/mask.png")


def _handle(
    command: Callable[[argparse.Namespace, Params, Path], dict[str, Any]],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: load params, run, print its JSON result. Its user errors
    (:class:`~dinoalign.errors.UserError`) are one line and exit 2 in ``cli.main``."""

    def run(args: argparse.Namespace) -> int:
        params = load_params(args.params, args.overrides)
        root = Path(args.params).resolve().parent
        result = command(args, params, root)
        print(json.dumps(result, indent=2))
        return 0

    return run


def _load(args: argparse.Namespace, params: Params, root: Path) -> AlignedModel:
    return _predictor(args, params, root).model


def _predictor(args: argparse.Namespace, params: Params, root: Path) -> Predictor:
    """The model of ``--model`` (a folder relative to the cwd, or an MLflow URI) with the
    towers and settings of the params and, for a text encoder that learnt only the train
    captions, their vocabulary (the check is off with ``--allow-unknown``)."""
    import torch

    from dinoalign.model import MLFLOW_SCHEMES, AlignedModel, Towers
    from dinoalign.predict import Predictor, needs_vocabulary, training_vocabulary
    from dinoalign.tracking import tracking_uri

    reference = args.model
    if "://" not in reference and not reference.startswith(("models:/", "runs:/")):
        reference = str(Path(reference).resolve())  # a folder on the command line is relative to the cwd
    cfg = params.evaluate
    torch.set_num_threads(cfg.torch_threads)
    towers = Towers.from_sections(params.backbone, params.seed, params.embed, params.clip, params.align)
    uri = tracking_uri(params) if reference.startswith(MLFLOW_SCHEMES) else None
    model = AlignedModel.load(reference, towers, root, args.device or cfg.device, cfg.batch_size, uri)
    vocabulary = None
    if needs_vocabulary(model.recipe, params.teacher.enabled):
        vocabulary = training_vocabulary(Path(under_root(params.paths.pairs, root)))
    return Predictor(model, cfg, params.data, vocabulary, reference)


# ----------------------------------------------------------------------------- classes


def parse_classes(text: str, max_classes: int | None = None) -> list[str]:
    """``"cat, dog,sky"`` -> ``["cat", "dog", "sky"]``; empty names, repeats (ignoring
    case) and more than ``max_classes`` names are errors."""
    from dinoalign.predict import check_classes

    if not text.strip() or any(not n.strip() for n in text.split(",")):
        raise InferenceError(
            f"--classes {text!r} has an empty class name: give names separated by commas"
        )
    try:
        return check_classes(text.split(","), max_classes)
    except InferenceError as e:
        raise InferenceError(f"--classes: {e}") from None


# ----------------------------------------------------------------------------- segment / classify


def segment_command(args: argparse.Namespace, params: Params, root: Path) -> dict[str, Any]:
    """Label map of ``--image`` over ``--classes`` (label 0 = background unless
    ``--no-background``), written as a palette PNG; optionally an overlay. The work is
    :meth:`dinoalign.predict.Predictor.segment`, as in the served model."""
    _check_output(args.out, "--out")
    _check_output(args.overlay, "--overlay")
    classes = parse_classes(args.classes, MAX_SEGMENT_CLASSES)
    predictor = _predictor(args, params, root)
    image = predictor.read_image(args.image)
    threshold: Any = args.bg_threshold
    threshold_from = "--bg-threshold"
    if threshold is None:
        threshold, threshold_from = evaluated_bg_threshold(predictor.model, params, root)
    result = predictor.segment(
        image, classes, threshold, threshold_from, background=not args.no_background,
        pamr=args.pamr, allow_unknown=args.allow_unknown,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(result.png())
    answer: dict[str, Any] = {
        "model": args.model,
        "recipe": predictor.name,
        "image": args.image,
        "labels": dict(enumerate(result.names)),
        "pixel_fraction": result.pixel_fraction(),
        "bg_threshold": result.bg_threshold,
        "bg_threshold_from": result.bg_threshold_from,
        "pamr": result.pamr,
        "mask": str(args.out),
    }
    if args.overlay is not None:
        args.overlay.parent.mkdir(parents=True, exist_ok=True)
        args.overlay.write_bytes(result.overlay_png(image))
        answer["overlay"] = str(args.overlay)
    return answer


def evaluated_bg_threshold(
    model: AlignedModel, params: Params, root: Path
) -> tuple[float | None, str]:
    """(background threshold, where it comes from): the one the evaluate stage used for
    these very weights (``metrics/<recipe>.details.json``, chosen on the val split in the
    demo), else the params' ``evaluate.segmentation.bg_threshold`` / ``bg_thresholds``."""
    from dinoalign.evaluate.headline import details_path

    path = details_path(under_root(params.paths.metrics, root), model.name)
    if path.is_file() and model.info is not None:
        metrics = json.loads(path.read_text())
        evaluated = (metrics.get("info", {}).get("model") or {}).get("weights_sha256")
        threshold = metrics.get("segmentation", {}).get("bg_threshold")
        if evaluated == model.info.weights_sha256 and threshold is not None:
            return float(threshold), f"{path} (the evaluate stage's, for these weights)"
    return params.evaluate.segmentation_for(model.name).bg_threshold, "params"


def classify_command(args: argparse.Namespace, params: Params, root: Path) -> dict[str, Any]:
    """Zero-shot scores of ``--image`` for each of ``--classes`` (the recipe's own
    similarity against template-averaged class embeddings), best first; probabilities
    are the softmax of the scores at the model's own logit scale
    (:meth:`dinoalign.predict.Predictor.classify`, as in the served model)."""
    classes = parse_classes(args.classes)
    if args.top_k < 1:
        raise InferenceError(f"--top-k must be >= 1, got {args.top_k}")
    predictor = _predictor(args, params, root)
    image = predictor.read_image(args.image)
    scores, probabilities = predictor.classify([image], classes, args.allow_unknown)
    order = scores[0].argsort()[::-1][: args.top_k].tolist()
    return {
        "model": args.model,
        "recipe": predictor.name,
        "image": args.image,
        "logit_scale": predictor.model.logit_scale(),
        "predictions": [
            {"class": classes[i], "score": float(scores[0, i]), "probability": float(probabilities[0, i])}
            for i in order
        ],
    }


# ----------------------------------------------------------------------------- index / retrieve


def index_command(args: argparse.Namespace, params: Params, root: Path) -> dict[str, Any]:
    """A FAISS inner-product index of the embedded images (``paths.features``) under the
    model's image vectors, with the uid and image URI of every item."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dinoalign.data.prepare import read_pairs
    from dinoalign.embed.store import FeatureStore

    model = _load(args, params, root)
    features = under_root(params.paths.features, root)
    store = FeatureStore(features)
    manifest = store.read_manifest()
    if manifest is None:
        raise InferenceError(
            f"no features at {features}: run the embed stage first (dinoalign embed)"
        )
    embedded = sorted(store.keys("images", "uid"))
    pairs = {r["uid"]: r for r in read_pairs(under_root(params.paths.pairs, root)).to_pylist()}
    uids = [
        u
        for u in embedded
        if u in pairs and (args.split is None or pairs[u]["split"] == args.split)
    ]
    if not uids:
        raise InferenceError(
            f"no embedded images{'' if args.split is None else f' in split {args.split!r}'} to index"
        )
    if not model.store_has_columns(features):
        raise InferenceError(
            f"the features at {features} lack {', '.join(model.store_columns())} that {model.name} needs: "
            "re-run embed with embed.keep_patches=true"
        )
    batch = model.store_batch(features, uids)
    vectors, per_item = model.index_vectors(batch)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))
    args.out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(args.out / INDEX_FILE))
    pq.write_table(
        pa.table(
            {
                "uid": uids,
                "image_uri": [pairs[u]["image_uri"] for u in uids],
                "split": [pairs[u]["split"] for u in uids],
                "captions": [list(pairs[u]["captions"]) for u in uids],
            }
        ),
        args.out / ITEMS_FILE,
    )
    meta = {
        "recipe": model.name,
        "model": args.model,
        "model_sha256": model.info.weights_sha256 if model.info else None,
        "features": features,
        "feature_spec": manifest["spec"]["spec_hash"],
        "split": args.split,
        "items": len(uids),
        "vectors_per_item": per_item,
        "dim": int(vectors.shape[1]),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (args.out / INDEX_META).write_text(json.dumps(meta, indent=2) + "\n")
    return {"index": str(args.out), **meta}


def search(
    index: Any, query: np.ndarray, k: int, per_item: int, n_items: int
) -> list[tuple[int, float]]:
    """The ``k`` best items for one query (1×E): items own ``per_item`` consecutive
    vectors and score by their best one. Searching k·per_item vectors is exact: every
    vector ranked above the k-th best item's best vector belongs to one of the k−1
    items ranked above it."""
    k = min(k, n_items)
    scores, ids = index.search(np.ascontiguousarray(query, dtype=np.float32), k * per_item)
    best: dict[int, float] = {}
    for score, vector in zip(scores[0].tolist(), ids[0].tolist()):
        if vector >= 0:
            item = vector // per_item
            best.setdefault(item, score)  # results come best first
    return sorted(best.items(), key=lambda item: -item[1])[:k]


def retrieve_command(args: argparse.Namespace, params: Params, root: Path) -> dict[str, Any]:
    """The ``k`` images of ``--index`` that best match ``--text`` (the recipe's own
    similarity: talk2dino's best head, cosine otherwise)."""
    import faiss
    import pyarrow.parquet as pq

    if not args.text.strip():
        raise InferenceError("--text is empty")
    if args.k < 1:
        raise InferenceError(f"-k must be >= 1, got {args.k}")
    meta_path = args.index / INDEX_META
    if not meta_path.is_file():
        raise InferenceError(
            f"{args.index} is not an index folder (no {INDEX_META}): build one with `dinoalign index`"
        )
    meta = json.loads(meta_path.read_text())
    predictor = _predictor(args, params, root)
    model = predictor.model
    if model.info is not None and meta["model_sha256"] != model.info.weights_sha256:
        raise InferenceError(
            f"the index {args.index} was built with another model ({meta['model']}, weights "
            f"{str(meta['model_sha256'])[:12]}…) than {args.model} ({model.info.weights_sha256[:12]}…): "
            f"rebuild it with `dinoalign index --model {args.model} --out {args.index}`"
        )
    if not args.allow_unknown:
        predictor.check_known([args.text])
    index = faiss.read_index(str(args.index / INDEX_FILE))
    items = pq.read_table(args.index / ITEMS_FILE).to_pylist()
    query = model.encode_texts([args.text]).numpy()
    hits = search(index, query, args.k, int(meta["vectors_per_item"]), len(items))
    return {
        "model": args.model,
        "recipe": model.name,
        "text": args.text,
        "results": [
            {"rank": rank + 1, "score": score, **items[item]}
            for rank, (item, score) in enumerate(hits)
        ],
    }

"""The arguments of the inference commands of ``dinoalign`` (segment, classify, index,
retrieve); the commands themselves are :mod:`dinoalign.infer`.

Import-light, like every module ``dinoalign --help`` reads: :mod:`dinoalign.infer` (numpy,
and torch once a model loads) is imported only when one of its commands runs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_inference_commands(
    sub: Any, params_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register segment, classify, index and retrieve on the ``dinoalign`` sub-parsers;
    each sets ``handler`` (called with the parsed args, returns the exit code)."""
    seg = sub.add_parser(
        "segment", help="open-vocabulary segmentation of one image into a label PNG"
    )
    _model_args(seg)
    seg.add_argument("--image", required=True, help="image file or URI")
    seg.add_argument(
        "--classes", required=True, help='comma-separated class names, e.g. "cat,dog,sky"'
    )
    seg.add_argument(
        "--out", required=True, type=Path, help="label map PNG (palette indices = labels)"
    )
    seg.add_argument(
        "--overlay", type=Path, help="also write the image with the labels blended over it"
    )
    seg.add_argument(
        "--bg-threshold",
        type=_finite_float,
        default=None,
        help="background (label 0) where no class scores above this (default: the threshold "
        "the evaluate stage used for this model, else evaluate params)",
    )
    seg.add_argument(
        "--no-background", action="store_true", help="no background label: classes are 0..N-1"
    )
    seg.add_argument("--pamr", action="store_true", help="refine with PAMR (slower)")
    params_args(seg)
    seg.set_defaults(handler=_command("segment"))

    cls = sub.add_parser("classify", help="zero-shot classification of one image")
    _model_args(cls)
    cls.add_argument("--image", required=True, help="image file or URI")
    cls.add_argument(
        "--classes", required=True, help='comma-separated class names, e.g. "cat,dog,sky"'
    )
    cls.add_argument("--top-k", type=int, default=5, help="how many classes to print (default 5)")
    params_args(cls)
    cls.set_defaults(handler=_command("classify"))

    idx = sub.add_parser("index", help="build a FAISS index of the embedded images for retrieve")
    _model_args(idx)
    idx.add_argument("--out", required=True, type=Path, help="index folder to write")
    idx.add_argument(
        "--split",
        default=None,
        help="only images of this split of the pairs manifest (default: all)",
    )
    params_args(idx)
    idx.set_defaults(handler=_command("index"))

    ret = sub.add_parser("retrieve", help="the images of an index that best match a text")
    _model_args(ret)
    ret.add_argument(
        "--index", required=True, type=Path, help="folder written by `dinoalign index`"
    )
    ret.add_argument("--text", required=True, help="the query")
    ret.add_argument("-k", "--k", type=int, default=5, help="how many images (default 5)")
    params_args(ret)
    ret.set_defaults(handler=_command("retrieve"))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model folder or MLflow URI, e.g. models:/dinoalign-talk2dino@candidate (align registers every model "
        "with it; @champion once `dinoalign retrain` has promoted one)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("auto", "cpu", "cuda"),
        help="auto | cpu | cuda (default: evaluate.device)",
    )
    p.add_argument(
        "--allow-unknown",
        action="store_true",
        help="accept class words the model's text encoder never saw in training",
    )


def _finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of ``dinoalign <name>``: ``infer.<name>_command`` run by ``infer._handle``
    (params loaded, JSON result printed), with :mod:`dinoalign.infer` imported only then."""

    def run(args: argparse.Namespace) -> int:
        from dinoalign import infer

        return infer._handle(getattr(infer, f"{name}_command"))(args)

    return run

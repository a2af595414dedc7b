"""Semantic-segmentation benchmarks in the layouts that mmsegmentation prepares.

``root`` may be the dataset folder itself or a parent of it (``VOCdevkit/``, ``data/``):
each adapter looks for its marker folder under the usual sub-paths.

- ``voc21`` / ``voc20``: ``VOC2012/JPEGImages/*.jpg``, ``VOC2012/SegmentationClass/*.png``
  (palette PNG), ``VOC2012/ImageSets/Segmentation/<split>.txt``. 21 classes with
  background / 20: background ignored, ids − 1.
- ``context60`` / ``context59``: ``VOC2010/JPEGImages``, ``VOC2010/SegmentationClassContext``
  (mmseg's converted PNGs), ``VOC2010/ImageSets/SegmentationContext/<split>.txt``.
  60 classes with background / 59: id 0 ignored, ids − 1.
- ``cocostuff164k``: ``coco_stuff164k/images/<split>/*.jpg`` and
  ``coco_stuff164k/annotations/<split>/*_labelTrainIds.png``. 171 classes.
- ``coco_object``: the same images, ``annotations/<split>/*_instanceTrainIds.png``.
  80 classes + background.
- ``cityscapes``: ``cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``cityscapes/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png``. 19 classes.
- ``ade20k``: ``ADEChallengeData2016/images/<split>/*.jpg`` and
  ``ADEChallengeData2016/annotations/<split>/*.png``. 150 classes: id 0 ignored, ids − 1.
- ``folder``: ``<images>/*<image_suffix>``, ``<labels>/*<label_suffix>`` and a class-names
  file, ids as stored; 255 and the ``ignore_ids`` are ignored (docs/evaluation-datasets.md).

COCO-Object's ``*_instanceTrainIds.png`` (0 = background, 1–80 = the thing classes) are
written next to COCO-Stuff's by GroupViT/TCL's ``convert_coco_object.py`` from COCO-Stuff's
raw 164k masks: a thing pixel gets its train id + 1, stuff becomes 0 (and, through a uint8
wrap-around in that script, so does "unlabelled"); any 255 left is ignored here.
Cityscapes needs ``*_gtFine_labelTrainIds.png`` from cityscapesscripts'
``createTrainIdLabelImgs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinoalign.errors import ConfigError
from dinoalign.evaluate.datasets import classnames
from dinoalign.evaluate.datasets.base import (
    EVAL_DATASETS,
    DatasetFiles,
    SegmentationDataset,
    SegmentationSample,
    check_unique_names,
    paired_dir_samples,
    reduce_zero_label_lut,
    split_file_samples,
)

_VOC_LAYOUT = (
    "VOC2012/JPEGImages/*.jpg, VOC2012/SegmentationClass/*.png, "
    "VOC2012/ImageSets/Segmentation/{split}.txt"
)
_CONTEXT_LAYOUT = (
    "VOC2010/JPEGImages/*.jpg, VOC2010/SegmentationClassContext/*.png (mmseg's "
    "tools/dataset_converters/pascal_context.py), VOC2010/ImageSets/SegmentationContext/{split}.txt"
)
_COCO_LAYOUT = "coco_stuff164k/images/{split}/*.jpg, coco_stuff164k/annotations/{split}/*{suffix}"
_CITYSCAPES_LAYOUT = (
    "cityscapes/leftImg8bit/{split}/<city>/*_leftImg8bit.png, "
    "cityscapes/gtFine/{split}/<city>/*_gtFine_labelTrainIds.png"
)
_ADE_LAYOUT = (
    "ADEChallengeData2016/images/{split}/*.jpg, ADEChallengeData2016/annotations/{split}/*.png"
)


def _pascal_samples(
    root: str, version: str, split_dir: str, label_dir: str, layout: str, split: str
) -> tuple[DatasetFiles, list[SegmentationSample]]:
    marker = f"ImageSets/{split_dir}"
    files = DatasetFiles(root).locate(
        marker, ("", version, f"VOCdevkit/{version}"), layout.format(split=split)
    )
    samples = split_file_samples(
        files, f"{marker}/{split}.txt", "JPEGImages", ".jpg", label_dir, ".png"
    )
    return files, samples


def _voc2012(root: str, split: str) -> tuple[DatasetFiles, list[SegmentationSample]]:
    return _pascal_samples(root, "VOC2012", "Segmentation", "SegmentationClass", _VOC_LAYOUT, split)


def _context(root: str, split: str) -> tuple[DatasetFiles, list[SegmentationSample]]:
    return _pascal_samples(
        root, "VOC2010", "SegmentationContext", "SegmentationClassContext", _CONTEXT_LAYOUT, split
    )


@EVAL_DATASETS.register("voc21")
def voc21(root: str, split: str = "val") -> SegmentationDataset:
    """Pascal VOC 2012, 20 classes + background (id 0)."""
    files, samples = _voc2012(root, split)
    return SegmentationDataset(files, samples, classnames.VOC21, has_background=True)


@EVAL_DATASETS.register("voc20")
def voc20(root: str, split: str = "val") -> SegmentationDataset:
    """Pascal VOC 2012 without background: background pixels are ignored."""
    files, samples = _voc2012(root, split)
    return SegmentationDataset(
        files, samples, classnames.VOC20, has_background=False, label_lut=reduce_zero_label_lut()
    )


@EVAL_DATASETS.register("context60")
def context60(root: str, split: str = "val") -> SegmentationDataset:
    """Pascal Context, 59 classes + background (id 0)."""
    files, samples = _context(root, split)
    return SegmentationDataset(files, samples, classnames.CONTEXT60, has_background=True)


@EVAL_DATASETS.register("context59")
def context59(root: str, split: str = "val") -> SegmentationDataset:
    """Pascal Context without background: id 0 is ignored."""
    files, samples = _context(root, split)
    return SegmentationDataset(
        files,
        samples,
        classnames.CONTEXT59,
        has_background=False,
        label_lut=reduce_zero_label_lut(),
    )


def _coco_samples(
    root: str, split: str, suffix: str
) -> tuple[DatasetFiles, list[SegmentationSample]]:
    layout = _COCO_LAYOUT.format(split=split, suffix=suffix)
    files = DatasetFiles(root).locate(f"images/{split}", ("", "coco_stuff164k"), layout)
    samples = paired_dir_samples(files, f"images/{split}", ".jpg", f"annotations/{split}", suffix)
    return files, samples


@EVAL_DATASETS.register("cocostuff164k")
def cocostuff164k(root: str, split: str = "val2017") -> SegmentationDataset:
    """COCO-Stuff 164k, 171 classes (train ids 0–170)."""
    files, samples = _coco_samples(root, split, "_labelTrainIds.png")
    return SegmentationDataset(files, samples, classnames.COCO_STUFF171, has_background=False)


@EVAL_DATASETS.register("coco_object")
def coco_object(root: str, split: str = "val2017") -> SegmentationDataset:
    """COCO-Object: the 80 COCO thing classes + background (id 0)."""
    files, samples = _coco_samples(root, split, "_instanceTrainIds.png")
    return SegmentationDataset(files, samples, classnames.COCO_OBJECT81, has_background=True)


@EVAL_DATASETS.register("cityscapes")
def cityscapes(root: str, split: str = "val") -> SegmentationDataset:
    """Cityscapes fine annotations, 19 train classes; names are ``<city>/<frame>``."""
    files = DatasetFiles(root).locate(
        f"leftImg8bit/{split}", ("", "cityscapes"), _CITYSCAPES_LAYOUT.format(split=split)
    )
    samples = paired_dir_samples(
        files,
        f"leftImg8bit/{split}",
        "_leftImg8bit.png",
        f"gtFine/{split}",
        "_gtFine_labelTrainIds.png",
        nested=True,
    )
    return SegmentationDataset(files, samples, classnames.CITYSCAPES19, has_background=False)


@EVAL_DATASETS.register("ade20k")
def ade20k(root: str, split: str = "validation") -> SegmentationDataset:
    """ADE20K (SceneParsing), 150 classes; stored id 0 ("other") is ignored."""
    files = DatasetFiles(root).locate(
        f"images/{split}",
        ("", "ADEChallengeData2016", "ade/ADEChallengeData2016"),
        _ADE_LAYOUT.format(split=split),
    )
    samples = paired_dir_samples(files, f"images/{split}", ".jpg", f"annotations/{split}", ".png")
    return SegmentationDataset(
        files,
        samples,
        classnames.ADE20K150,
        has_background=False,
        label_lut=reduce_zero_label_lut(),
    )


@EVAL_DATASETS.register("folder")
def folder(
    root: str,
    class_names_file: str = "classes.txt",
    images: str = "images",
    labels: str = "labels",
    image_suffix: str = ".jpg",
    label_suffix: str = ".png",
    has_background: bool = False,
    reduce_zero_label: bool = False,
    ignore_ids: Sequence[int] | int = (),
) -> SegmentationDataset:
    """Any ``<root>/<images>/*<image_suffix>`` + ``<root>/<labels>/*<label_suffix>`` pairs
    (single-channel PNG ids, 255 = ignore) and a class-names file (one name per line, in id
    order; relative to ``root`` unless absolute or a URI). With ``has_background`` id 0 is
    the background class; ``reduce_zero_label`` ignores stored id 0 and shifts the others
    down by one (mmseg's option); ``ignore_ids`` lists more stored ids to ignore besides
    255 (e.g. ``[0]`` where 0 marks unlabelled pixels). A stored id that is neither a class
    nor ignored stops the evaluation with a :class:`~dinoalign.errors.DatasetError` naming
    the file, the id and these options (docs/evaluation-datasets.md)."""
    ignored = _ignore_ids(ignore_ids)
    if has_background and 0 in ignored and not reduce_zero_label:
        raise ConfigError(
            "folder: ignore_ids contains 0, which has_background makes the background class; "
            "drop one of the two"
        )
    files = DatasetFiles(root)
    names = files.read_names(class_names_file)
    check_unique_names(names, files.ref_uri(class_names_file))
    samples = paired_dir_samples(files, images, image_suffix, labels, label_suffix)
    lut: np.ndarray | None = reduce_zero_label_lut() if reduce_zero_label else None
    hint = (
        "if they mark unlabelled pixels, ignore them with the folder option ignore_ids "
        "(evaluate.dataset_options={{ignore_ids: {ids}}}); else the class-names file "
        f"{files.ref_uri(class_names_file)} (option class_names_file) lacks their names"
        + ("" if reduce_zero_label else ", or the ids start at 1 (option reduce_zero_label)")
    )
    return SegmentationDataset(
        files,
        samples,
        names,
        has_background=has_background,
        label_lut=lut,
        ignore_ids=ignored,
        id_hint=hint,
    )


def _ignore_ids(value: object) -> tuple[int, ...]:
    """The ``ignore_ids`` option: one label id or a list of them (non-negative integers)."""
    ids = [value] if isinstance(value, int) else value
    if (
        isinstance(ids, (str, bytes))
        or not isinstance(ids, Sequence)
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)
    ):
        raise ConfigError(
            f"folder: ignore_ids must be a list of stored label ids (integers >= 0), e.g. "
            f"[0], got {value!r}"
        )
    return tuple(sorted(set(ids)))  # type: ignore[arg-type]

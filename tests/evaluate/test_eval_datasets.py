"""Each evaluation-dataset adapter on a tiny fake copy of its published layout (2 images)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from dinoalign.evaluate.datasets import EVAL_DATASETS, classnames

SIZES = [(6, 8), (5, 7)]  # (H, W) of the two images of every fake dataset


def _image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _label(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8))
    if palette:  # VOC ships palette PNGs: the stored index is the class id
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    img.save(path)


def _stored_ids(height: int, width: int, seed: int, values: list[int]) -> np.ndarray:
    return np.random.default_rng(seed).choice(values, size=(height, width))


def _check(
    dataset, expected_labels: list[np.ndarray], names: list[str], class_names, has_background: bool
):
    assert dataset.task == "segmentation"
    assert len(dataset) == 2
    assert dataset.class_names == class_names
    assert dataset.has_background is has_background
    for (image, label, name), want, want_name, (h, w) in zip(
        dataset, expected_labels, names, SIZES
    ):
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
        assert label.dtype == np.int64
        np.testing.assert_array_equal(label, want)
        assert name == want_name


def _reduce_zero(stored: np.ndarray) -> np.ndarray:
    """mmseg reduce_zero_label written out: 0 -> 255, others -1, 255 stays."""
    out = stored.astype(np.int64) - 1
    out[stored == 0] = 255
    out[stored == 255] = 255
    return out


def _pascal(
    root: Path, split_dir: str, label_dir: str, n_classes: int, palette: bool
) -> list[np.ndarray]:
    names = ["2008_000001", "2008_000002"]
    (root / "ImageSets" / split_dir).mkdir(parents=True)
    (root / "ImageSets" / split_dir / "val.txt").write_text("\n".join(names) + "\n")
    stored = []
    for i, (name, (h, w)) in enumerate(zip(names, SIZES)):
        _image(root / "JPEGImages" / f"{name}.jpg", h, w, i)
        ids = _stored_ids(h, w, i, [0, 1, n_classes - 1, 255])
        _label(root / label_dir / f"{name}.png", ids, palette)
        stored.append(ids)
    return stored


def test_voc21_and_voc20(tmp_path):
    stored = _pascal(
        tmp_path / "VOCdevkit" / "VOC2012", "Segmentation", "SegmentationClass", 21, palette=True
    )
    names = ["2008_000001", "2008_000002"]
    # the root may be the dataset folder or a parent of it
    voc21 = EVAL_DATASETS.build("voc21", str(tmp_path))
    _check(voc21, stored, names, classnames.VOC21, True)
    voc20 = EVAL_DATASETS.build("voc20", str(tmp_path / "VOCdevkit" / "VOC2012"))
    shifted = [_reduce_zero(s) for s in stored]
    assert set(np.unique(np.concatenate([s.ravel() for s in shifted]))) == {0, 19, 255}
    _check(voc20, shifted, names, classnames.VOC20, False)


def test_context60_and_context59(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    stored = _pascal(root, "SegmentationContext", "SegmentationClassContext", 60, palette=False)
    names = ["2008_000001", "2008_000002"]
    _check(
        EVAL_DATASETS.build("context60", str(tmp_path / "VOCdevkit")),
        stored,
        names,
        classnames.CONTEXT60,
        True,
    )
    _check(
        EVAL_DATASETS.build("context59", str(root)),
        [_reduce_zero(s) for s in stored],
        names,
        classnames.CONTEXT59,
        False,
    )


@pytest.mark.parametrize(
    "name, suffix, values, class_names, has_background",
    [
        ("cocostuff164k", "_labelTrainIds.png", [0, 5, 170, 255], classnames.COCO_STUFF171, False),
        ("coco_object", "_instanceTrainIds.png", [0, 1, 80, 255], classnames.COCO_OBJECT81, True),
    ],
)
def test_coco_layouts(tmp_path, name, suffix, values, class_names, has_background):
    root = tmp_path / "coco_stuff164k"
    stems = ["000000000139", "000000000285"]
    stored = []
    for i, (stem, (h, w)) in enumerate(zip(stems, SIZES)):
        _image(root / "images" / "val2017" / f"{stem}.jpg", h, w, i)
        ids = _stored_ids(h, w, i, values)
        _label(root / "annotations" / "val2017" / f"{stem}{suffix}", ids)
        # the other variant's files lie in the same folder and must not be picked up
        _label(root / "annotations" / "val2017" / f"{stem}.png", np.zeros((h, w)))
        stored.append(ids)
    _check(EVAL_DATASETS.build(name, str(tmp_path)), stored, stems, class_names, has_background)


def test_cityscapes_nested_cities(tmp_path):
    root = tmp_path / "cityscapes"
    frames = [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")]
    stored = []
    for i, ((city, frame), (h, w)) in enumerate(zip(frames, SIZES)):
        _image(root / "leftImg8bit" / "val" / city / f"{frame}_leftImg8bit.png", h, w, i)
        ids = _stored_ids(h, w, i, [0, 7, 18, 255])
        _label(root / "gtFine" / "val" / city / f"{frame}_gtFine_labelTrainIds.png", ids)
        _label(root / "gtFine" / "val" / city / f"{frame}_gtFine_labelIds.png", ids + 5)
        stored.append(ids)
    dataset = EVAL_DATASETS.build("cityscapes", str(root))
    _check(dataset, stored, [f"{c}/{f}" for c, f in frames], classnames.CITYSCAPES19, False)


def test_ade20k_reduces_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    stems = ["ADE_val_00000001", "ADE_val_00000002"]
    stored = []
    for i, (stem, (h, w)) in enumerate(zip(stems, SIZES)):
        _image(root / "images" / "validation" / f"{stem}.jpg", h, w, i)
        ids = _stored_ids(h, w, i, [0, 1, 150])
        _label(root / "annotations" / "validation" / f"{stem}.png", ids)
        stored.append(ids)
    expected = [_reduce_zero(s) for s in stored]
    assert all(set(np.unique(e)) <= {0, 149, 255} for e in expected)
    _check(
        EVAL_DATASETS.build("ade20k", str(tmp_path)), expected, stems, classnames.ADE20K150, False
    )


def test_folder_adapter_with_reduce_zero_and_names_file(tmp_path):
    stored = []
    for i, (h, w) in enumerate(SIZES):
        _image(tmp_path / "imgs" / f"a{i}.jpg", h, w, i)
        ids = _stored_ids(h, w, i, [0, 1, 2])
        _label(tmp_path / "masks" / f"a{i}_mask.png", ids)
        stored.append(ids)
    names_file = tmp_path / "elsewhere" / "names.txt"
    names_file.parent.mkdir()
    names_file.write_text("cat\n\ndog\n")
    dataset = EVAL_DATASETS.build(
        "folder",
        str(tmp_path),
        class_names_file=str(names_file),  # absolute: read from where it is
        images="imgs",
        labels="masks",
        label_suffix="_mask.png",
        reduce_zero_label=True,
    )
    _check(dataset, [_reduce_zero(s) for s in stored], ["a0", "a1"], ("cat", "dog"), False)


def test_segmentation_adapter_reads_from_a_uri():
    fs = fsspec.filesystem("memory")
    root = "memory://evalset"
    stored = []
    for i, (h, w) in enumerate(SIZES):
        pixels = np.full((h, w, 3), 40 * i, dtype=np.uint8)
        ids = _stored_ids(h, w, i, [0, 1, 255])
        for rel, array in (
            (f"images/x{i}.png", pixels),
            (f"labels/x{i}.png", ids.astype(np.uint8)),
        ):
            with fs.open(f"/evalset/{rel}", "wb") as f:
                Image.fromarray(array).save(f, format="PNG")
        stored.append(ids)
    fs.pipe("/evalset/classes.txt", b"sky\nsea\n")
    try:
        dataset = EVAL_DATASETS.build("folder", root, image_suffix=".png")
        _check(dataset, stored, ["x0", "x1"], ("sky", "sea"), False)
        assert (dataset[1][0] == 40).all()  # decoded pixel values, not just shapes
    finally:
        fs.rm("/evalset", recursive=True)


def test_clear_errors_for_wrong_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected layout: VOC2012/JPEGImages"):
        EVAL_DATASETS.build("voc21", str(tmp_path))
    _pascal(tmp_path / "VOC2012", "Segmentation", "SegmentationClass", 21, palette=True)
    (tmp_path / "VOC2012" / "SegmentationClass" / "2008_000002.png").unlink()
    with pytest.raises(
        FileNotFoundError, match="1 of 2 expected files are missing.*2008_000002.png"
    ):
        EVAL_DATASETS.build("voc21", str(tmp_path))
    with pytest.raises(KeyError, match="Did you mean 'voc21'"):
        EVAL_DATASETS.build("voc12", str(tmp_path))


def test_labels_outside_the_class_range_are_reported(tmp_path):
    root = tmp_path / "cityscapes"
    _image(root / "leftImg8bit" / "val" / "aachen" / "f_leftImg8bit.png", 4, 4, 0)
    _label(root / "gtFine" / "val" / "aachen" / "f_gtFine_labelTrainIds.png", np.full((4, 4), 26))
    dataset = EVAL_DATASETS.build("cityscapes", str(root))
    with pytest.raises(ValueError, match=r"ids \[26\].*labelTrainIds"):
        dataset[0]


def test_imagenet_folder_with_both_class_name_formats(tmp_path):
    root = tmp_path / "val"
    _image(root / "n02" / "b.JPEG", 6, 8, 0)
    _image(root / "n01" / "a.jpg", 5, 7, 1)
    (root / "n01" / "notes.txt").write_text("not an image")
    plain = EVAL_DATASETS.build("imagenet_folder", str(root))
    assert plain.task == "classification"
    assert plain.class_names == ("n01", "n02")
    items = [(label, name, image.shape) for image, label, name in plain]
    assert items == [(0, "n01/a.jpg", (5, 7, 3)), (1, "n02/b.JPEG", (6, 8, 3))]

    (tmp_path / "map.txt").write_text("n02 great white shark\nn01\ttench\n")
    mapped = EVAL_DATASETS.build(
        "imagenet_folder", str(root), class_names_file=str(tmp_path / "map.txt")
    )
    assert mapped.class_names == ("tench", "great white shark")
    (root / "ordered.txt").write_text("tench\ngreat white shark\n")
    ordered = EVAL_DATASETS.build("imagenet_folder", str(root), class_names_file="ordered.txt")
    assert ordered.class_names == ("tench", "great white shark")
    (root / "short.txt").write_text("tench\n")
    with pytest.raises(ValueError, match="1 lines but .* 2 class folders"):
        EVAL_DATASETS.build("imagenet_folder", str(root), class_names_file="short.txt")


def test_karpathy_coco_and_flickr_formats(tmp_path):
    _image(tmp_path / "val2014" / "COCO_val2014_1.jpg", 6, 8, 0)
    _image(tmp_path / "val2014" / "COCO_val2014_2.jpg", 5, 7, 1)

    def entry(
        filename: str, split: str, captions: list[str], filepath: str | None = "val2014"
    ) -> dict:
        e = {
            "filename": filename,
            "split": split,
            "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
        }
        if filepath:
            e["filepath"] = filepath
        return e

    coco = {
        "dataset": "coco",
        "images": [
            entry("COCO_val2014_1.jpg", "test", ["a dog. ", "a brown dog"]),
            entry("COCO_val2014_9.jpg", "train", ["unused"]),
            entry("COCO_val2014_2.jpg", "test", ["two cats", "cats on a bed", "a pair of cats"]),
            entry("COCO_val2014_8.jpg", "restval", ["unused too"]),
        ],
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(coco))
    dataset = EVAL_DATASETS.build("karpathy", str(tmp_path))
    assert dataset.task == "retrieval" and len(dataset) == 2
    assert dataset.captions == [
        "a dog.",
        "a brown dog",
        "two cats",
        "cats on a bed",
        "a pair of cats",
    ]
    assert dataset.caption_image_index.tolist() == [0, 0, 1, 1, 1]
    image, captions, name = dataset[1]
    assert image.shape == (5, 7, 3) and captions == ["two cats", "cats on a bed", "a pair of cats"]
    assert name == "val2014/COCO_val2014_2.jpg"
    both = EVAL_DATASETS.build("karpathy", str(tmp_path), split="train,restval")
    assert [s[0] for s in both.samples] == [
        "val2014/COCO_val2014_9.jpg",
        "val2014/COCO_val2014_8.jpg",
    ]

    flickr_root = tmp_path / "flickr"
    _image(flickr_root / "1000.jpg", 6, 8, 2)
    _image(flickr_root / "1001.jpg", 5, 7, 3)
    flickr = {
        "images": [entry(f"{n}.jpg", "test", [f"caption {n}"], filepath=None) for n in (1000, 1001)]
    }
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    flickr_set = EVAL_DATASETS.build(
        "karpathy", str(flickr_root), json_file=str(tmp_path / "dataset_flickr30k.json")
    )
    assert [name for _image_, _caps, name in flickr_set] == ["1000.jpg", "1001.jpg"]
    with pytest.raises(ValueError, match=r"no images in split\(s\) \['val'\]; it has \['test'\]"):
        EVAL_DATASETS.build(
            "karpathy",
            str(flickr_root),
            json_file=str(tmp_path / "dataset_flickr30k.json"),
            split="val",
        )

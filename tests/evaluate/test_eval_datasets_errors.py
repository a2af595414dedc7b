"""Evaluation-dataset adapters on malformed files: one clear error that names the file
(and the option that fixes it), never a crash mid-run; the folder adapter's ignore_ids;
and ``dinoalign evaluate`` turning such an error into one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoalign.cli import main
from dinoalign.errors import ConfigError, DatasetError, DatasetFileMissing
from dinoalign.evaluate.datasets import EVAL_DATASETS, IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]


def _image(path: Path, height: int = 4, width: int = 5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)


def _label(path: Path, ids: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).convert(mode).save(path)


def _folder(root: Path, ids: list[np.ndarray], classes: str | None = "sky\nsea\n") -> None:
    """images/x<i>.png + labels/x<i>.png (4×5) and classes.txt."""
    for i, label in enumerate(ids):
        _image(root / "images" / f"x{i}.png")
        _label(root / "labels" / f"x{i}.png", label)
    if classes is not None:
        (root / "classes.txt").write_text(classes)


def _ids(*values: int) -> np.ndarray:
    return np.resize(np.array(values), (4, 5))


def _build(root: Path, **options):
    return EVAL_DATASETS.build("folder", str(root), image_suffix=".png", **options)


# ----------------------------------------------------------------------------- folder


def test_an_id_outside_the_class_list_names_file_id_and_option(tmp_path: Path) -> None:
    _folder(tmp_path, [_ids(0, 1), _ids(0, 1, 7, 255)])
    dataset = _build(tmp_path)
    dataset[0]  # a good image first: the error comes with the file that has the id
    with pytest.raises(DatasetError) as caught:
        dataset[1]
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}/labels/x1.png: ids [7] are not classes")
    assert "2-class dataset nor ignored ([255])" in message
    assert "ignore_ids" in message and "evaluate.dataset_options={ignore_ids: [7]}" in message
    assert f"{tmp_path}/classes.txt (option class_names_file)" in message
    assert "reduce_zero_label" in message


def test_ignore_ids_turns_those_stored_ids_into_ignore(tmp_path: Path) -> None:
    stored = _ids(0, 1, 7, 255)
    _folder(tmp_path, [stored])
    for option in ([7], 7):
        _image_, label, _name = _build(tmp_path, ignore_ids=option)[0]
        want = np.where(stored == 7, IGNORE_INDEX, stored)
        np.testing.assert_array_equal(label, want)
    # unlabelled = 0 with the classes counted from 1: ignore 0, shift the rest down
    _folder(tmp_path / "shifted", [_ids(0, 1, 2)])
    _image_, label, _name = _build(
        tmp_path / "shifted", ignore_ids=[0], reduce_zero_label=True
    )[0]
    stored = _ids(0, 1, 2)
    np.testing.assert_array_equal(label, np.where(stored == 0, IGNORE_INDEX, stored - 1))
    # 0 = unlabelled, and the other ids kept as stored
    _folder(tmp_path / "kept", [_ids(0, 1, 2)], classes="unused\nsky\nsea\n")
    _image_, label, _name = _build(tmp_path / "kept", ignore_ids=[0])[0]
    np.testing.assert_array_equal(label, np.where(stored == 0, IGNORE_INDEX, stored))


@pytest.mark.parametrize("value", ["0", [-1], [True], [0.5], {"a": 1}])
def test_ignore_ids_must_be_label_ids(tmp_path: Path, value) -> None:
    _folder(tmp_path, [_ids(0, 1)])
    with pytest.raises(ConfigError, match=r"folder: ignore_ids must be a list of stored label ids"):
        _build(tmp_path, ignore_ids=value)


def test_ignoring_the_background_class_is_refused(tmp_path: Path) -> None:
    _folder(tmp_path, [_ids(0, 1)])
    with pytest.raises(ConfigError, match="ignore_ids contains 0, which has_background"):
        _build(tmp_path, ignore_ids=[0], has_background=True)


def test_class_names_file_missing_empty_or_with_duplicates(tmp_path: Path) -> None:
    _folder(tmp_path, [_ids(0, 1)], classes=None)
    with pytest.raises(DatasetFileMissing) as caught:
        _build(tmp_path)
    assert f"missing file {tmp_path}/classes.txt" in str(caught.value)
    assert "option class_names_file" in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    (tmp_path / "classes.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match=f"{tmp_path}/classes.txt lists no names"):
        _build(tmp_path)
    (tmp_path / "classes.txt").write_text("sky\nsea\nsky\n")
    with pytest.raises(DatasetError) as caught:
        _build(tmp_path)
    assert f"{tmp_path}/classes.txt: class 'sky' is listed twice (classes 1 and 3)" in str(
        caught.value
    )
    (tmp_path / "classes.txt").write_bytes(b"sky\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=f"{tmp_path}/classes.txt: not UTF-8 text"):
        _build(tmp_path)


def test_unreadable_label_and_image_name_the_file(tmp_path: Path) -> None:
    _folder(tmp_path, [_ids(0, 1), _ids(0, 1)])
    (tmp_path / "labels" / "x0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    data = (tmp_path / "images" / "x1.png").read_bytes()
    (tmp_path / "images" / "x1.png").write_bytes(data[: len(data) // 2])
    dataset = _build(tmp_path)
    with pytest.raises(DatasetError, match=f"{tmp_path}/labels/x0.png: not a readable image"):
        dataset[0]
    with pytest.raises(DatasetError, match=f"{tmp_path}/images/x1.png: not a readable image"):
        dataset[1]


def test_colour_label_and_size_mismatch(tmp_path: Path) -> None:
    _folder(tmp_path, [_ids(0, 1), _ids(0, 1)])
    _label(tmp_path / "labels" / "x0.png", _ids(0, 1), mode="RGB")
    _label(tmp_path / "labels" / "x1.png", np.zeros((3, 5)))
    dataset = _build(tmp_path)
    with pytest.raises(DatasetError, match=f"{tmp_path}/labels/x0.png: .*got mode RGB"):
        dataset[0]
    with pytest.raises(DatasetError) as caught:
        dataset[1]
    want = f"{tmp_path}/labels/x1.png is 5×3 but its image {tmp_path}/images/x1.png is 5×4"
    assert want in str(caught.value)


def test_a_label_missing_after_listing_is_named(tmp_path: Path) -> None:
    _folder(tmp_path, [_ids(0, 1)])
    dataset = _build(tmp_path)
    (tmp_path / "labels" / "x0.png").unlink()
    with pytest.raises(DatasetFileMissing, match=f"missing file {tmp_path}/labels/x0.png"):
        dataset[0]


# ----------------------------------------------------------------------------- the others


def test_builtin_adapters_keep_their_annotation_hint(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "a.jpg")
    label = root / "annotations" / "validation" / "a.png"
    label.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 5), 300, dtype=np.uint16)).save(label)
    with pytest.raises(DatasetError, match=f"{label}: stored ids exceed 255 \\(max 300\\)"):
        EVAL_DATASETS.build("ade20k", str(tmp_path))[0]
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    _image(voc / "JPEGImages" / "a.jpg")
    _label(voc / "SegmentationClass" / "a.png", _ids(0, 30))
    with pytest.raises(DatasetError, match=r"ids \[30\] .*21-class.*labelTrainIds"):
        EVAL_DATASETS.build("voc21", str(tmp_path))[0]
    with pytest.raises(DatasetFileMissing, match="no dataset found.*Expected layout: cityscapes"):
        EVAL_DATASETS.build("cityscapes", str(tmp_path / "nowhere"))


def test_imagenet_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileMissing, match=f"no folder {tmp_path}/nowhere"):
        EVAL_DATASETS.build("imagenet_folder", str(tmp_path / "nowhere"))
    root = tmp_path / "val"
    _image(root / "n01" / "a.jpg")
    _image(root / "n02" / "b.jpg")
    with pytest.raises(DatasetFileMissing, match="missing file .*names.txt.*class_names_file"):
        EVAL_DATASETS.build("imagenet_folder", str(root), class_names_file="names.txt")
    (tmp_path / "dup.txt").write_text("n01 crane\nn02 crane\n")
    with pytest.raises(DatasetError, match=f"{tmp_path}/dup.txt: class 'crane' is listed twice"):
        EVAL_DATASETS.build(
            "imagenet_folder", str(root), class_names_file=str(tmp_path / "dup.txt")
        )
    (tmp_path / "twice.txt").write_text("n01 tench\nn01 goldfish\n")
    with pytest.raises(DatasetError, match=r"twice.txt names folders \['n01'\] more than once"):
        EVAL_DATASETS.build(
            "imagenet_folder", str(root), class_names_file=str(tmp_path / "twice.txt")
        )
    (root / "n02" / "b.jpg").write_bytes(b"not a jpeg")
    dataset = EVAL_DATASETS.build("imagenet_folder", str(root))
    with pytest.raises(DatasetError, match=f"{root}/n02/b.jpg: not a readable image"):
        dataset[1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "dataset.json: not valid JSON (Expecting property name"),
        (json.dumps({"annotations": []}), "is not a Karpathy split file"),
        (json.dumps({"images": ["a.jpg"]}), "images[0] is a str, not an object"),
        (
            json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []},
                                   {"split": "test", "sentences": [{"raw": "x"}]}]}),
            "dataset.json: images[1] has no 'filename'",
        ),
        (
            json.dumps({"images": [{"filename": "a.jpg", "split": "test",
                                    "sentences": [{"tokens": ["a"]}]}]}),
            "images[0] (a.jpg): sentences[0] has no 'raw' text",
        ),
        (
            json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}),
            "1 images have no caption (e.g. a.jpg)",
        ),
    ],
)
def test_karpathy_json_with_missing_fields(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError) as caught:
        EVAL_DATASETS.build("karpathy", str(tmp_path), json_file="dataset.json")
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_karpathy_json_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileMissing, match="dataset_coco.json: set the option json_file"):
        EVAL_DATASETS.build("karpathy", str(tmp_path))


# ----------------------------------------------------------------------------- the command


def test_evaluate_command_exits_2_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """The evaluate stage reading the bad label: ``dinoalign evaluate`` ends with one line
    on stderr and exit code 2 (the model part of the stage is replaced: reading the
    dataset is what fails)."""
    import dinoalign.stages.evaluate as stage

    _folder(tmp_path / "data", [_ids(0, 1, 7)])

    def read_all(params, root):
        dataset = EVAL_DATASETS.build(
            params.evaluate.dataset, params.evaluate.root, **params.evaluate.dataset_options
        )
        return [dataset[i] for i in range(len(dataset))]

    monkeypatch.setattr(stage, "run", read_all)
    args = [
        "evaluate",
        "-p",
        str(REPO / "params.yaml"),
        "evaluate.dataset=folder",
        f"evaluate.root={tmp_path / 'data'}",
        "evaluate.dataset_options={image_suffix: .png}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"dinoalign evaluate: {tmp_path}/data/labels/x0.png: ids [7]")
    assert main([*args[:-1], "evaluate.dataset_options={image_suffix: .png, ignore_ids: [7]}"]) == 0


def test_unknown_dataset_options_fail_when_params_load(capsys) -> None:
    """A misspelt adapter option is refused by `dinoalign params` already (exit 2, one line
    naming the adapter's own options), not as a TypeError when the stage builds it."""
    code = main(
        ["params", "evaluate.dataset=voc21", "evaluate.root=data/VOCdevkit",
         "evaluate.dataset_options={splt: val}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "'voc21' takes ['split'], not ['splt']" in err
    assert main(["params", "evaluate.dataset=folder", "evaluate.root=x",
                 "evaluate.dataset_options={ignore_ids: [0]}"]) == 0

"""Data sources: coco (captions + semantic masks), pairs tables and webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_testing import run_on_a_full_disk
from dinoalign.config import ConfigError
from dinoalign.data.images import load_image, load_mask
from dinoalign.data.schema import PairRecord, Reject, make_uid
from dinoalign.data.sources import SOURCES, clean_caption, join_uri, parent_uri
from dinoalign.data.sources.coco import (
    IGNORE_INDEX,
    CocoSourceConfig,
    InvalidAnnotation,
    annotation_mask,
    category_index,
    polygons_to_mask,
    rle_counts_from_string,
    rle_decode,
)
from dinoalign.data.sources.pairs import PairsSourceConfig
from dinoalign.data.sources.webdataset import WebDatasetSourceConfig, brace_expand, expand_urls

COCO_MINI = Path(__file__).parents[2].parent / "shared/assets/coco-mini"
SPLITS = ["val2017", "train2017"]


def _split(items: list[PairRecord | Reject]) -> tuple[list[PairRecord], list[Reject]]:
    records = [i for i in items if isinstance(i, PairRecord)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert len(records) + len(rejects) == len(items)
    return records, rejects


def _reasons(rejects: list[Reject]) -> list[str]:
    return sorted(r.reason for r in rejects)


def test_registry_holds_the_three_sources() -> None:
    assert {"coco", "pairs", "webdataset"} <= set(SOURCES.names())


def test_caption_and_uri_helpers() -> None:
    assert clean_caption("  A  cat\n on a\tmat ") == "A cat on a mat"
    assert clean_caption("   ") is None and clean_caption(float("nan")) is None
    assert join_uri("s3://bucket/dir/", "a/b.jpg") == "s3://bucket/dir/a/b.jpg"
    assert join_uri("data/x", "b.jpg") == str(Path("data/x/b.jpg"))
    assert join_uri("data/x", "/abs/b.jpg") == "/abs/b.jpg"
    assert join_uri("data/x", "https://h/b.jpg") == "https://h/b.jpg"
    assert parent_uri("s3://bucket/dir/pairs.csv") == "s3://bucket/dir"
    assert parent_uri("pairs.csv") == "."


# ----------------------------------------------------------------------------- COCO, real files


def _coco_mini(split: str, instances: bool = False) -> CocoSourceConfig:
    if not COCO_MINI.is_dir():
        pytest.skip(f"{COCO_MINI} is not present")
    return CocoSourceConfig(
        captions_json=str(COCO_MINI / f"annotations/captions_{split}.json"),
        image_dir=str(COCO_MINI / split),
        instances_json=str(COCO_MINI / f"annotations/instances_{split}.json")
        if instances
        else None,
        split=split.removesuffix("2017"),
    )


@pytest.mark.parametrize("split", SPLITS)
def test_coco_mini_every_image_and_caption_reaches_records(split: str, tmp_path: Path) -> None:
    cfg = _coco_mini(split)
    records, rejects = _split(list(SOURCES.build("coco", cfg, tmp_path)))
    captions_json = json.loads(Path(cfg.captions_json).read_text())
    assert len(records) + len(rejects) == len(captions_json["images"])
    assert rejects == []  # the subset is complete
    assert sum(len(r.captions) for r in records) == len(captions_json["annotations"])
    assert {r.uid for r in records} == {
        make_uid("coco", str(i["id"])) for i in captions_json["images"]
    }
    for record in records:
        assert Path(record.image_uri).is_file() and record.split == cfg.split
        assert record.mask_uri is None and record.label is None
    first = captions_json["annotations"][0]
    record = next(r for r in records if r.uid == make_uid("coco", str(first["image_id"])))
    assert clean_caption(first["caption"]) in record.captions


def test_coco_full_val_captions_cover_all_images(tmp_path: Path) -> None:
    cfg = _coco_mini("val2017")
    cfg = CocoSourceConfig(
        captions_json=str(COCO_MINI / "annotations-full/captions_val2017.json"),
        image_dir=cfg.image_dir,
        split="val",
    )
    records, rejects = _split(list(SOURCES.build("coco", cfg, tmp_path)))
    assert (len(records), len(rejects)) == (5000, 0)
    assert sum(len(r.captions) for r in records) == 25014
    # the source does not look at files: 159 of the 5000 images are in the mini folder
    assert sum(Path(r.image_uri).is_file() for r in records) == 159


@pytest.mark.parametrize("split", SPLITS)
def test_coco_mini_masks_hold_the_annotated_classes(split: str, tmp_path: Path) -> None:
    cfg = _coco_mini(split, instances=True)
    records, rejects = _split(list(SOURCES.build("coco", cfg, tmp_path)))
    assert rejects == []
    instances = json.loads(Path(cfg.instances_json).read_text())
    index = category_index(instances["categories"])
    names = {c["id"]: c["name"] for c in instances["categories"]}
    sizes = {i["id"]: (i["height"], i["width"]) for i in instances["images"]}
    annotations: dict[int, list[dict]] = {}
    for annotation in instances["annotations"]:
        annotations.setdefault(annotation["image_id"], []).append(annotation)
    n_labelled = 0
    for record in records:
        image_id = int(Path(record.mask_uri).stem)
        assert record.uid == make_uid("coco", str(image_id))
        mask = load_mask(record.mask_uri)
        assert mask.shape == sizes[image_id]
        anns = annotations[image_id]
        assert set(np.unique(mask).tolist()) - {0, IGNORE_INDEX} == {
            index[a["category_id"]] for a in anns if not a["iscrowd"]
        }
        assert (IGNORE_INDEX in mask) == any(a["iscrowd"] for a in anns)
        categories = {a["category_id"] for a in anns}
        assert record.label == (names[categories.pop()] if len(categories) == 1 else None)
        n_labelled += record.label is not None
    assert n_labelled > 0
    classes = json.loads((tmp_path / "masks/coco/classes.json").read_text())
    assert classes["classes"][:3] == ["background", "person", "bicycle"]
    assert len(classes["classes"]) == 81 and classes["classes"][80] == "toothbrush"


@pytest.mark.parametrize("split", SPLITS)
def test_coco_mini_crowd_rles_and_polygons_rasterise_where_annotated(split: str) -> None:
    cfg = _coco_mini(split, instances=True)
    instances = json.loads(Path(cfg.instances_json).read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in instances["images"]}
    n_crowd, relative_errors = 0, []
    for annotation in instances["annotations"]:
        mask = annotation_mask(annotation["segmentation"], *sizes[annotation["image_id"]])
        rows, cols = np.nonzero(mask)
        if annotation["iscrowd"]:
            n_crowd += 1
            assert mask.sum() == sum(annotation["segmentation"]["counts"][1::2])
            x, y, w, h = annotation["bbox"]
            # a transposed decode would land elsewhere; COCO's crowd boxes are 1 px narrower
            # than the pixels they cover (w = last - first column), hence the 0..1 slack
            assert (cols.min(), rows.min()) == (x, y)
            assert 0 <= (cols.max() - cols.min() + 1) - w <= 1
            assert 0 <= (rows.max() - rows.min() + 1) - h <= 1
        elif annotation["area"] > 500:  # polygon area (shoelace) vs pixel-centre count
            relative_errors.append(mask.sum() / annotation["area"] - 1)
    assert n_crowd >= 5
    assert np.abs(relative_errors).max() < 0.06 and abs(np.mean(relative_errors)) < 0.005


# ---------------------------------------------------------------------------- RLE, polygons by hand

# 3x4 mask; column-major it reads 0 0 1 | 1 1 1 | 1 0 0 | 0 0 0 -> runs 2 zeros, 5 ones, 5 zeros
HAND_MASK = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)


def test_rle_decode_by_hand() -> None:
    assert (rle_decode([2, 5, 5], 3, 4) == HAND_MASK).all()
    assert (annotation_mask({"counts": [2, 5, 5], "size": [3, 4]}, 3, 4) == HAND_MASK).all()
    assert (annotation_mask({"counts": "255", "size": [3, 4]}, 3, 4) == HAND_MASK).all()
    assert (annotation_mask({"counts": b"255", "size": [3, 4]}, 3, 4) == HAND_MASK).all()
    assert not rle_decode([12], 3, 4).any()  # one run of zeros
    with pytest.raises(InvalidAnnotation, match="sum to 3x4"):
        rle_decode([2, 5, 4], 3, 4)
    with pytest.raises(InvalidAnnotation, match="does not match"):
        annotation_mask({"counts": [2, 5, 5], "size": [4, 3]}, 3, 4)


def test_compressed_rle_strings_by_hand() -> None:
    # 5 bits per char (value + 48), 0x20 = more chars, 0x10 on the last = negative,
    # counts after the third are stored as differences to the count two before
    assert rle_counts_from_string("327") == [3, 2, 7]
    assert rle_counts_from_string("1232") == [1, 2, 3, 4]  # "2": 4 - 2
    assert rle_counts_from_string("153M") == [1, 5, 3, 2]  # "M" = 29: -3, 5 - 3
    assert rle_counts_from_string("T3") == [100]  # "T" = 36: 4 + more; "3": 3 << 5
    with pytest.raises(InvalidAnnotation, match="middle of a count"):
        rle_counts_from_string("T")


def _inside_by_brute_force(polygon: list[float], height: int, width: int) -> np.ndarray:
    """Even-odd ray casting from each pixel centre: an independent reference."""
    xs, ys = polygon[0::2], polygon[1::2]
    inside = np.zeros((height, width), dtype=bool)
    for r in range(height):
        for c in range(width):
            px, py = c + 0.5, r + 0.5
            for i in range(len(xs)):
                x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
                if (y0 <= py) != (y1 <= py) and px >= x0 + (py - y0) * (x1 - x0) / (y1 - y0):
                    inside[r, c] = not inside[r, c]
    return inside


def test_polygon_rasterisation_samples_pixel_centres() -> None:
    square = polygons_to_mask([[2, 1, 6, 1, 6, 5, 2, 5]], 8, 10)
    by_hand = np.zeros((8, 10), dtype=bool)
    by_hand[1:5, 2:6] = True  # centres 1.5..4.5 and 2.5..5.5 lie inside [1, 5) x [2, 6)
    assert (square == by_hand).all()
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_vertices = int(rng.integers(3, 9))
        polygon = (rng.uniform(-3, 1, 2 * n_vertices) + rng.uniform(0, 14, 2 * n_vertices)).tolist()
        expected = _inside_by_brute_force(polygon, 11, 13)
        assert (polygons_to_mask([polygon], 11, 13) == expected).all()
    union = polygons_to_mask([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 7, 5, 7, 7, 5, 7]], 8, 8)
    assert union.sum() == 8 and union[0, 0] and union[6, 6]
    with pytest.raises(InvalidAnnotation, match="x, y pairs"):
        polygons_to_mask([[1, 2, 3]], 4, 4)


def test_category_index_is_contiguous_in_id_order() -> None:
    assert category_index([{"id": 7}, {"id": 1}, {"id": 3}]) == {1: 1, 3: 2, 7: 3}
    with pytest.raises(ValueError, match="at most 254"):
        category_index([{"id": i} for i in range(300)])


# ----------------------------------------------------------------------------- COCO, hand-made


def _write_coco(tmp_path: Path) -> CocoSourceConfig:
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": 6, "width": 8} for i in (1, 2, 3, 4, 5)
    ]
    captions = [
        {"id": 100, "image_id": 1, "caption": "A big  square\n"},
        {"id": 101, "image_id": 1, "caption": "   "},  # blank
        {"id": 102, "image_id": 99, "caption": "nobody's image"},
        {"id": 103, "image_id": 3, "caption": "bad polygon"},
        {"id": 104, "image_id": 4, "caption": "only cats"},
        {"id": 105, "image_id": 5, "caption": "not in the instances file"},
        {"id": 106, "image_id": 1, "caption": "second caption"},
    ]
    crowd = np.zeros((6, 8), dtype=bool)
    crowd[:, 6:] = True  # columns 6..7
    crowd[0:2, 3:6] = True  # partly under the big square
    runs = _runs(crowd)
    instances = {
        "images": images[:4],
        "categories": [
            {"id": 1, "name": "square"},
            {"id": 3, "name": "dot"},
            {"id": 7, "name": "cat"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 1,
                "segmentation": {"counts": runs, "size": [6, 8]},
            },
            {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5]]},
            # compressed RLE "06Z1" = runs 0, 6, 42 ("Z" = 42 & 31 + more, "1" = 1 << 5):
            # the first column; the polygon is the first row
            {
                "id": 5,
                "image_id": 4,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": {"counts": "06Z1", "size": [6, 8]},
            },
            {
                "id": 6,
                "image_id": 4,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": [[0, 0, 8, 0, 8, 1, 0, 1]],
            },
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return CocoSourceConfig(
        captions_json=str(tmp_path / "captions.json"),
        image_dir=str(tmp_path / "images"),
        instances_json=str(tmp_path / "instances.json"),
        split="val",
        name="mycoco",
    )


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros (the encoder, for the hand-made files)."""
    flat = mask.T.reshape(-1).astype(int)
    runs, value, length = [], 0, 0
    for pixel in flat:
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    return [*runs, length]


def test_coco_hand_made_rejects_labels_and_overlaps(tmp_path: Path) -> None:
    cfg = _write_coco(tmp_path)
    records, rejects = _split(list(SOURCES.build("coco", cfg, tmp_path / "work")))
    by_key = {r.key: r.reason for r in rejects}
    assert _reasons(rejects) == [
        "bad_annotation",
        "empty_caption",
        "no_captions",
        "unknown_image_id",
    ]
    assert by_key == {
        "1": "empty_caption",
        "99": "unknown_image_id",
        "2": "no_captions",
        "3": "bad_annotation",
    }
    # 5 images = 3 records + no_captions + bad_annotation; 7 captions = 4 in records +
    # empty_caption + unknown_image_id + the one of the image rejected for its annotation
    assert len(records) == 3 and sum(len(r.captions) for r in records) == 4
    record = {r.uid: r for r in records}
    first = record[make_uid("mycoco", "1")]
    assert first.captions == ["A big square", "second caption"]
    assert first.image_uri == str(tmp_path / "images" / "000000000001.jpg")
    assert first.source == "mycoco" and first.split == "val" and first.label is None
    # category ids 1, 3, 7 -> indices 1, 2, 3; the small dot (4 px) wins over the square
    # (16 px), instances win over the crowd region, which is 255 elsewhere
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected[0:2, 3:6] = IGNORE_INDEX
    expected[:, 6:] = IGNORE_INDEX
    expected[1:5, 1:5] = 1
    expected[2:4, 2:4] = 2
    assert (load_mask(first.mask_uri) == expected).all()
    cats = record[make_uid("mycoco", "4")]
    assert cats.label == "cat"
    cat_mask = load_mask(cats.mask_uri)
    assert (
        (cat_mask[0] == 3).all() and (cat_mask[:, 0] == 3).all() and (cat_mask[1:, 1:] == 0).all()
    )
    outside = record[make_uid("mycoco", "5")]
    assert outside.mask_uri is None and outside.label is None
    assert Path(first.mask_uri).parent == tmp_path / "work/masks/mycoco/val"


def test_coco_config_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="captions_json and image_dir must be set"):
        CocoSourceConfig(captions_json="")
    with pytest.raises(ValueError, match="split must be a non-empty string"):
        CocoSourceConfig(split=" ")
    with pytest.raises(FileNotFoundError, match=r"check data\.coco paths"):
        list(
            SOURCES.build(
                "coco", CocoSourceConfig(captions_json=str(tmp_path / "no.json")), tmp_path
            )
        )
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="needs the keys"):
        list(
            SOURCES.build(
                "coco", CocoSourceConfig(captions_json=str(tmp_path / "other.json")), tmp_path
            )
        )
    # one id for two files: an error naming both, never the last one silently (#19)
    twice = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 7, "file_name": "b.jpg"}],
             "annotations": [{"image_id": 7, "caption": "a cat"}]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(ValueError, match=r"image id 7 is listed twice in 'images', as 'a.jpg' and 'b.jpg'"):
        list(SOURCES.build("coco", CocoSourceConfig(captions_json=str(tmp_path / "twice.json")), tmp_path))
    same = {**twice, "images": [twice["images"][0]] * 2}  # an exact repeat is one image
    (tmp_path / "same.json").write_text(json.dumps(same))
    built = list(SOURCES.build("coco", CocoSourceConfig(captions_json=str(tmp_path / "same.json")), tmp_path))
    assert [r.captions for r in built] == [["a cat"]]


# ----------------------------------------------------------------------------- pairs


PAIRS_ROWS = [
    ("a.jpg", "A cat.", "train"),
    ("a.jpg", "  A   sleeping cat ", "train"),
    ("/abs/b.png", "A dog", "val"),
    ("s3://bucket/c.jpg", "A bird", ""),  # empty split -> default_split
    ("http://host/d.jpg", "", "train"),  # empty caption
    ("", "an orphan caption", "train"),  # no image
    ("a.jpg", "A cat in val", "val"),  # conflicts with the first row's split
]


def _pairs_frame() -> pd.DataFrame:
    return pd.DataFrame(PAIRS_ROWS, columns=["img", "text", "part"])


def _check_pairs(items: list[PairRecord | Reject], folder: Path) -> None:
    records, rejects = _split(items)
    assert sum(len(r.captions) for r in records) + len(rejects) == len(PAIRS_ROWS)
    assert [(r.reason, r.detail.split(":")[0]) for r in rejects] == [
        ("empty_caption", "row 4"),
        ("missing_image", "row 5"),
        ("conflicting_row", "row 6"),
    ]
    assert [r.uid for r in rejects] == [make_uid("pairs", f"row:{i}") for i in (4, 5, 6)]
    by_uid = {r.uid: r for r in records}
    a = by_uid[make_uid("pairs", "a.jpg")]
    assert a.captions == ["A cat.", "A sleeping cat"] and a.split == "train"
    assert a.image_uri == str(folder / "a.jpg")
    b = by_uid[make_uid("pairs", "/abs/b.png")]
    assert (b.image_uri, b.split) == ("/abs/b.png", "val")
    c = by_uid[make_uid("pairs", "s3://bucket/c.jpg")]
    assert (c.image_uri, c.split, c.source) == ("s3://bucket/c.jpg", "train", "pairs")
    assert len(records) == 3


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_pairs_table_merges_rows_and_rejects_bad_ones(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"pairs{suffix}"
    frame = _pairs_frame()
    if suffix == ".parquet":
        frame.replace("", None).to_parquet(path)  # nulls rather than empty strings
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    cfg = PairsSourceConfig(
        path=str(path), image_column="img", caption_column="text", split_column="part"
    )
    _check_pairs(list(SOURCES.build("pairs", cfg, tmp_path)), tmp_path)


def test_pairs_key_column_groups_and_flags_conflicting_images(tmp_path: Path) -> None:
    path = tmp_path / "keyed.csv"
    pd.DataFrame(
        {
            "id": ["k7", "k7", "k8", "k7", ""],
            "image": ["x.jpg", "x.jpg", "y.jpg", "z.jpg", "w.jpg"],
            "caption": ["one", "two", "three", "four", "five"],
        }
    ).to_csv(path, index=False)
    cfg = PairsSourceConfig(path=str(path), key_column="id", default_split="test", name="tbl")
    records, rejects = _split(list(SOURCES.build("pairs", cfg, tmp_path)))
    assert [(r.uid, r.image_uri, r.captions, r.split) for r in records] == [
        (make_uid("tbl", "k7"), str(tmp_path / "x.jpg"), ["one", "two"], "test"),
        (make_uid("tbl", "k8"), str(tmp_path / "y.jpg"), ["three"], "test"),
    ]
    assert _reasons(rejects) == ["conflicting_row", "missing_key"]


def test_pairs_allowed_roots_reject_traversal_rows(tmp_path: Path) -> None:
    """``data.allowed_roots``: rows whose image resolves outside every root (``../``,
    absolute, ``file://``, a URL of another host or prefix) are rejects, not reads."""
    from dinoalign.config import load_params
    from dinoalign.data.sources.pairs import within_roots

    data = tmp_path / "data"
    data.mkdir()
    images = ["a.png", "sub/../b.png", "../c.png", "/etc/passwd", "file:///etc/passwd", "file://" + str(data / "d.png"),
              "s3://bucket/ok/e.png", "s3://bucket/ok/../../f.png", "s3://other/ok/g.png",
              "https://images.example/ok/h.png", "https://images.example/ok/%2e%2e/i.png"]
    pd.DataFrame({"image": images, "caption": [f"c{i}" for i in range(len(images))]}).to_csv(
        data / "pairs.csv", index=False)
    params = load_params(tmp_path / "none.yaml", [
        "data.source=pairs", f"data.pairs.path={data / 'pairs.csv'}",
        f"data.allowed_roots=[{data}, s3://bucket/ok, 'https://images.example/ok/']"])
    assert params.data.pairs.allowed_roots == [str(data), "s3://bucket/ok", "https://images.example/ok/"]
    records, rejects = _split(list(SOURCES.build("pairs", params.data.pairs, tmp_path)))
    assert sorted(r.image_uri.rsplit("/", 1)[-1] for r in records) == ["a.png", "b.png", "d.png", "e.png", "h.png"]
    assert _reasons(rejects) == ["outside_allowed_roots"] * 6
    assert sorted(r.key for r in rejects) == sorted(["../c.png", "/etc/passwd", "file:///etc/passwd",
                                                     "s3://bucket/ok/../../f.png", "s3://other/ok/g.png",
                                                     "https://images.example/ok/%2e%2e/i.png"])
    assert not within_roots(str(data) + "-sibling/x.png", [str(data)])  # a prefix of the name is not a root
    unconfined = _split(list(SOURCES.build("pairs", PairsSourceConfig(path=str(data / "pairs.csv")), tmp_path)))
    assert len(unconfined[0]) == len(images)  # no allowed_roots: as before
    with pytest.raises(ConfigError, match="allowed_roots"):
        PairsSourceConfig(allowed_roots="data")  # type: ignore[arg-type]


def test_pairs_parquet_list_cells_hold_several_captions(tmp_path: Path) -> None:
    path = tmp_path / "lists.parquet"
    pd.DataFrame(
        {
            "image": ["a.jpg", "b.jpg", "a.jpg"],
            "caption": [["one", " two "], ["", None], ["three"]],
        }
    ).to_parquet(path)
    records, rejects = _split(
        list(SOURCES.build("pairs", PairsSourceConfig(path=str(path)), tmp_path))
    )
    assert [(r.uid, r.captions) for r in records] == [
        (make_uid("pairs", "a.jpg"), ["one", "two", "three"])
    ]
    assert [(r.reason, r.key) for r in rejects] == [("empty_caption", "b.jpg")]


def test_pairs_errors_name_the_columns_and_formats(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"check pairs\.path"):
        list(SOURCES.build("pairs", PairsSourceConfig(path=str(tmp_path / "no.csv")), tmp_path))
    path = tmp_path / "pairs.csv"
    _pairs_frame().to_csv(path, index=False)
    with pytest.raises(
        ConfigError, match=r"no column 'image' \(pairs.image_column\).*\['img', 'text', 'part'\]"
    ):
        list(SOURCES.build("pairs", PairsSourceConfig(path=str(path)), tmp_path))
    (tmp_path / "pairs.txt").write_text("img,text\n")
    with pytest.raises(ConfigError, match=r"set pairs\.format"):
        list(SOURCES.build("pairs", PairsSourceConfig(path=str(tmp_path / "pairs.txt")), tmp_path))
    cfg = PairsSourceConfig(
        path=str(tmp_path / "pairs.txt"), image_column="img", caption_column="text", format="csv"
    )
    assert list(SOURCES.build("pairs", cfg, tmp_path)) == []
    with pytest.raises(ConfigError, match="is not one of"):
        PairsSourceConfig(format="xlsx")


# ----------------------------------------------------------------------------- webdataset


def _image_bytes(image_format: str, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, image_format)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


JPEG_RED = _image_bytes("JPEG", (255, 0, 0))
PNG_GREEN = _image_bytes("PNG", (0, 255, 0))


def _write_shards(folder: Path) -> None:
    _write_tar(
        folder / "shard-000.tar",
        [
            ("000009.txt", b"caption before its image"),
            ("000001.jpg", JPEG_RED),
            ("000001.txt", b"  a red\nsquare "),
            ("000001.json", json.dumps({"key": "k1", "caption": "not used: txt wins"}).encode()),
            ("000002.png", PNG_GREEN),
            ("000002.json", json.dumps({"caption": "a green square"}).encode()),
            ("000003.txt", b"no image here"),
            ("000004.jpg", JPEG_RED),
            ("000005.jpg", JPEG_RED),
            ("000005.txt", b"   "),
            ("000006.jpg", JPEG_RED),
            ("000006.txt", b"fine text"),
            ("000006.json", b"{not json"),
            ("000007.webp", JPEG_RED),
            ("000007.txt", b"\xff\xfe not utf-8"),
            ("sub dir/000008.JPG", JPEG_RED),
            ("sub dir/000008.txt", b"a nested sample"),
            ("000009.jpg", JPEG_RED),
        ],
    )
    (folder / "shard-001.tar").write_bytes(b"this is not a tar archive" * 40)
    _write_tar(
        folder / "shard-002.tar",
        [
            ("000001.png", PNG_GREEN),
            ("000001.txt", b"same json key as shard 0"),
            ("000001.json", json.dumps({"key": "k1"}).encode()),
            ("000010.png", PNG_GREEN),
            ("000010.txt", b"last one"),
        ],
    )


def test_webdataset_shards_give_records_and_reasoned_rejects(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shards(shards)
    cfg = WebDatasetSourceConfig(
        urls=(f"{shards}/shard-{{000..002}}.tar", str(shards / "missing.tar")), split="val"
    )
    workdir = tmp_path / "work"
    records, rejects = _split(list(SOURCES.build("webdataset", cfg, workdir)))
    by_key = {r.uid: r for r in records}
    assert sorted(r.captions[0] for r in records) == [
        "a green square",
        "a nested sample",
        "a red square",
        "caption before its image",
        "last one",
    ]
    red = by_key[make_uid("webdataset", "k1")]
    assert red.image_uri == str(workdir / "images/shard-000/000001.jpg") and red.split == "val"
    assert Path(red.image_uri).read_bytes() == JPEG_RED
    green = by_key[make_uid("webdataset", "000002")]
    assert (load_image(green.image_uri, max_pixels=10**6, min_side=14) == [0, 255, 0]).all()
    nested = by_key[make_uid("webdataset", "sub dir/000008")]
    assert nested.image_uri.endswith(".jpg") and "/" not in Path(nested.image_uri).name
    assert Path(nested.image_uri).parent == workdir / "images/shard-000"
    assert {r.key: r.reason for r in rejects} == {
        "000003": "no_image",
        "000004": "no_caption",
        "000005": "empty_caption",
        "000006": "bad_json",
        "000007": "bad_caption",
        "k1": "duplicate_key",
        str(shards / "shard-001.tar"): "corrupt_shard",
        str(shards / "missing.tar"): "shard_read_error",
    }
    shard_reject = next(r for r in rejects if r.reason == "corrupt_shard")
    assert shard_reject.uid == make_uid("webdataset", str(shards / "shard-001.tar"))
    assert not (workdir / "images/shard-001").exists()
    duplicate = next(r for r in rejects if r.reason == "duplicate_key")
    assert duplicate.uid not in by_key  # the first k1 keeps its uid


def test_webdataset_truncated_tar_rejects_the_shard(tmp_path: Path) -> None:
    good = tmp_path / "whole.tar"
    _write_tar(
        good, [("0.png", PNG_GREEN * 20), ("0.txt", b"x"), ("1.png", PNG_GREEN), ("1.txt", b"y")]
    )
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:700])  # inside the first image
    items = list(SOURCES.build("webdataset", WebDatasetSourceConfig(urls=str(cut)), tmp_path))
    assert [(type(i).__name__, getattr(i, "reason", None)) for i in items] == [
        ("Reject", "corrupt_shard")
    ]
    assert (
        len(list(SOURCES.build("webdataset", WebDatasetSourceConfig(urls=[str(good)]), tmp_path)))
        == 2
    )


@pytest.mark.parametrize("where", ["inside the second header", "at the second header"])
def test_webdataset_tar_cut_at_a_header_rejects_the_shard(tmp_path: Path, where: str) -> None:
    """Issue #19: a shard cut inside (or exactly at) a tar header after the first member
    used to end quietly as a shorter archive (tarfile stops there), losing every later
    sample without a reject. It is a corrupt_shard now, with where it stopped."""
    good = tmp_path / "whole.tar"
    _write_tar(good, [("0.png", PNG_GREEN), ("0.txt", b"x"), ("1.png", PNG_GREEN), ("1.txt", b"y")])
    with tarfile.open(good) as tar:
        second = tar.getmembers()[1].offset  # the header of 0.txt
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: second + (100 if where.startswith("inside") else 0)])
    items = list(SOURCES.build("webdataset", WebDatasetSourceConfig(urls=str(cut)), tmp_path))
    assert [(type(i).__name__, i.reason) for i in items] == [("Reject", "corrupt_shard")]
    assert f"tar header at byte {second} (after 1 members)" in items[0].detail
    assert not (tmp_path / "images" / "cut").exists()
    whole = list(SOURCES.build("webdataset", WebDatasetSourceConfig(urls=str(good)), tmp_path))
    assert [type(i).__name__ for i in whole] == ["PairRecord", "PairRecord"]


def test_webdataset_on_a_full_disk_stops_instead_of_rejecting_the_shard(tmp_path: Path) -> None:
    """Issue #20: an image that cannot be extracted for want of room is no bad shard (a
    reject, and prepare going on without it) but a stop, leaving no partial image."""
    rng = np.random.default_rng(0)
    noise = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise, "PNG")
    _write_tar(tmp_path / "shard-000.tar", [("000001.png", PNG_GREEN), ("000001.txt", b"small"),
                                            ("000002.png", noise.getvalue()), ("000002.txt", b"large")])
    listing = ("import sys\nfrom pathlib import Path\n"
               "from dinoalign.data.sources import SOURCES\n"
               "from dinoalign.data.sources.webdataset import WebDatasetSourceConfig\n"
               "items = SOURCES.build('webdataset', WebDatasetSourceConfig(urls=sys.argv[1]), Path(sys.argv[2]))\n"
               "print([type(item).__name__ for item in items])\n")
    limit = len(noise.getvalue()) // 2
    assert len(PNG_GREEN) < limit
    done = run_on_a_full_disk(limit, listing, str(tmp_path / "shard-000.tar"), str(tmp_path / "work"))
    assert done.returncode == 1 and "Reject" not in done.stdout, done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("OSError: [Errno 27] File too large: ")
    [extracted] = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert extracted.read_bytes() == PNG_GREEN  # the one that fitted, whole; no part of the other


def test_brace_and_glob_expansion(tmp_path: Path) -> None:
    assert brace_expand("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert brace_expand("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert brace_expand("{3..1}") == ["3", "2", "1"] and brace_expand("plain.tar") == ["plain.tar"]
    with pytest.raises(ConfigError, match="cannot expand"):
        brace_expand("{abc}.tar")
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls([f"{tmp_path}/*.tar", f"{tmp_path}/a.tar"]) == [
        f"{tmp_path}/a.tar",
        f"{tmp_path}/b.tar",
    ]
    with pytest.raises(ConfigError, match="no shard matches"):
        expand_urls([f"{tmp_path}/*.tgz"])


def test_webdataset_config_errors(tmp_path: Path) -> None:
    assert WebDatasetSourceConfig(urls="x.tar").urls == ("x.tar",)
    with pytest.raises(ConfigError, match="must list shard paths"):
        WebDatasetSourceConfig(urls=())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = WebDatasetSourceConfig(urls=(f"{tmp_path}/a/0.tar", f"{tmp_path}/b/0.tar"))
    with pytest.raises(ConfigError, match="share the file name '0'"):
        list(SOURCES.build("webdataset", cfg, tmp_path))


def _write_table(path: Path, case: str) -> str:
    """A hostile pairs table; returns what the error must say."""
    if case == "empty csv":
        path.write_bytes(b"")
        return "is empty: it needs a header row"
    if case == "invalid utf-8":
        path.write_bytes(b"image,caption\na.jpg,caf\xe9 au lait\n")
        return "is not utf-8 text (byte 0xe9"
    if case == "latin-1 with semicolons":
        path.write_bytes("image;caption\na.jpg;crème brûlée\n".encode("latin-1"))
        return "set pairs.encoding"
    if case == "not parquet":
        path.write_bytes(b"image,caption\na.jpg,a cat\n")
        return "is not a readable Parquet file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty csv", "invalid utf-8", "latin-1 with semicolons", "not parquet"])
def test_hostile_pairs_tables_are_one_clear_config_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / ("pairs.parquet" if case == "not parquet" else "pairs.csv")
    expected = _write_table(path, case)
    with pytest.raises(ConfigError) as info:
        list(SOURCES.build("pairs", PairsSourceConfig(path=str(path)), tmp_path))
    assert expected in str(info.value) and str(path) in str(info.value)


def test_latin1_semicolon_table_reads_with_encoding_and_separator(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    _write_table(path, "latin-1 with semicolons")
    cfg = PairsSourceConfig(path=str(path), encoding="latin-1")
    with pytest.raises(ConfigError, match="separated by ';': set pairs.separator"):
        list(SOURCES.build("pairs", cfg, tmp_path))
    cfg = PairsSourceConfig(path=str(path), encoding="latin-1", separator=";")
    records, rejects = _split(list(SOURCES.build("pairs", cfg, tmp_path)))
    assert [r.captions for r in records] == [["crème brûlée"]] and not rejects
    with pytest.raises(ConfigError, match="not a known codec"):
        PairsSourceConfig(path=str(path), encoding="latin-9x")


STRAY_QUOTE_CSV = (
    'image,caption\n'                       # line 1
    'a.jpg,"a cat\n'                        # 2: a stray quote: pandas joined lines 2-5 into one cell
    'b.jpg,a dog\n'                         # 3
    'c.jpg,a bird\n'                        # 4
    'd.jpg,"quoted, and closed"\n'          # 5: its opening quote closed line 2's field
    '\n'                                    # 6: blank, skipped
    'e.jpg,"a caption on\ntwo lines"\n'     # 7-8: a real multi-line cell stays one row
    'f.jpg,a fish, swimming\n'              # 9: an unquoted separator
    'g.jpg,"a goat\n'                       # 10: a quote that never closes (last line)
)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_stray_quote_loses_no_row(tmp_path: Path, suffix: str) -> None:
    """Issue #20: a quote opening inside a field made the CSV reader join the following
    lines into one caption (rows lost, no reject). Every physical line now ends as a row
    or a reject naming its line."""
    path = tmp_path / f"pairs{suffix}"
    text = STRAY_QUOTE_CSV if suffix == ".csv" else STRAY_QUOTE_CSV.replace(",", "\t")
    path.write_text(text)
    records, rejects = _split(list(SOURCES.build("pairs", PairsSourceConfig(path=str(path)), tmp_path)))
    assert {Path(r.image_uri).name: r.captions for r in records} == {
        "b.jpg": ["a dog"], "c.jpg": ["a bird"],
        "d.jpg": ["quoted, and closed" if suffix == ".csv" else "quoted and closed"],  # a tab is whitespace
        "e.jpg": ["a caption on two lines"]}
    assert [(r.uid, r.reason, r.detail.split(":")[0]) for r in rejects] == [
        (make_uid("pairs", "line:2"), "stray_quote", "line 2"),
        (make_uid("pairs", "line:9"), "too_many_fields", "line 9"),
        (make_uid("pairs", "line:10"), "stray_quote", "line 10"),
    ]
    assert "closes only on line 5" in rejects[0].detail and "never closes" in rejects[2].detail
    # every physical line but the header and the blank one: a row's line or a reject's
    row_lines = {2 + i for i in range(9)} - {6}
    accounted = {3, 4, 5, 7, 8} | {int(r.detail.split(":")[0].split()[1]) for r in rejects}
    assert accounted == row_lines


def test_row_rejects_of_a_text_table_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('image,caption\n\n"a.jpg",\n,"a caption\non two lines"\nb.jpg,ok\n')
    records, rejects = _split(list(SOURCES.build("pairs", PairsSourceConfig(path=str(path)), tmp_path)))
    assert [r.captions for r in records] == [["ok"]]
    assert [(r.reason, r.detail.split(":")[0], r.detail.rsplit(" ", 2)[-2:]) for r in rejects] == [
        ("empty_caption", "row 0", ["(line", "3)"]), ("missing_image", "row 1", ["(line", "4)"])]

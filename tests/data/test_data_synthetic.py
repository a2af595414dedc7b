"""The synthetic demo world: determinism, held-out splits, masks, captions, files."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoalign.data.schema import PairRecord, make_uid
from dinoalign.data.synthetic import (
    CLASSES,
    COLOURS,
    NUM_MASK_CLASSES,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SceneObject,
    SyntheticWorldConfig,
    heldout_compositions,
    is_heldout_image,
    load_world,
    mask_value,
    rasterise,
    relation,
    render,
    sample_scene,
    sample_paths,
    seen_compositions,
)
from dinoalign.data.sources import SOURCES

CFG = SyntheticWorldConfig(n_train=400, n_val=100, n_test=200, seed=7)
# the 3×3 layout with its smaller objects (the demo world before generator version 2)
CFG3 = dataclasses.replace(CFG, grid=3, object_radii=(0.09, 0.155))
GRIDS = pytest.mark.parametrize("cfg", [CFG, CFG3], ids=["2x2", "3x3"])
TINY = SyntheticWorldConfig(n_train=6, n_val=2, n_test=4, image_size=64, seed=3)


def scenes(cfg: SyntheticWorldConfig, split: str) -> list[Scene]:
    return [sample_scene(cfg, split, i) for i in range(cfg.count(split))]


def chroma(image: np.ndarray) -> np.ndarray:
    """H×W max - min over RGB."""
    return image.max(axis=-1).astype(int) - image.min(axis=-1).astype(int)


def write_world(cfg: SyntheticWorldConfig, workdir: Path) -> tuple[list[PairRecord], Path]:
    """The records of the registered ``synthetic`` source (the prepare stage's path) and
    the folder it wrote the world under (``workdir/<cfg.source>``)."""
    return list(SOURCES.get("synthetic")(cfg, workdir)), workdir / cfg.source


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- config, vocabulary


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_train", -1),
        ("seed", -5),
        ("image_size", 32),
        ("heldout_fraction", 0.6),
        ("captions_per_image", 0),
        ("captions_per_image", 6),
        ("max_objects", 4),
        ("single_object_fraction", 1.5),
        ("source", "a/b"),
        ("grid", 4),  # a 4×4 grid has two cells named "left"
        ("object_radii", (0.2, 0.1)),
        ("object_radii", (0.17, 0.26)),  # a large object would leave its 2×2 cell
        ("object_radii", "big"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"synthetic.{field}"):
        SyntheticWorldConfig(**{field: value})


def test_vocabulary_colours_are_distinct_and_saturated() -> None:
    assert len(CLASSES) == len(set(CLASSES)) == len(COLOURS) * len(SHAPES) == 30
    assert NUM_MASK_CLASSES == 31
    assert CLASSES[0] == "red circle" and mask_value("red circle") == 1
    assert mask_value(CLASSES[-1]) == 30
    rgb = np.array(list(COLOURS.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(rgb), 1)]
    assert distances.min() >= 75
    assert (rgb.max(1) - rgb.min(1)).min() >= 130
    with pytest.raises(ValueError, match="colours"):
        mask_value("pink circle")


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35, 0.5])
def test_heldout_compositions_keep_every_colour_and_shape_seen(fraction: float) -> None:
    for seed in range(40):
        cfg = SyntheticWorldConfig(heldout_fraction=fraction, seed=seed)
        held = heldout_compositions(cfg)
        seen = seen_compositions(cfg)
        assert len(held) == round(fraction * 30)
        assert sorted(held + seen) == sorted(CLASSES) and not set(held) & set(seen)
        assert {c.split()[0] for c in seen} == set(COLOURS)
        assert {c.split()[1] for c in seen} == set(SHAPES)


def test_heldout_compositions_follow_the_seed() -> None:
    a = heldout_compositions(SyntheticWorldConfig(seed=1))
    assert heldout_compositions(SyntheticWorldConfig(seed=1, n_train=5)) == a
    assert any(heldout_compositions(SyntheticWorldConfig(seed=s)) != a for s in range(2, 6))
    assert heldout_compositions(SyntheticWorldConfig(heldout_fraction=0.0)) == ()


# ----------------------------------------------------------------------------- splits


def test_heldout_compositions_only_in_test() -> None:
    held = set(heldout_compositions(CFG))
    for split in ("train", "val"):
        assert all(not set(s.compositions) & held and not s.heldout for s in scenes(CFG, split))
    test = scenes(CFG, "test")
    flagged = [s for s in test if s.heldout]
    assert len(flagged) == CFG.n_test // 2
    assert all(set(s.compositions) & held for s in flagged)
    assert all(not set(s.compositions) & held for s in test if not s.heldout)
    assert set(itertools.chain.from_iterable(s.compositions for s in flagged)) >= held
    # held-out classes also come as single-object images, for zero-shot classification
    assert {s.label for s in flagged if s.label} == held


def test_train_covers_every_seen_composition_with_about_half_single_objects() -> None:
    train = scenes(CFG, "train")
    counts = Counter(itertools.chain.from_iterable(s.compositions for s in train))
    assert set(counts) == set(seen_compositions(CFG))
    assert Counter(len(s.objects) for s in train).keys() == {1, 2, 3}
    single = sum(s.label is not None for s in train) / len(train)
    assert 0.4 <= single <= 0.6
    assert all(len(set(s.compositions)) == len(s.objects) for s in train)


def test_no_heldout_images_without_heldout_compositions() -> None:
    cfg = dataclasses.replace(CFG, heldout_fraction=0.0, n_test=20)
    assert not any(s.heldout for s in scenes(cfg, "test"))
    assert not is_heldout_image(cfg, "test", 0)


def test_bad_split_or_index_is_explained() -> None:
    with pytest.raises(ValueError, match="train"):
        render(TINY, "training", 0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_scene(TINY, "train", -1)


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("split", SPLITS)
def test_masks_agree_with_labels_and_pixel_colours(split: str) -> None:
    for index in range(25):
        sample = render(CFG, split, index)
        assert sample.image.shape == (224, 224, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (224, 224) and sample.mask.dtype == np.uint8
        values = set(np.unique(sample.mask).tolist())
        assert values == {0} | {mask_value(c) for c in sample.compositions}
        if sample.label is not None:
            assert values == {0, CLASSES.index(sample.label) + 1}
        for composition in sample.compositions:
            pixels = sample.image[sample.mask == mask_value(composition)]
            assert (pixels == COLOURS[composition.split()[0]]).all()
        # the background never takes an object colour: grey-ish vs saturated
        assert chroma(sample.image)[sample.mask == 0].max() <= 37
        assert ((sample.mask > 0) == (chroma(sample.image) >= 100)).all()


def _star_area(r: float) -> float:
    return 5 * r * 0.45 * r * math.sin(math.pi / 5)  # 10 triangles ½·R·ρ·sin(36°)


def _star_perimeter(r: float) -> float:
    return 10 * math.sqrt(r**2 + (0.45 * r) ** 2 - 2 * r * 0.45 * r * math.cos(math.pi / 5))


# (area, perimeter) of each shape inscribed in a circle of radius r, worked out by hand
SHAPE_GEOMETRY = {
    "circle": (lambda r: math.pi * r**2, lambda r: 2 * math.pi * r),
    "square": (lambda r: 2 * r**2, lambda r: 4 * math.sqrt(2) * r),
    "triangle": (lambda r: 3 * math.sqrt(3) / 4 * r**2, lambda r: 3 * math.sqrt(3) * r),
    "star": (_star_area, _star_perimeter),
    # two 2r×0.7r bars minus their 0.7r×0.7r overlap; 12 edges: 8 of 0.65r, 4 of 0.7r
    "cross": (lambda r: 2 * 2 * r * 0.7 * r - (0.7 * r) ** 2, lambda r: 8 * 0.65 * r + 4 * 0.7 * r),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", sorted({*CFG.object_radii, *CFG3.object_radii}))
def test_shape_areas_match_geometry(shape: str, fraction: float) -> None:
    radius = fraction * 224
    obj = SceneObject("blue", shape, "small", (1, 1), (112.0, 112.0), radius, 3)
    scene = Scene("u", "train", 0, (obj,), "gradient", 0, ("c",), False)
    _, mask = rasterise(scene, 224)
    area, perimeter = (f(radius) for f in SHAPE_GEOMETRY[shape])
    # PIL fills the closed polygon, boundary included: at most a one-pixel band more
    assert 0 <= int((mask > 0).sum()) - area <= perimeter + 4
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 112 - radius - 1 and xs.max() <= 112 + radius + 1
    assert ys.min() >= 112 - radius - 1 and ys.max() <= 112 + radius + 1


@GRIDS
def test_objects_lie_inside_the_cell_their_position_names(cfg: SyntheticWorldConfig) -> None:
    cell = cfg.image_size / cfg.grid
    positions = Counter()
    for s in scenes(cfg, "train")[:200]:
        for o in s.objects:
            cx, cy = o.centre
            row, col = int(cy // cell), int(cx // cell)
            assert (row, col) == o.cell
            assert col * cell <= cx - o.radius and cx + o.radius <= (col + 1) * cell
            assert row * cell <= cy - o.radius and cy + o.radius <= (row + 1) * cell
            assert o.radius / cfg.image_size == cfg.object_radii[SIZES.index(o.size)]
            vertical = {0: "top", cfg.grid - 1: "bottom"}.get(row, "")
            horizontal = {0: "left", cfg.grid - 1: "right"}.get(col, "")
            assert o.position == (f"{vertical} {horizontal}".strip() or "center")
            positions[o.position] += 1
    assert len(positions) == cfg.grid**2  # every cell is used and has its own name


@pytest.mark.parametrize(
    "cell_a, cell_b, expected",
    [
        ((0, 1), (2, 1), "above"),
        ((2, 0), (1, 0), "below"),
        ((1, 0), (1, 2), "to the left of"),
        ((0, 2), (1, 0), "to the right of"),  # one row up but two columns right
        ((0, 0), (1, 1), "next to"),
        ((2, 2), (0, 0), "below"),  # opposite corners: the vertical relation
    ],
)
def test_relation_from_cells(cell_a: tuple, cell_b: tuple, expected: str) -> None:
    def at(cell: tuple[int, int]) -> SceneObject:
        return SceneObject("red", "circle", "small", cell, (0.0, 0.0), 1.0)

    assert relation(at(cell_a), at(cell_b)) == expected


# ----------------------------------------------------------------------------- captions


def test_captions_mention_every_object() -> None:
    for s in scenes(CFG, "train") + scenes(CFG, "test"):
        assert len(s.captions) == len(set(s.captions)) == CFG.captions_per_image
        for caption in s.captions:
            assert all(c in caption for c in s.compositions), (caption, s.compositions)
            assert not re.search(r"\ba [aeiou]", caption) and "  " not in caption
        if s.label is not None:
            colour, shape = s.label.split()
            assert all(colour in c and shape in c for c in s.captions)


def _apart(low: SceneObject, high: SceneObject, axis: int) -> bool:
    """Whether ``low`` ends before ``high`` starts along ``axis`` (0: x, 1: y)."""
    return low.centre[axis] + low.radius <= high.centre[axis] - high.radius


@GRIDS
def test_relation_captions_match_object_geometry(cfg: SyntheticWorldConfig) -> None:
    pattern = re.compile(
        r"^an? (\w+ \w+) (above|below|to the left of|to the right of|next to) an? (\w+ \w+)"
    )
    third = cfg.image_size / cfg.grid  # one cell
    words: Counter[str] = Counter()
    for s in scenes(dataclasses.replace(cfg, captions_per_image=5), "train"):
        matches = [m for m in map(pattern.match, s.captions) if m]
        if len(s.objects) == 1:
            assert not matches
            continue
        assert len(matches) == 1
        first, word, second = matches[0].groups()
        a, b = s.objects[0], s.objects[1]
        assert (a.composition, b.composition) == (first, second)
        dx, dy = abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])
        if word == "above":
            assert _apart(a, b, 1) and dy >= dx - third
        elif word == "below":
            assert _apart(b, a, 1) and dy >= dx - third
        elif word == "to the left of":
            assert _apart(a, b, 0) and dx > dy
        elif word == "to the right of":
            assert _apart(b, a, 0) and dx > dy
        else:  # diagonal neighbours: apart on both axes, less than a cell and a half away
            assert (_apart(a, b, 0) or _apart(b, a, 0)) and (_apart(a, b, 1) or _apart(b, a, 1))
            assert max(dx, dy) < 1.5 * third
        words[word] += 1
    assert set(words) == {"above", "below", "to the left of", "to the right of", "next to"}


def test_articles_and_caption_kinds() -> None:
    cfg = dataclasses.replace(CFG, captions_per_image=5)
    train = scenes(cfg, "train")[:100]
    orange = [s for s in train if s.label and s.label.startswith("orange")]
    assert orange and all(f"a photo of an {s.label}" in s.captions for s in orange)
    captions = [c for s in train for c in s.captions]
    assert any(c.endswith("background") for c in captions)
    assert any(c.startswith(("two shapes: ", "three shapes: ")) for c in captions)
    assert any("in the top left corner" in c for c in captions)


# ----------------------------------------------------------------------------- determinism


def test_same_config_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = (
        all_files(write_world(cfg, tmp_path / d)[1])
        for cfg, d in [(TINY, "a"), (TINY, "b"), (dataclasses.replace(TINY, seed=4), "c")]
    )
    assert a == b and len(a) == 2 * 12 + 1
    images = [k for k in a if k.startswith("images/")]
    assert all(a[k] != c[k] for k in images)


def test_each_image_renders_alone_and_splits_differ() -> None:
    late = render(CFG, "train", 37)
    for i in range(37):
        render(CFG, "val", i)
    again = render(CFG, "train", 37)
    assert (late.image == again.image).all() and late.captions == again.captions
    assert not np.array_equal(render(CFG, "train", 0).image, render(CFG, "val", 0).image)
    assert not np.array_equal(render(CFG, "train", 0).image, render(CFG, "train", 1).image)


# ----------------------------------------------------------------------------- files


def test_source_writes_files_records_and_world(tmp_path: Path) -> None:
    records, out_dir = write_world(TINY, tmp_path)
    assert [r.split for r in records] == ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    assert all(isinstance(r, PairRecord) and r.source == "synthetic" for r in records)
    assert len({r.uid for r in records}) == 12
    assert records[7].uid == make_uid("synthetic", "val/1")
    for record in records:
        split, index = record.split, int(Path(record.image_uri).stem)
        sample = render(TINY, split, index)
        assert Path(record.image_uri).is_absolute()
        assert Path(record.image_uri) == sample_paths(out_dir, split, index)[0].resolve()
        image, mask = Image.open(record.image_uri), Image.open(record.mask_uri)
        assert image.mode == "RGB" and mask.mode == "P" and image.size == (64, 64)
        assert (np.asarray(image) == sample.image).all() and (np.asarray(mask) == sample.mask).all()
        assert record.captions == list(sample.captions) and record.label == sample.label
    world = load_world(out_dir)
    assert world["classes"] == list(CLASSES) and world["num_mask_classes"] == 31
    assert world["heldout_compositions"] == list(heldout_compositions(TINY))
    assert {s: v["count"] for s, v in world["splits"].items()} == {"train": 6, "val": 2, "test": 4}
    assert world["heldout_uids"]["test"] == [records[8].uid, records[10].uid]  # even indices
    assert world["heldout_uids"]["train"] == []
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_world_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="generate the world first .*prepare stage"):
        load_world(tmp_path)


def test_source_is_idempotent_and_grows_incrementally(tmp_path: Path) -> None:
    _, out_dir = write_world(TINY, tmp_path)
    first = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.png")}
    write_world(TINY, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.png")} == first

    grown = dataclasses.replace(TINY, n_train=8)
    records, _ = write_world(grown, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert sample_paths(out_dir, "train", 7)[0].exists() and len(records) == 14
    assert load_world(out_dir)["splits"]["train"]["count"] == 8

    # a truncated file (a crash, a bad copy) is rendered again
    image_path = sample_paths(out_dir, "val", 0)[0]
    image_path.write_bytes(image_path.read_bytes()[:-200])
    write_world(grown, tmp_path)
    assert (np.asarray(Image.open(image_path)) == render(grown, "val", 0).image).all()

    # another seed changes the content: every file is rewritten
    reseeded = dataclasses.replace(grown, seed=99)
    write_world(reseeded, tmp_path)
    assert (np.asarray(Image.open(image_path)) == render(reseeded, "val", 0).image).all()
    assert all(p.stat().st_mtime_ns != t for p, t in first.items())


def test_source_writes_under_the_source_name(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, source="shapes")
    records, _ = write_world(cfg, tmp_path)
    assert records[0].uid == make_uid("shapes", "train/0") and records[0].source == "shapes"
    assert Path(records[0].image_uri).parent == (tmp_path / "shapes" / "images" / "train").resolve()
    assert load_world(tmp_path / "shapes")["source"] == "shapes"


# ----------------------------------------------------------------------------- learnability


def _mask_features(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean foreground RGB, [bounding-box fill ratio, height / width]) of an object."""
    foreground = mask > 0
    ys, xs = np.nonzero(foreground)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    shape = np.array([foreground.sum() / (height * width), height / width])
    return image[foreground].mean(axis=0), shape


def _nearest(centroids: dict[str, np.ndarray], x: np.ndarray) -> str:
    return min(centroids, key=lambda k: float(np.linalg.norm(centroids[k] - x)))


def test_heldout_compositions_are_recognisable_from_parts_seen_in_train() -> None:
    """Nearest-centroid on colour (mean RGB) and shape (fill ratio, aspect) features,
    fitted on train single-object images, names the held-out test compositions."""
    colour_feats: dict[str, list[np.ndarray]] = {c: [] for c in COLOURS}
    shape_feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    for i in range(160):
        sample = render(CFG, "train", i)
        if sample.label is not None:
            colour, shape = sample.label.split()
            rgb, geometry = _mask_features(sample.image, sample.mask)
            colour_feats[colour].append(rgb)
            shape_feats[shape].append(geometry)
    colour_centroids = {k: np.mean(v, axis=0) for k, v in colour_feats.items()}
    shape_centroids = {k: np.mean(v, axis=0) for k, v in shape_feats.items()}
    held = set(heldout_compositions(CFG))
    hits = total = 0
    for i in range(0, 160, 2):
        sample = render(CFG, "test", i)
        if sample.label is None or sample.label not in held:
            continue
        rgb, geometry = _mask_features(sample.image, sample.mask)
        predicted = f"{_nearest(colour_centroids, rgb)} {_nearest(shape_centroids, geometry)}"
        hits += predicted == sample.label
        total += 1
    assert total >= 20
    assert hits / total >= 0.95

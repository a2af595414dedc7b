"""The synthetic demo world: coloured shapes on textured backgrounds, with captions and masks.

Every image holds one to three flat-coloured shapes (6 colours × 5 shapes = 30
colour-shape compositions, the classes) of two sizes, each inside its own cell of a grid
(``grid``: 2×2 in the demo, or 3×3), on a muted background texture (gradient, stripes or
blotchy noise). The world is built to be learnable by tiny ViTs in minutes on a CPU:

- objects are large next to the 14-pixel patches (demo: 2×2 grid, radii 0.17 / 0.23 of
  the side, 2.7-3.7 patches across at 112 px) and never overlap (one object per cell);
- object colours are saturated and background colours are greys with a small tint, so
  no background pixel can ever take an object's colour (chroma ≤ 37 vs ≥ 130);
- captions state only what is true of the pixels: colour, shape, size, the grid cell
  ("in the top left corner") and the relation between two objects' cells.

A fraction of the compositions is held out: train and val never show them, while every
other test image (even indices) holds at least one, so zero-shot generalisation to novel
combinations of seen colours and seen shapes is measured separately from seen classes.

Each image is a pure function of (config, split, index): any image can be regenerated
alone, in any order or process, and a split can grow without touching existing files.

Masks: 0 = background, ``c + 1`` for the composition ``CLASSES[c]`` (so there are
``NUM_MASK_CLASSES = len(CLASSES) + 1`` mask classes), saved as palette PNGs whose
indices are the class values (``np.asarray(Image.open(path))`` gives them back).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from dinoalign.data.config import MAX_CAPTIONS, MAX_OBJECTS, SPLITS, SyntheticWorldConfig  # noqa: F401
from dinoalign.data.config import check_split as _check_split
from dinoalign.data.schema import PairRecord, make_uid
from dinoalign.errors import DataFileMissing
from dinoalign.storage import atomic_path

# Bump when a change to this file changes the pixels or captions of a sample, so that
# files written by an older generator are re-rendered instead of being reused.
GENERATOR_VERSION = 2  # 2: grid and object radii in the config (demo: 2×2, 0.17 / 0.23)

# Saturated colours, pairwise ≥ 75 apart in RGB, each with chroma (max - min) ≥ 130.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 45, 195),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# The two object sizes; their radii are the world's ``object_radii`` (small, large).
SIZES: tuple[str, ...] = ("small", "large")
# Every position a cell of a 2×2 or 3×3 grid can name (position_name).
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of", "next to")
BACKGROUNDS: dict[str, str] = {"gradient": "shaded", "stripes": "striped", "noise": "mottled"}

CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
NUM_MASK_CLASSES = len(CLASSES) + 1

SINGLE_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_obj}",
    "{a_sized}",
    "{a_obj} {where}",
    "{a_sized} on a {bg} background",
    "a single {obj} {where}",
)
MULTI_TEMPLATES: tuple[str, ...] = (
    "{a_first} {relation} {a_second}{third_where}",
    "{count} shapes: {list_obj}",
    "a photo of {list_obj}",
    "{list_sized} on a {bg} background",
    "{list_where}",
)
# the config's bound on captions_per_image is the number of distinct templates
if MAX_CAPTIONS != min(len(SINGLE_TEMPLATES), len(MULTI_TEMPLATES)):
    raise ImportError("dinoalign.data.config.MAX_CAPTIONS must be the number of caption templates")

_COUNT_WORDS = {2: "two", 3: "three"}
_SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}
_HELDOUT_STREAM = 4
_HASH_KEY = "dinoalign.render_hash"
# Background colour: grey level plus a per-channel tint; the texture adds the same
# luminance to all channels, so the chroma stays ≤ 2 * _TINT (+1 for rounding).
_GREY_RANGE = (80.0, 170.0)
_TINT = 18.0


def position_name(cell: tuple[int, int], grid: int) -> str:
    """The name of ``cell`` (row, col) of a ``grid``×``grid`` layout: "top"/"bottom" for the
    first/last row, "left"/"right" for the first/last column, "center" for neither."""
    row, col = cell
    vertical = "top" if row == 0 else "bottom" if row == grid - 1 else ""
    horizontal = "left" if col == 0 else "right" if col == grid - 1 else ""
    return f"{vertical} {horizontal}".strip() or "center"


def grid_positions(grid: int) -> tuple[str, ...]:
    """The position names of a ``grid``×``grid`` layout, row-major."""
    return tuple(position_name((r, c), grid) for r in range(grid) for c in range(grid))


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: ``centre`` (x, y) in pixels, ``radius`` of its circumscribed circle,
    ``cell`` (row, col) in the ``grid``×``grid`` layout, which names its position."""

    colour: str
    shape: str
    size: str
    cell: tuple[int, int]
    centre: tuple[float, float]
    radius: float
    grid: int = 2

    @property
    def composition(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        return position_name(self.cell, self.grid)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything about one image except its pixels (cheap to compute)."""

    uid: str
    split: str
    index: int
    objects: tuple[SceneObject, ...]
    background: str
    texture_seed: int
    captions: tuple[str, ...]
    heldout: bool

    @property
    def compositions(self) -> tuple[str, ...]:
        return tuple(o.composition for o in self.objects)

    @property
    def label(self) -> str | None:
        """The composition of a single-object image, None when there are several."""
        return self.objects[0].composition if len(self.objects) == 1 else None


@dataclasses.dataclass(frozen=True, eq=False)
class Sample(Scene):
    """A rendered scene: ``image`` H×W×3 uint8 RGB, ``mask`` H×W uint8 class values."""

    image: np.ndarray
    mask: np.ndarray


# ----------------------------------------------------------------------------- compositions


def mask_value(composition: str) -> int:
    """Mask value of ``composition`` ("red circle" -> 1); 0 is the background."""
    try:
        return CLASSES.index(composition) + 1
    except ValueError:
        raise ValueError(
            f"{composition!r} is not a composition of the synthetic world; "
            f"expected '<colour> <shape>' with colours {list(COLOURS)} and shapes {list(SHAPES)}"
        ) from None


@functools.lru_cache(maxsize=64)
def heldout_compositions(cfg: SyntheticWorldConfig) -> tuple[str, ...]:
    """The ``round(heldout_fraction · len(CLASSES))`` compositions seen only in test, in
    ``CLASSES`` order; a deterministic function of ``seed`` and ``heldout_fraction``.

    A random order is walked greedily, holding a composition out only while its colour
    and its shape keep another composition in train. The walk can only stop early at a
    minimal cover of the 6 colours and 5 shapes, which keeps at most 9 compositions, so
    it always reaches the at most 15 that ``heldout_fraction <= 0.5`` asks for.
    """
    target = round(cfg.heldout_fraction * len(CLASSES))
    rng = np.random.default_rng([cfg.seed, _HELDOUT_STREAM])
    parts = [c.split(" ") for c in CLASSES]
    seen_per_colour = {colour: len(SHAPES) for colour in COLOURS}
    seen_per_shape = {shape: len(COLOURS) for shape in SHAPES}
    heldout: list[int] = []
    for c in rng.permutation(len(CLASSES)):
        if len(heldout) == target:
            break
        colour, shape = parts[c]
        if seen_per_colour[colour] > 1 and seen_per_shape[shape] > 1:
            heldout.append(int(c))
            seen_per_colour[colour] -= 1
            seen_per_shape[shape] -= 1
    return tuple(CLASSES[c] for c in sorted(heldout))


def seen_compositions(cfg: SyntheticWorldConfig) -> tuple[str, ...]:
    """The compositions of train and val, in ``CLASSES`` order."""
    heldout = set(heldout_compositions(cfg))
    return tuple(c for c in CLASSES if c not in heldout)


def is_heldout_image(cfg: SyntheticWorldConfig, split: str, index: int) -> bool:
    """Whether image ``index`` of ``split`` holds a held-out composition: every even test
    index when there are held-out compositions, nothing in train or val."""
    return _check_split(split) == "test" and bool(heldout_compositions(cfg)) and index % 2 == 0


# ----------------------------------------------------------------------------- scenes


def sample_scene(cfg: SyntheticWorldConfig, split: str, index: int) -> Scene:
    """Draw the objects, background and captions of image ``index`` of ``split``."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    # The index sits before the non-zero stream tag: numpy's SeedSequence ignores
    # trailing zeros, so [seed, tag, 0] would collide with [seed, tag].
    rng = np.random.default_rng([cfg.seed, index, _SPLIT_STREAMS[_check_split(split)]])
    heldout = is_heldout_image(cfg, split, index)
    single = cfg.max_objects == 1 or rng.random() < cfg.single_object_fraction
    n_objects = 1 if single else int(rng.integers(2, cfg.max_objects + 1))
    compositions = _draw_compositions(cfg, rng, n_objects, heldout)
    cells = rng.choice(cfg.grid * cfg.grid, size=n_objects, replace=False)
    objects = tuple(
        _place_object(cfg, composition, int(cell), rng)
        for composition, cell in zip(compositions, cells)
    )
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    texture_seed = int(rng.integers(2**63))
    templates = SINGLE_TEMPLATES if n_objects == 1 else MULTI_TEMPLATES
    fields = _caption_fields(objects, background)
    captions = tuple(
        templates[t].format(**fields)
        for t in rng.permutation(len(templates))[: cfg.captions_per_image]
    )
    return Scene(
        uid=make_uid(cfg.source, f"{split}/{index}"),
        split=split,
        index=index,
        objects=objects,
        background=background,
        texture_seed=texture_seed,
        captions=captions,
        heldout=heldout,
    )


def _draw_compositions(
    cfg: SyntheticWorldConfig, rng: np.random.Generator, n_objects: int, heldout: bool
) -> list[str]:
    """``n_objects`` distinct compositions; a held-out image gets at least one held-out
    one (the others from all classes), any other image only seen ones."""
    if not heldout:
        seen = seen_compositions(cfg)
        return [seen[i] for i in rng.choice(len(seen), size=n_objects, replace=False)]
    held = heldout_compositions(cfg)
    first = held[int(rng.integers(len(held)))]
    others = [c for c in CLASSES if c != first]
    chosen = [first] + [others[i] for i in rng.choice(len(others), n_objects - 1, replace=False)]
    return [chosen[i] for i in rng.permutation(n_objects)]


def _place_object(
    cfg: SyntheticWorldConfig, composition: str, cell: int, rng: np.random.Generator
) -> SceneObject:
    """Size and centre of one object, jittered inside grid cell ``cell`` (row-major)."""
    colour, shape = composition.split(" ")
    size_index = int(rng.integers(len(SIZES)))
    radius = cfg.object_radii[size_index] * cfg.image_size
    row, col = divmod(cell, cfg.grid)
    cell_side = cfg.image_size / cfg.grid
    slack = max(cell_side / 2 - radius - 1.0, 0.0)  # keeps the object inside its cell
    dx, dy = rng.uniform(-slack, slack, size=2)
    centre = (float((col + 0.5) * cell_side + dx), float((row + 0.5) * cell_side + dy))
    return SceneObject(colour, shape, SIZES[size_index], (row, col), centre, radius, cfg.grid)


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` from their grid cells: the axis with the larger
    cell offset decides; diagonal neighbours are "next to", opposite corners vertical."""
    drow, dcol = a.cell[0] - b.cell[0], a.cell[1] - b.cell[1]
    if abs(drow) == abs(dcol) == 1:
        return "next to"
    if abs(drow) >= abs(dcol):
        return "above" if drow < 0 else "below"
    return "to the left of" if dcol < 0 else "to the right of"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption_fields(objects: tuple[SceneObject, ...], background: str) -> dict[str, str]:
    """The words the caption templates are filled with."""
    named = [_with_article(o.composition) for o in objects]
    sized = [_with_article(f"{o.size} {o.composition}") for o in objects]
    where = [POSITION_PHRASES[o.position] for o in objects]
    fields = {"bg": BACKGROUNDS[background]}
    if len(objects) == 1:
        fields.update(obj=objects[0].composition, a_obj=named[0], a_sized=sized[0], where=where[0])
        return fields
    third = f", and {named[2]} {where[2]}" if len(objects) == 3 else ""
    fields.update(
        a_first=named[0],
        a_second=named[1],
        relation=relation(objects[0], objects[1]),
        third_where=third,
        count=_COUNT_WORDS[len(objects)],
        list_obj=_join(named),
        list_sized=_join(sized),
        list_where=_join([f"{n} {w}" for n, w in zip(named, where)]),
    )
    return fields


# ----------------------------------------------------------------------------- pixels


def _polar_polygon(
    centre: tuple[float, float], angles_deg: np.ndarray, radii: float | np.ndarray
) -> np.ndarray:
    """V×2 (x, y) vertices at ``angles_deg`` (clockwise on screen from +x) and ``radii``."""
    angles = np.deg2rad(angles_deg)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)


def shape_outline(shape: str, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Polygon V×2 (x, y) of ``shape`` inscribed in the circle (``centre``, ``radius``)."""
    if shape == "circle":
        return _polar_polygon(centre, np.arange(64) * 360.0 / 64, radius)
    if shape == "square":
        return _polar_polygon(centre, 45.0 + 90.0 * np.arange(4), radius)
    if shape == "triangle":  # equilateral, pointing up
        return _polar_polygon(centre, np.array([-90.0, 30.0, 150.0]), radius)
    if shape == "star":  # five points, inner radius 0.45
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return _polar_polygon(centre, -90.0 + 36.0 * np.arange(10), radii)
    if shape == "cross":  # a plus sign, arms 0.7·radius thick (a patch wide when small)
        r, w = radius, 0.35 * radius
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        corners += [(-x, -y) for x, y in corners]
        return np.array(corners) + np.array(centre)
    raise ValueError(f"unknown shape {shape!r}; the synthetic world has {list(SHAPES)}")


def _background(kind: str, size: int, texture_seed: int) -> np.ndarray:
    """Muted texture S×S×3 float32: one or two tinted greys plus a luminance pattern
    shared by the three channels (which keeps the chroma of the tinted greys)."""
    rng = np.random.default_rng(texture_seed)

    def tinted_grey() -> np.ndarray:
        return rng.uniform(*_GREY_RANGE) + rng.uniform(-_TINT, _TINT, size=3)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0.0, np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    base = tinted_grey().astype(np.float32)
    if kind == "gradient":
        end = tinted_grey().astype(np.float32)
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        colour = base + t[..., None] * (end - base)
        luminance = rng.normal(0.0, 4.0, size=(size, size))
    elif kind == "stripes":
        period, amplitude, phase = rng.uniform([10.0, 15.0, 0.0], [36.0, 35.0, 2 * np.pi])
        luminance = amplitude * np.sin(2 * np.pi * along / period + phase)
        colour = np.broadcast_to(base, (size, size, 3))
    elif kind == "noise":
        cells = int(rng.integers(4, 13))
        coarse = rng.normal(0.0, 25.0, size=(cells, cells)).astype(np.float32)
        blotches = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        luminance = np.asarray(blotches) + rng.normal(0.0, 6.0, size=(size, size))
        colour = np.broadcast_to(base, (size, size, 3))
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {list(BACKGROUNDS)}")
    return colour + luminance[..., None].astype(np.float32)


def rasterise(scene: Scene, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of ``scene``: image S×S×3 uint8 RGB and mask S×S uint8 class values.

    Shapes are drawn without anti-aliasing with the same polygon on image and mask, so
    every mask pixel of class ``c + 1`` has exactly the colour of ``CLASSES[c]``.
    """
    texture = _background(scene.background, image_size, scene.texture_seed)
    image = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))
    mask = Image.new("L", (image_size, image_size), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for obj in scene.objects:
        polygon = [tuple(p) for p in shape_outline(obj.shape, obj.centre, obj.radius)]
        draw_image.polygon(polygon, fill=COLOURS[obj.colour])
        draw_mask.polygon(polygon, fill=mask_value(obj.composition))
    return np.asarray(image), np.asarray(mask)


def render(cfg: SyntheticWorldConfig, split: str, index: int) -> Sample:
    """Image ``index`` of ``split``, with its pixels; independent of every other image."""
    scene = sample_scene(cfg, split, index)
    image, mask = rasterise(scene, cfg.image_size)
    fields = {f.name: getattr(scene, f.name) for f in dataclasses.fields(Scene)}
    return Sample(**fields, image=image, mask=mask)


# ----------------------------------------------------------------------------- files


def render_hash(cfg: SyntheticWorldConfig) -> str:
    """Hash of everything that decides a sample's content: the config without the split
    sizes (growing a split keeps existing files valid) and the source name (uids only)."""
    content = dataclasses.asdict(cfg)
    for name in ("n_train", "n_val", "n_test", "source"):
        del content[name]
    content["generator_version"] = GENERATOR_VERSION
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def _mask_palette() -> list[int]:
    """Palette of mask PNGs, only so that a mask is readable in an image viewer: each
    class in its colour, darker for later shapes; the background black."""
    palette = [0, 0, 0]
    for composition in CLASSES:
        colour, shape = composition.split(" ")
        shade = 1.0 - 0.15 * SHAPES.index(shape)
        palette += [int(v * shade) for v in COLOURS[colour]]
    return palette + [0] * (768 - len(palette))


def _save_png(path: Path, image: Image.Image, content_hash: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(_HASH_KEY, content_hash)  # before the pixel data: readable without decoding
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1, pnginfo=info)


def _has_hash(path: Path, content_hash: str) -> bool:
    """Whether ``path`` is an intact PNG written with ``content_hash`` (chunk CRCs are
    checked, the pixels are not decoded)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            if im.info.get(_HASH_KEY) != content_hash:
                return False
            im.verify()
            return True
    except (OSError, SyntaxError):  # truncated or not a PNG: render it again
        return False


def sample_paths(out_dir: Path, split: str, index: int) -> tuple[Path, Path]:
    """(image path, mask path) of a sample under ``out_dir``."""
    return (
        Path(out_dir) / "images" / split / f"{index}.png",
        Path(out_dir) / "masks" / split / f"{index}.png",
    )


def write_sample(cfg: SyntheticWorldConfig, out_dir: Path, split: str, index: int) -> PairRecord:
    """Write the image and mask PNGs of one sample (unless both already exist with this
    config's render hash) and return its manifest record. Safe to call in parallel."""
    scene = sample_scene(cfg, split, index)
    image_path, mask_path = (p.resolve() for p in sample_paths(out_dir, split, index))
    content_hash = render_hash(cfg)
    if not (_has_hash(image_path, content_hash) and _has_hash(mask_path, content_hash)):
        image, mask = rasterise(scene, cfg.image_size)
        mask_png = Image.fromarray(mask)
        mask_png.putpalette(_mask_palette())  # L -> P with the same indices
        _save_png(image_path, Image.fromarray(image), content_hash)
        _save_png(mask_path, mask_png, content_hash)
    return PairRecord(
        uid=scene.uid,
        image_uri=str(image_path),
        captions=list(scene.captions),
        split=split,
        source=cfg.source,
        label=scene.label,
        mask_uri=str(mask_path),
    )


def world_description(cfg: SyntheticWorldConfig) -> dict[str, Any]:
    """The world's vocabulary, classes, held-out compositions and per-split counts (as
    ``world.json`` holds them), including the uids of the held-out test images."""
    heldout_uids = {
        split: [
            make_uid(cfg.source, f"{split}/{i}")
            for i in range(cfg.count(split))
            if is_heldout_image(cfg, split, i)
        ]
        for split in SPLITS
    }
    return {
        "source": cfg.source,
        "generator_version": GENERATOR_VERSION,
        "render_hash": render_hash(cfg),
        "config": dataclasses.asdict(cfg),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": dict(zip(SIZES, cfg.object_radii)),
        "positions": list(grid_positions(cfg.grid)),
        "relations": list(RELATIONS),
        "backgrounds": list(BACKGROUNDS),
        "classes": list(CLASSES),
        "mask_values": {"background": 0, **{c: mask_value(c) for c in CLASSES}},
        "num_mask_classes": NUM_MASK_CLASSES,
        "heldout_compositions": list(heldout_compositions(cfg)),
        "seen_compositions": list(seen_compositions(cfg)),
        "splits": {
            split: {"count": cfg.count(split), "heldout_images": len(heldout_uids[split])}
            for split in SPLITS
        },
        "heldout_uids": heldout_uids,
    }


def load_world(out_dir: Path) -> dict[str, Any]:
    """The ``world.json`` that the ``synthetic`` source
    (:func:`dinoalign.data.sources.synthetic.synthetic_source`) wrote under ``out_dir``."""
    path = Path(out_dir) / "world.json"
    if not path.is_file():
        raise DataFileMissing(
            f"{path} does not exist: generate the world first (the prepare stage with "
            f"data.source: synthetic)"
        )
    return json.loads(path.read_text())

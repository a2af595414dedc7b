"""The sections of ``data:`` that configure a source: the synthetic world and the coco,
pairs and webdataset readers (:mod:`dinoalign.data.sources`), with the checks they run
when params load.

Import-light (no numpy, PIL, pyarrow or pandas): :mod:`dinoalign.config` imports it for
every command. Each source module re-exports its config.
"""

from __future__ import annotations

import codecs
import dataclasses

from dinoalign.errors import ConfigError

# The sources registered in :data:`dinoalign.data.sources.SOURCES` by this package, so that
# params naming one load without importing them (tests check the two agree).
SOURCE_NAMES: tuple[str, ...] = ("coco", "pairs", "synthetic", "webdataset")


def check_name(kind: str, **values: str) -> None:
    """Raise a clear error for an empty source name or split in a source config."""
    for field, value in values.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{kind}.{field} must be a non-empty string, got {value!r}")


# ----------------------------------------------------------------------------- synthetic

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_CAPTIONS = 5  # the number of distinct caption templates of dinoalign.data.synthetic
MAX_OBJECTS = 3
GRIDS = (2, 3)  # layouts whose every cell has its own name


def check_split(split: str) -> str:
    """``split`` if the synthetic world has it, else a ValueError naming those it has."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the synthetic world has {list(SPLITS)}")
    return split


@dataclasses.dataclass(frozen=True)
class SyntheticWorldConfig:
    """Size and seed of the demo world; the defaults are the demo profile.

    ``grid``: objects sit one per cell of a ``grid``×``grid`` layout (2 or 3; the cell
    names the position in captions). ``object_radii``: the (small, large) object radius,
    circumscribed circle, as a fraction of the image side; a large object must fit in
    its cell (radius < 1 / (2·grid)). The demo's 2×2 grid with radii 0.17 / 0.23 makes an
    object 4-17 % of the image and 2.7-3.7 patches of 14 px across at 112 px (the 3×3
    grid with 0.09 / 0.155: 1-8 %, 1.4-2.5 patches), large enough for DINO pretraining
    to find the objects (docs/benchmarks.md, DINO pretraining of the demo backbone).
    ``heldout_fraction``: share of the colour-shape compositions seen only in test.
    ``single_object_fraction``: share of images with exactly one object (these carry a
    class label, for classification). ``source``: the source name in uids.
    """

    n_train: int = 3000
    n_val: int = 300
    n_test: int = 600
    image_size: int = 224
    heldout_fraction: float = 0.2
    captions_per_image: int = 3
    seed: int = 0
    max_objects: int = 3
    single_object_fraction: float = 0.5
    source: str = "synthetic"
    grid: int = 2
    object_radii: tuple[float, float] = (0.17, 0.23)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"synthetic.{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 48:
            raise ConfigError(
                f"synthetic.image_size must be >= 48 so a small object spans a few pixels, "
                f"got {self.image_size}"
            )
        # Held-out selection keeps every colour and shape in train; up to half of the
        # compositions that is always possible (see heldout_compositions).
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ConfigError(
                f"synthetic.heldout_fraction must be in [0, 0.5] so every colour and shape "
                f"stays in train, got {self.heldout_fraction}"
            )
        if not 1 <= self.captions_per_image <= MAX_CAPTIONS:
            raise ConfigError(
                f"synthetic.captions_per_image must be in [1, {MAX_CAPTIONS}] (the number of "
                f"distinct caption templates), got {self.captions_per_image}"
            )
        if not 1 <= self.max_objects <= MAX_OBJECTS:
            raise ConfigError(
                f"synthetic.max_objects must be in [1, {MAX_OBJECTS}], got {self.max_objects}"
            )
        if not 0.0 <= self.single_object_fraction <= 1.0:
            raise ConfigError(
                f"synthetic.single_object_fraction must be in [0, 1], "
                f"got {self.single_object_fraction}"
            )
        if not self.source or "/" in self.source:
            raise ConfigError(
                f"synthetic.source must be a non-empty name without '/', got {self.source!r}"
            )
        if self.grid not in GRIDS:
            raise ConfigError(
                f"synthetic.grid must be one of {list(GRIDS)} (cells named top/bottom, "
                f"left/right, center; {MAX_OBJECTS} objects need {MAX_OBJECTS} cells), got {self.grid}"
            )
        try:
            small, large = (float(r) for r in self.object_radii)
        except (TypeError, ValueError):
            raise ConfigError(
                f"synthetic.object_radii must be two numbers [small, large], got {self.object_radii!r}"
            ) from None
        limit = 0.5 / self.grid
        if not 0.02 <= small < large < limit:
            raise ConfigError(
                f"synthetic.object_radii must satisfy 0.02 <= small < large < {limit:.4f} (a large "
                f"object fits in one of the {self.grid}×{self.grid} cells), got {self.object_radii!r}"
            )
        object.__setattr__(self, "object_radii", (small, large))

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        return int(getattr(self, f"n_{check_split(split)}"))


# ----------------------------------------------------------------------------- coco


@dataclasses.dataclass(frozen=True)
class CocoSourceConfig:
    """Where the COCO files are; defaults follow the official layout under ``data/coco``."""

    captions_json: str = "data/coco/annotations/captions_train2017.json"
    image_dir: str = "data/coco/train2017"
    instances_json: str | None = None  # set to write semantic masks and labels
    split: str = "train"
    name: str = "coco"  # source name in uids and manifests

    def __post_init__(self) -> None:
        check_name("coco", name=self.name, split=self.split)
        if not self.captions_json or not self.image_dir:
            raise ConfigError(
                "coco: captions_json and image_dir must be set, e.g. "
                "captions_json=data/coco/annotations/captions_train2017.json "
                "image_dir=data/coco/train2017"
            )


# ----------------------------------------------------------------------------- pairs

TABLE_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclasses.dataclass(frozen=True)
class PairsSourceConfig:
    """A table of (image, caption) rows."""

    path: str = "data/pairs.csv"
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None  # rows sharing a key are one image; default: the image cell
    split_column: str | None = None
    default_split: str = "train"
    format: str | None = None  # "csv", "tsv" or "parquet"; None: from the file suffix
    separator: str | None = None  # csv/tsv field separator; None: "," (csv) or tab (tsv)
    encoding: str = "utf-8"  # csv/tsv text encoding, e.g. latin-1 or cp1252
    name: str = "pairs"  # source name in uids and manifests
    # folders/prefixes every image must resolve under (local paths, s3://bucket/prefix,
    # http(s)://host/path); None: anywhere. ``data.allowed_roots`` sets it for the source.
    allowed_roots: list[str] | None = None

    def __post_init__(self) -> None:
        if self.allowed_roots is not None and (
                isinstance(self.allowed_roots, str)
                or not all(isinstance(r, str) and r.strip() for r in self.allowed_roots)):
            raise ConfigError(f"pairs.allowed_roots must be a list of folders or URL prefixes, "
                              f"got {self.allowed_roots!r}")

        check_name("pairs", name=self.name, default_split=self.default_split, path=self.path)
        if self.separator is not None and len(self.separator) != 1:
            raise ConfigError(f"pairs.separator must be one character, got {self.separator!r}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"pairs.encoding {self.encoding!r} is not a known codec") from None
        if self.format is not None and self.format not in set(TABLE_FORMATS.values()):
            raise ConfigError(
                f"pairs.format {self.format!r} is not one of {sorted(set(TABLE_FORMATS.values()))}"
            )


# ----------------------------------------------------------------------------- webdataset


@dataclasses.dataclass(frozen=True)
class WebDatasetSourceConfig:
    """Tar shards of (image, txt/json) samples, as written by img2dataset."""

    urls: tuple[str, ...] = ("data/webdataset/{00000..00009}.tar",)
    split: str = "train"
    name: str = "webdataset"  # source name in uids and manifests

    def __post_init__(self) -> None:
        # params.yaml may give one pattern as a plain string, or a list
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(self.urls)
        object.__setattr__(self, "urls", urls)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ConfigError(
                "webdataset.urls must list shard paths or URLs, e.g. "
                f"['data/shards/{{00000..00009}}.tar'], got {self.urls!r}"
            )
        check_name("webdataset", name=self.name, split=self.split)

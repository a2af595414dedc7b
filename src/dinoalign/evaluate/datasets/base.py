"""The evaluation-dataset registry, file access and the three dataset kinds.

Every adapter reads its published on-disk layout from a root that may be a local path or
any URI that :mod:`dinoalign.storage` opens (``s3://`` with credentials from the
environment, ``http(s)://``). Items are decoded lazily, one per ``dataset[i]``.

- :class:`SegmentationDataset` items: ``(image uint8 H×W×3, label int64 H×W, name)``,
  label 255 = ignore; attributes ``class_names``, ``has_background``.
- :class:`ClassificationDataset` items: ``(image uint8 H×W×3, label int, name)``.
- :class:`RetrievalDataset` items: ``(image uint8 H×W×3, captions list[str], name)``;
  ``captions`` / ``caption_image_index`` give all captions flat.

A file that cannot be used (missing, unreadable, a label of the wrong mode or size, ids
outside the class list, a malformed class-names or captions file) raises
:class:`~dinoalign.errors.DatasetError` (:class:`~dinoalign.errors.DatasetFileMissing`
for a missing one) naming the file: when the adapter is built for the files it lists,
when ``dataset[i]`` decodes it for the others. The ``dinoalign`` command turns it into
one line on stderr and exit code 2.
"""

from __future__ import annotations

import io
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from dinoalign.errors import DatasetError, DatasetFileMissing
from dinoalign.registry import Registry
from dinoalign.storage import fs_for

EVAL_DATASETS: Registry[Callable[..., Any]] = Registry("eval dataset")

IGNORE_INDEX = 255


class DatasetFiles:
    """Read-only access to files below ``root`` (local path or URI); paths are relative."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self.fs, self._base = fs_for(self.root)
        self._base = self._base.rstrip("/")

    def _full(self, rel: str) -> str:
        return f"{self._base}/{rel}" if rel else self._base

    def uri(self, rel: str) -> str:
        """Root-prefixed name of ``rel``, for messages."""
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._full(rel)))

    def sub(self, rel: str) -> DatasetFiles:
        return DatasetFiles(self.uri(rel)) if rel else self

    def locate(self, marker: str, prefixes: Sequence[str], layout: str) -> DatasetFiles:
        """The first of ``root/prefix`` that contains ``marker``, so that users may point at
        the dataset folder or at one of its parents. ``layout`` is shown if none does."""
        for prefix in prefixes:
            if self.exists(f"{prefix}/{marker}" if prefix else marker):
                return self.sub(prefix)
        tried = ", ".join(self.uri(f"{p}/{marker}" if p else marker) for p in prefixes)
        raise DatasetFileMissing(
            f"no dataset found: none of {tried} exists. Expected layout: {layout}"
        )

    def glob(self, pattern: str) -> list[str]:
        """Sorted relative paths of the files matching ``pattern`` (relative to the root)."""
        prefix = self._base + "/"
        return sorted(
            p[len(prefix) :] for p in self.fs.glob(self._full(pattern)) if p.startswith(prefix)
        )

    def list_dirs(self, rel: str = "") -> list[str]:
        """Sorted names of the sub-folders of ``rel``."""
        try:
            entries = self.fs.ls(self._full(rel), detail=True)
        except FileNotFoundError:
            raise DatasetFileMissing(f"no folder {self.uri(rel)}") from None
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        )

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open(self._full(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise DatasetFileMissing(f"missing file {self.uri(rel)}") from None
        except IsADirectoryError:
            raise DatasetError(f"{self.uri(rel)} is a folder, not a file") from None

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(
                f"{self.uri(rel)}: not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None

    def read_text_ref(self, path: str) -> str:
        """Text of ``path``: relative to the root, unless it is absolute or a URI."""
        if path.startswith("/") or "://" in path:
            return DatasetFiles(path).read_text("")
        return self.read_text(path)

    def ref_uri(self, path: str) -> str:
        """The full name of ``path`` as :meth:`read_text_ref` resolves it, for messages."""
        return path if path.startswith("/") or "://" in path else self.uri(path)

    def read_names(self, path: str, option: str = "class_names_file") -> list[str]:
        """Non-blank lines of the text file at ``path`` (see :meth:`read_text_ref`),
        stripped; ``option`` is the adapter option that named it, for messages."""
        try:
            text = self.read_text_ref(path)
        except DatasetFileMissing as e:
            raise DatasetFileMissing(
                f"{e}: set the option {option} to the class-names file (one name per line, "
                "in label-id order)"
            ) from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise DatasetError(
                f"{self.ref_uri(path)} lists no names; write one class name per line, in "
                "label-id order"
            )
        return names

    def read_image(self, rel: str) -> np.ndarray:
        """RGB image as uint8 H×W×3 (grey, palette and alpha images are converted)."""
        return self._decode(rel, lambda img: np.array(img.convert("RGB"), dtype=np.uint8))

    def read_label(self, rel: str) -> np.ndarray:
        """Single-channel label PNG (palette indices or grey values) as int64 H×W."""

        def ids(img: Image.Image) -> np.ndarray:
            if img.mode not in LABEL_MODES:
                raise DatasetError(
                    f"{self.uri(rel)}: label maps must be single-channel PNGs of class ids "
                    f"(palette or greyscale), got mode {img.mode}; convert colour masks to ids"
                )
            return np.asarray(img, dtype=np.int64)

        return self._decode(rel, ids)

    def _decode(self, rel: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
        """``convert`` of the decoded image file ``rel``; a file PIL cannot decode is a
        :class:`DatasetError` that names it."""
        data = self.read_bytes(rel)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return convert(img)
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DatasetError(
                f"{self.uri(rel)}: not a readable image ({reason}); replace or re-export it"
            ) from None


# ----------------------------------------------------------------------------- segmentation


class SegmentationSample(NamedTuple):
    name: str
    image: str  # relative path
    label: str  # relative path


LABEL_MODES = ("P", "L", "I", "I;16")  # PIL modes of single-channel label maps
DEFAULT_ID_HINT = (
    "is it the right annotation variant (e.g. *_labelTrainIds, not *_labelIds)?"
)


def check_unique_names(names: Sequence[str], source: str) -> None:
    """Two classes with the same name get the same text embedding: refuse them."""
    seen: dict[str, int] = {}
    for line, name in enumerate(names, start=1):
        if name in seen:
            raise DatasetError(
                f"{source}: class {name!r} is listed twice (classes {seen[name]} and {line}); "
                "give every class a distinct name, e.g. 'crane (bird)' and 'crane (machine)'"
            )
        seen[name] = line


def reduce_zero_label_lut() -> np.ndarray:
    """mmseg's ``reduce_zero_label`` as a 256-entry lookup: 0 → 255, i → i−1, 255 → 255."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[255] = IGNORE_INDEX
    return lut


class SegmentationDataset(Sequence):
    """Images with dense labels; ``label_lut`` (256 entries) maps stored ids to class ids,
    stored ids in ``ignore_ids`` become :data:`IGNORE_INDEX`. A class id outside the class
    list is a :class:`DatasetError` that ends with ``id_hint`` (``{ids}``: the stored ids)."""

    task = "segmentation"

    def __init__(
        self,
        files: DatasetFiles,
        samples: Sequence[SegmentationSample],
        class_names: Sequence[str],
        has_background: bool,
        label_lut: np.ndarray | None = None,
        ignore_ids: Sequence[int] = (),
        id_hint: str = DEFAULT_ID_HINT,
    ) -> None:
        if not samples:
            raise DatasetError(f"{files.root}: the dataset has no samples")
        if not class_names:
            raise DatasetError(f"{files.root}: the class list is empty")
        if label_lut is not None and label_lut.shape != (256,):
            raise ValueError("label_lut must have 256 entries (one per stored 8-bit id)")
        self.files = files
        self.samples = list(samples)
        self.class_names = tuple(class_names)
        self.has_background = has_background
        self.label_lut = label_lut
        self.ignore_ids = tuple(ignore_ids)
        self.id_hint = id_hint

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:  # type: ignore[override]
        sample = self.samples[index]
        image = self.files.read_image(sample.image)
        stored = self.files.read_label(sample.label)
        if stored.shape != image.shape[:2]:
            raise DatasetError(
                f"{self.files.uri(sample.label)} is {stored.shape[1]}×{stored.shape[0]} but its "
                f"image {self.files.uri(sample.image)} is {image.shape[1]}×{image.shape[0]}; "
                "a label map must have its image's size"
            )
        label = stored
        if self.label_lut is not None:
            if stored.max(initial=0) > 255:
                raise DatasetError(
                    f"{self.files.uri(sample.label)}: stored ids exceed 255 (max "
                    f"{int(stored.max())}); this dataset's labels are 8-bit ids"
                )
            label = self.label_lut[stored]
        if self.ignore_ids:
            label = np.where(np.isin(stored, self.ignore_ids), IGNORE_INDEX, label)
        k = len(self.class_names)
        bad = ((label >= k) & (label != IGNORE_INDEX)) | (label < 0)
        if bad.any():
            ids = np.unique(stored[bad])[:10].tolist()
            ignored = sorted({IGNORE_INDEX, *self.ignore_ids})
            raise DatasetError(
                f"{self.files.uri(sample.label)}: ids {ids} are not classes of this {k}-class "
                f"dataset nor ignored ({ignored}); " + self.id_hint.format(ids=ids)
            )
        return image, label, sample.name


def split_file_samples(
    files: DatasetFiles,
    split_file: str,
    image_dir: str,
    image_suffix: str,
    label_dir: str,
    label_suffix: str,
) -> list[SegmentationSample]:
    """Samples named one per line in ``split_file`` (VOC / Pascal Context style)."""
    names = [line.strip() for line in files.read_text(split_file).splitlines() if line.strip()]
    samples = [
        SegmentationSample(n, f"{image_dir}/{n}{image_suffix}", f"{label_dir}/{n}{label_suffix}")
        for n in names
    ]
    _require_files(files, [s.image for s in samples], f"{image_dir}/*{image_suffix}")
    _require_files(files, [s.label for s in samples], f"{label_dir}/*{label_suffix}")
    return samples


def paired_dir_samples(
    files: DatasetFiles,
    image_dir: str,
    image_suffix: str,
    label_dir: str,
    label_suffix: str,
    nested: bool = False,
) -> list[SegmentationSample]:
    """Every image in ``image_dir`` (one level of sub-folders if ``nested``, as Cityscapes'
    cities) paired with the label of the same name; the name keeps the sub-folder."""
    pattern = "*/*" if nested else "*"
    images = files.glob(f"{image_dir}/{pattern}{image_suffix}")
    if not images:
        raise DatasetFileMissing(
            f"no {files.uri(f'{image_dir}/{pattern}{image_suffix}')} images found"
        )
    names = [p[len(image_dir) + 1 : -len(image_suffix)] for p in images]
    samples = [
        SegmentationSample(n, img, f"{label_dir}/{n}{label_suffix}")
        for n, img in zip(names, images)
    ]
    _require_files(files, [s.label for s in samples], f"{label_dir}/{pattern}{label_suffix}")
    return samples


def _require_files(files: DatasetFiles, wanted: Sequence[str], pattern: str) -> None:
    """One listing of ``pattern`` instead of one existence check per file (cheap on S3)."""
    present = set(files.glob(pattern))
    missing = [p for p in wanted if p not in present]
    if missing:
        raise DatasetFileMissing(
            f"{len(missing)} of {len(wanted)} expected files are missing, e.g. "
            f"{files.uri(missing[0])}; check the dataset root and that the annotations were "
            "prepared as the toolkit describes"
        )


# ----------------------------------------------------------------------------- classification


class ClassificationDataset(Sequence):
    """Images with one class each; ``samples`` are (relative path, class id)."""

    task = "classification"

    def __init__(
        self, files: DatasetFiles, samples: Sequence[tuple[str, int]], class_names: Sequence[str]
    ) -> None:
        if not samples:
            raise DatasetError(f"{files.root}: the dataset has no images")
        if not class_names:
            raise DatasetError(f"{files.root}: the class list is empty")
        self.files = files
        self.samples = list(samples)
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, str]:  # type: ignore[override]
        path, label = self.samples[index]
        return self.files.read_image(path), label, path


# ----------------------------------------------------------------------------- retrieval


class RetrievalDataset(Sequence):
    """Images with several captions each; ``samples`` are (relative path, captions)."""

    task = "retrieval"

    def __init__(self, files: DatasetFiles, samples: Sequence[tuple[str, list[str]]]) -> None:
        if not samples:
            raise DatasetError(f"{files.root}: the dataset has no images")
        empty = [p for p, caps in samples if not caps]
        if empty:
            raise DatasetError(
                f"{files.root}: {len(empty)} images have no caption (e.g. {empty[0]}); drop them"
            )
        self.files = files
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[str], str]:  # type: ignore[override]
        path, captions = self.samples[index]
        return self.files.read_image(path), captions, path

    @property
    def captions(self) -> list[str]:
        """All captions, image by image (T)."""
        return [c for _path, caps in self.samples for c in caps]

    @property
    def caption_image_index(self) -> np.ndarray:
        """Index of each caption's image (T, int64), aligned with :attr:`captions`."""
        return np.repeat(np.arange(len(self.samples)), [len(caps) for _p, caps in self.samples])

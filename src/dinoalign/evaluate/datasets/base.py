"""The evaluation-dataset registry, file access and the three dataset kinds.

Every adapter reads its published on-disk layout from a root that may be a local path or
any URI that :mod:`dinoalign.storage` opens (``s3://`` with credentials from the
environment, ``http(s)://``). Items are decoded lazily, one per ``dataset[i]``.

- :class:`SegmentationDataset` items: ``(image uint8 H×W×3, label int64 H×W, name)``,
  label 255 = ignore; attributes ``class_names``, ``has_background``.
- :class:`ClassificationDataset` items: ``(image uint8 H×W×3, label int, name)``.
- :class:`RetrievalDataset` items: ``(image uint8 H×W×3, captions list[str], name)``;
  ``captions`` / ``caption_image_index`` give all captions flat.
"""

from __future__ import annotations

import io
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

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
        raise FileNotFoundError(
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
        entries = self.fs.ls(self._full(rel), detail=True)
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        )

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open(self._full(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"missing file {self.uri(rel)}") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_text_ref(self, path: str) -> str:
        """Text of ``path``: relative to the root, unless it is absolute or a URI."""
        if path.startswith("/") or "://" in path:
            return DatasetFiles(path).read_text("")
        return self.read_text(path)

    def read_names(self, path: str) -> list[str]:
        """Non-blank lines of the text file at ``path`` (see :meth:`read_text_ref`), stripped."""
        names = [line.strip() for line in self.read_text_ref(path).splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{path} lists no names")
        return names

    def read_image(self, rel: str) -> np.ndarray:
        """RGB image as uint8 H×W×3 (grey, palette and alpha images are converted)."""
        with Image.open(io.BytesIO(self.read_bytes(rel))) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)

    def read_label(self, rel: str) -> np.ndarray:
        """Single-channel label PNG (palette indices or grey values) as int64 H×W."""
        with Image.open(io.BytesIO(self.read_bytes(rel))) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(
                    f"{self.uri(rel)}: label maps must be single-channel PNGs of class ids "
                    f"(palette or greyscale), got mode {img.mode}; convert colour masks to ids"
                )
            return np.asarray(img, dtype=np.int64)


# ----------------------------------------------------------------------------- segmentation


class SegmentationSample(NamedTuple):
    name: str
    image: str  # relative path
    label: str  # relative path


def reduce_zero_label_lut() -> np.ndarray:
    """mmseg's ``reduce_zero_label`` as a 256-entry lookup: 0 → 255, i → i−1, 255 → 255."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[255] = IGNORE_INDEX
    return lut


class SegmentationDataset(Sequence):
    """Images with dense labels; ``label_lut`` (256 entries) maps stored ids to class ids."""

    task = "segmentation"

    def __init__(
        self,
        files: DatasetFiles,
        samples: Sequence[SegmentationSample],
        class_names: Sequence[str],
        has_background: bool,
        label_lut: np.ndarray | None = None,
    ) -> None:
        if not samples:
            raise ValueError(f"{files.root}: the dataset has no samples")
        if label_lut is not None and label_lut.shape != (256,):
            raise ValueError("label_lut must have 256 entries (one per stored 8-bit id)")
        self.files = files
        self.samples = list(samples)
        self.class_names = tuple(class_names)
        self.has_background = has_background
        self.label_lut = label_lut

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:  # type: ignore[override]
        sample = self.samples[index]
        image = self.files.read_image(sample.image)
        label = self.files.read_label(sample.label)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{self.files.uri(sample.label)} is {label.shape[1]}×{label.shape[0]} but its "
                f"image is {image.shape[1]}×{image.shape[0]}"
            )
        if self.label_lut is not None:
            if label.max(initial=0) > 255:
                raise ValueError(f"{self.files.uri(sample.label)}: stored ids exceed 255")
            label = self.label_lut[label]
        k = len(self.class_names)
        bad = ((label >= k) & (label != IGNORE_INDEX)) | (label < 0)
        if bad.any():
            raise ValueError(
                f"{self.files.uri(sample.label)}: ids {np.unique(label[bad])[:10].tolist()} are "
                f"not classes of this {k}-class dataset nor {IGNORE_INDEX}; is it the right "
                "annotation variant (e.g. *_labelTrainIds, not *_labelIds)?"
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
        raise FileNotFoundError(
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
        raise FileNotFoundError(
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
            raise ValueError(f"{files.root}: the dataset has no images")
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
            raise ValueError(f"{files.root}: the dataset has no images")
        empty = [p for p, caps in samples if not caps]
        if empty:
            raise ValueError(f"{len(empty)} images have no caption (e.g. {empty[0]}); drop them")
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

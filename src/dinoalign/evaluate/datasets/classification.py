"""ImageNet-style classification folders: ``<root>/<class folder>/<image>``."""

from __future__ import annotations

from typing import Sequence

from dinoalign.errors import DatasetError, DatasetFileMissing
from dinoalign.evaluate.datasets.base import (
    EVAL_DATASETS,
    ClassificationDataset,
    DatasetFiles,
    check_unique_names,
)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@EVAL_DATASETS.register("imagenet_folder")
def imagenet_folder(
    root: str,
    class_names_file: str | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ClassificationDataset:
    """One sub-folder per class; class ids follow the sorted folder names (the standard
    ImageNet order for wnid folders).

    ``class_names_file`` (relative to ``root`` unless absolute or a URI) gives the text
    used for each class, one line per class folder, either ``<folder> <class name>`` or
    just ``<class name>`` in sorted folder order. Without it the folder names are used.
    """
    files = DatasetFiles(root)
    folders = files.list_dirs()
    if not folders:
        raise DatasetFileMissing(
            f"{files.root} has no class sub-folders (expected <root>/<class>/<image>)"
        )
    class_names = _class_names(files, folders, class_names_file) if class_names_file else folders
    if class_names_file:
        check_unique_names(class_names, files.ref_uri(class_names_file))
    class_id = {folder: i for i, folder in enumerate(folders)}
    wanted = tuple(e.lower() for e in extensions)
    samples = [
        (path, class_id[path.split("/", 1)[0]])
        for path in files.glob("*/*")
        if path.lower().endswith(wanted) and path.split("/", 1)[0] in class_id
    ]
    if not samples:
        raise DatasetFileMissing(
            f"no images with extensions {list(wanted)} under {files.root}/<class>/"
        )
    return ClassificationDataset(files, samples, class_names)


def _class_names(files: DatasetFiles, folders: list[str], path: str) -> list[str]:
    lines = files.read_names(path)
    pairs = [line.split(None, 1) for line in lines]
    if all(len(p) == 2 and p[0] in folders for p in pairs):
        by_folder = {folder: name.strip() for folder, name in pairs}
        if len(by_folder) != len(pairs):
            twice = sorted({f for f, _ in pairs if sum(g == f for g, _ in pairs) > 1})
            raise DatasetError(f"{files.ref_uri(path)} names folders {twice[:5]} more than once")
        missing = [f for f in folders if f not in by_folder]
        if missing:
            raise DatasetError(
                f"{files.ref_uri(path)} names no class for folders {missing[:5]}; add a "
                "'<folder> <name>' line for each"
            )
        return [by_folder[f] for f in folders]
    if len(lines) != len(folders):
        raise DatasetError(
            f"{files.ref_uri(path)} has {len(lines)} lines but {files.root} has "
            f"{len(folders)} class folders; "
            "give one name per folder in sorted folder order, or '<folder> <name>' lines"
        )
    return lines

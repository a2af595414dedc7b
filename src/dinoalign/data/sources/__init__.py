"""Data sources: readers that turn an external dataset layout into manifest items.

A source is a factory registered in :data:`SOURCES`::

    @SOURCES.register("coco")
    def coco_source(cfg: CocoSourceConfig, workdir: Path) -> Iterator[PairRecord | Reject]

``cfg`` is the source's own frozen dataclass; ``workdir`` is a local folder where a source
may stage files the manifest points to (COCO semantic masks, images extracted from tar
shards). Each input sample ends up either as one ``PairRecord`` (an image with all of its
captions, ``uid = make_uid(cfg.name, key)``) or as ``Reject`` items that say why not, so
counts always add up. Sources never decode images: the prepare stage validates them with
:mod:`dinoalign.data.images`.

Registered: ``synthetic`` (:mod:`.synthetic`, the demo world), ``coco`` (:mod:`.coco`),
``pairs`` (:mod:`.pairs`), ``webdataset`` (:mod:`.webdataset`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dinoalign.data.config import check_name
from dinoalign.data.schema import PairRecord, Reject
from dinoalign.registry import Registry
from dinoalign.storage import is_remote

SourceItem = PairRecord | Reject
SourceFactory = Callable[[Any, Path], Iterator[SourceItem]]

SOURCES: Registry[SourceFactory] = Registry("data source")

# Sources run inside the prepare stage; their rejects carry its name.
STAGE = "prepare"


def clean_caption(value: object) -> str | None:
    """A caption with whitespace runs collapsed to one space; None when missing or blank
    (None, NaN from a table, or only whitespace)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).split())
    return text or None


def join_uri(base: str, name: str) -> str:
    """``name`` resolved against the folder ``base``: URLs and absolute paths are kept,
    relative names are appended (``/`` for URLs, the OS separator for local paths)."""
    if "://" in name or os.path.isabs(name):
        return name
    if "://" in base:
        return f"{base.rstrip('/')}/{name}"
    return os.path.join(base, name)


def parent_uri(uri: str) -> str:
    """The folder holding ``uri`` (a local path or a URL)."""
    if is_remote(uri) or uri.startswith("file://"):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(uri) or "."


# Importing the modules registers their sources; they import the names defined above.
from dinoalign.data.sources import coco, pairs, synthetic, webdataset  # noqa: E402


def build_source(data: Any, workdir: Path) -> Iterator[SourceItem]:
    """The items of the source ``data.source`` names, configured by its own section of
    ``data`` (``data.coco``, ``data.pairs``...)."""
    factory = SOURCES.get(data.source)
    return factory(getattr(data, data.source), Path(workdir))

__all__ = [
    "SOURCES",
    "STAGE",
    "SourceFactory",
    "SourceItem",
    "check_name",
    "clean_caption",
    "coco",
    "join_uri",
    "build_source",
    "pairs",
    "parent_uri",
    "synthetic",
    "webdataset",
]

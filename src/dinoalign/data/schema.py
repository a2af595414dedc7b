"""Data contracts: sample identity, the pairs manifest, and rejects.

``uid`` = 128-bit hex of BLAKE2b over (source name, source key); ``caption_id`` = the
same hash over (uid, caption index). Everything downstream is keyed by these, never by
row order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable

import pyarrow as pa


def make_uid(source: str, key: str) -> str:
    """Stable 32-hex-char id of one sample of ``source`` (e.g. COCO image id, file path)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source.encode("utf-8"))
    h.update(b"\x00")
    h.update(str(key).encode("utf-8"))
    return h.hexdigest()


def make_caption_id(uid: str, index: int) -> str:
    """Stable id of caption ``index`` of sample ``uid``."""
    return make_uid(uid, f"caption:{index}")


@dataclasses.dataclass
class PairRecord:
    """One image with its captions; ``label``: class name for single-object images."""

    uid: str
    image_uri: str
    captions: list[str]
    split: str
    source: str
    label: str | None = None
    mask_uri: str | None = None


@dataclasses.dataclass
class Reject:
    """An input that did not make it through a stage, with a machine-readable reason."""

    uid: str
    stage: str
    reason: str
    detail: str = ""
    key: str = ""


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("mask_uri", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("key", pa.string()),
    ]
)


def records_to_table(records: Iterable[PairRecord]) -> pa.Table:
    rows = [dataclasses.asdict(r) for r in records]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def rejects_to_table(rejects: Iterable[Reject]) -> pa.Table:
    rows = [dataclasses.asdict(r) for r in rejects]
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)

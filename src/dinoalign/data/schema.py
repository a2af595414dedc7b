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


# The curate stage's uids.parquet schema metadata: the digest (FeatureStore.digest) of
# the features the curation was computed from; align refuses a curation of other features.
CURATED_FEATURES_KEY = "dinoalign.features_digest"


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
    # sha256 (hex) of the image bytes prepare read when it validated the image; None where
    # it did not read them (prepare.validate_images false): the embed stage's content key
    image_sha256: str | None = None


# Why a source or the prepare stage drops an input, besides the image decoder's reasons
# (dinoalign.data.images.REJECT_REASONS, kept beside the decoder). A Reject with a reason
# in neither is refused (a bug), and tests/test_hostile_corpus.py makes a hostile input
# for each, so a new reason needs both an entry here and a corpus item.
SOURCE_REJECT_REASONS: dict[str, str] = {
    # pairs tables (dinoalign.data.sources.pairs)
    "missing_image": "a pairs row whose image cell is empty",
    "missing_key": "a pairs row whose key cell is empty",
    "empty_caption": "a caption that is missing or blank (pairs row, COCO annotation, webdataset sample)",
    "conflicting_row": "a pairs row whose image or split differs from the first row of its key",
    "outside_allowed_roots": "an image that resolves outside data.allowed_roots (never read)",
    "stray_quote": "a CSV/TSV line whose quote opens a field that runs over lines that read as rows, "
                   "or never closes: the line is dropped, the lines after it are read on their own",
    "too_many_fields": "a CSV/TSV line with more fields than the header",
    "malformed_row": "a CSV/TSV line the CSV reader refuses (a field over its 128 KiB limit)",
    # webdataset shards (dinoalign.data.sources.webdataset)
    "no_image": "a webdataset sample without an image member",
    "no_caption": "a webdataset sample without a txt member or a json caption",
    "bad_caption": "a webdataset txt member that is not UTF-8 or is over 1 MiB",
    "bad_json": "a webdataset json member that does not parse, is no object or is over 1 MiB",
    "duplicate_key": "a webdataset sample whose key an earlier sample used",
    "shard_read_error": "a webdataset shard that cannot be opened or read",
    "corrupt_shard": "a webdataset shard that is not a whole tar (its samples are dropped)",
    # COCO (dinoalign.data.sources.coco)
    "unknown_image_id": "a COCO caption whose image_id is not in 'images'",
    "no_captions": "a COCO image without a usable caption",
    "bad_annotation": "a COCO instance annotation that cannot be rasterised",
    # the prepare stage (dinoalign.data.prepare)
    "duplicate_uid": "a record whose uid an earlier record has",
}


def reject_reasons() -> dict[str, str]:
    """Every reason a :class:`Reject` may carry, with what it means."""
    from dinoalign.data.images import REJECT_REASONS  # numpy/PIL: only once a Reject is made

    return {**REJECT_REASONS, **SOURCE_REJECT_REASONS}


@dataclasses.dataclass
class Reject:
    """An input that did not make it through a stage, with a machine-readable reason (one
    of :func:`reject_reasons`)."""

    uid: str
    stage: str
    reason: str
    detail: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if self.reason not in SOURCE_REJECT_REASONS and self.reason not in reject_reasons():
            raise ValueError(f"unknown reject reason {self.reason!r}: add it to "
                             "dinoalign.data.schema.SOURCE_REJECT_REASONS (and a hostile-corpus item)")


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("mask_uri", pa.string()),
        pa.field("image_sha256", pa.string()),
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

"""The feature store written by ``embed`` and read by curate, align and evaluate.

Layout under ``paths.features`` (a local path or ``s3://bucket/prefix``)::

    images/part-<16 hex>.parquet    uid, content_sha256 (of the image bytes) + image feature
                                    columns (fixed-size float lists); the chunk's rejects
                                    (each with the content_sha256 planned) in the parquet metadata
    captions/part-<16 hex>.parquet  caption_id, uid, caption, content_sha256 (of the caption's
                                    UTF-8 text), caption_index + text_<encoder> columns
    spec.json                       the feature spec; written first
    rejects.parquet                 uid, stage, reason, detail, key (from the shards' metadata)
    manifest.json                   spec, shard list with row counts, sizes and sha256, counts;
                                    written last

A shard's name is the sha256 of the (key, content hash) pairs it holds
(:func:`dinoalign.embed.engine.shard_name`), so rows carry no order across shards: readers
sort (:func:`load_image_features` by uid). A row is live while its content hash is the one
its key has in the pairs manifest; the embed stage retires the others (see
:mod:`dinoalign.embed.engine`).

``spec["preprocessing"]`` records how the pixels reached each image tower: ``backbone``
(mean, std, interpolation, crop_pct, crop_mode, input_size, from the timm model's data
config) and ``clip`` (mean, std, interpolation, resize_mode, input_size, from open_clip's
preprocess config), or null without ``clip_image``. Readers that put these features next
to features they compute themselves call :func:`check_preprocessing`.

A shard becomes visible only when complete (temp name + rename locally; S3 objects
appear atomically), so a killed run leaves only whole shards and a re-run skips their
keys and their rejects. Vectors are stored flat (``H×D`` as ``H*D``); ``manifest.json`` keeps the shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dinoalign.data.schema import REJECTS_SCHEMA
from dinoalign.errors import DataFileMissing, PreprocessingMismatch
from dinoalign.storage import fs_for, write_atomic

KINDS = ("images", "captions")
# part-<16 hex> (named by content); part-<5+ digits>: stores written before dinoalign 0.9
_PART = re.compile(r"^part-([0-9a-f]{16}|\d{5,})\.parquet$")
REJECTS_KEY = b"dinoalign.rejects"  # a shard's rejects, JSON, in its parquet metadata
# sha256 (hex) of what a row was computed from: the image bytes / the caption's UTF-8 text
CONTENT_COLUMN = "content_sha256"


@dataclass(frozen=True)
class ShardReport:
    """What a worker tells the driver about a shard it made: a few hundred bytes, whatever
    the shard's size."""

    kind: str
    name: str
    rows: int
    bytes: int
    sha256: str
    rejects: list[dict[str, str]]

    @classmethod
    def of(cls, kind: str, name: str, data: bytes, rows: int, rejects: list[dict[str, str]]) -> ShardReport:
        return cls(kind, name, rows, len(data), hashlib.sha256(data).hexdigest(), list(rejects))

    def as_row(self) -> dict[str, Any]:
        return {"kind": self.kind, "shard": self.name, "rows": self.rows, "bytes": self.bytes,
                "sha256": self.sha256, "rejects": json.dumps(self.rejects)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ShardReport:
        return cls(str(row["kind"]), str(row["shard"]), int(row["rows"]), int(row["bytes"]),
                   str(row["sha256"]), json.loads(row["rejects"]))

    def entry(self) -> dict[str, Any]:
        """The manifest entry."""
        return {"kind": self.kind, "file": f"{self.kind}/{self.name}", "rows": self.rows, "bytes": self.bytes,
                "sha256": self.sha256}


@dataclass
class ShardContent:
    """What one complete shard holds: its (key, content hash) rows, in stored order, and
    its rejects (each with the ``content_sha256`` it was planned with). ``hashed``: False
    for a shard written before content hashes (no ``content_sha256`` column)."""

    name: str
    rows: list[tuple[str, str]]
    rejects: list[dict[str, str]]
    hashed: bool


@dataclass
class StoreState:
    """The keys in complete shards of one kind and the rejects recorded beside them."""

    keys: set[str]
    rejects: list[dict[str, str]]


def vector_column(x: np.ndarray, dtype: Any = pa.float32()) -> pa.Array:
    """N×(shape...) array -> FixedSizeList column of the flattened trailing dims."""
    x = np.ascontiguousarray(x)
    width = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    values = pa.array(x.reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(values, width)


def column_to_numpy(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """FixedSizeList column -> N×shape numpy (zero-copy where arrow allows)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape((len(col), *shape))


@dataclass
class FeatureStore:
    """Shard-level access to one feature folder (local or s3://)."""

    uri: str
    spec: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.root = fs_for(self.uri)
        self.local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol

    # ---------------------------------------------------------------- paths & listing
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def shards(self, kind: str) -> list[str]:
        """Complete shard file names of ``kind`` (temp files excluded), sorted."""
        return list(self.listing(kind))

    def listing(self, kind: str) -> dict[str, int]:
        """Complete shard name -> size in bytes."""
        try:
            infos = self.fs.ls(self.path(kind), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for info in infos:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if _PART.match(name):
                out[name] = int(info.get("size") or 0)
        return dict(sorted(out.items()))

    def keys(self, kind: str, key: str) -> set[str]:
        """All keys (``uid`` / ``caption_id``) present in complete shards."""
        return self.scan(kind, key).keys

    def scan(self, kind: str, key: str) -> StoreState:
        """The keys in complete shards of ``kind`` and every reject recorded with them (in
        the shards' metadata, and in ``rejects.parquet`` for images)."""
        keys: set[str] = set()
        rejects: list[dict[str, str]] = []
        for name in self.shards(kind):
            with self.fs.open(self.path(kind, name), "rb") as f:
                parquet = pq.ParquetFile(f)
                keys.update(parquet.read(columns=[key]).column(key).to_pylist())
                meta = parquet.schema_arrow.metadata or {}
                rejects.extend(json.loads(meta.get(REJECTS_KEY, b"[]")))
        if kind == "images":
            rejects.extend(self.read_rejects().to_pylist())
        return StoreState(keys, rejects)

    def contents(self, kind: str, key: str) -> list[ShardContent]:
        """Every complete shard of ``kind`` with its (``key``, ``content_sha256``) rows and
        its rejects (from its metadata only: ``rejects.parquet`` is derived from them)."""
        out = []
        for name in self.shards(kind):
            with self.fs.open(self.path(kind, name), "rb") as f:
                parquet = pq.ParquetFile(f)
                hashed = CONTENT_COLUMN in parquet.schema_arrow.names
                table = parquet.read(columns=[key, CONTENT_COLUMN] if hashed else [key])
                keys = table.column(key).to_pylist()
                hashes = table.column(CONTENT_COLUMN).to_pylist() if hashed else [""] * len(keys)
                meta = parquet.schema_arrow.metadata or {}
                rejects = json.loads(meta.get(REJECTS_KEY, b"[]"))
            out.append(ShardContent(name, list(zip(keys, hashes)), rejects, hashed))
        return out

    def delete_shard(self, kind: str, name: str) -> None:
        if not _PART.match(name):
            raise ValueError(f"{name!r} is not a shard name (part-<16 hex>.parquet)")
        self.fs.rm(self.path(kind, name))

    # ---------------------------------------------------------------- reading & writing
    def read_table(self, kind: str, name: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(kind, name), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_all(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """Every complete shard of ``kind``, concatenated in shard-name order (no row order:
        sort by the key)."""
        tables = [self.read_table(kind, n, columns) for n in self.shards(kind)]
        if not tables:
            raise DataFileMissing(f"no {kind} shards under {self.uri}: run the embed stage first")
        return pa.concat_tables(tables)

    @staticmethod
    def encode_shard(table: pa.Table, rejects: list[dict[str, str]]) -> bytes:
        """A shard's bytes: ``table`` as zstd parquet, ``rejects`` (JSON) in its metadata."""
        table = table.replace_schema_metadata({REJECTS_KEY: json.dumps(rejects, sort_keys=True).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue().to_pybytes()

    def put_shard(self, kind: str, name: str, data: bytes) -> None:
        """Write one complete shard atomically (the same name twice: the same bytes, since a
        name is its keys' hash and the features are a function of the spec)."""
        if not _PART.match(name):
            raise ValueError(f"{name!r} is not a shard name (part-<16 hex>.parquet)")
        self._atomic_write(self.path(kind, name), data)

    def _atomic_write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            write_atomic(path, data, fsync=True)
        else:  # an S3 PUT is atomic: the object appears only when complete
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def read_rejects(self) -> pa.Table:
        try:
            with self.fs.open(self.path("rejects.parquet"), "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError:
            return REJECTS_SCHEMA.empty_table()

    def write_rejects(self, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table.cast(REJECTS_SCHEMA), sink)
        self._atomic_write(self.path("rejects.parquet"), sink.getvalue().to_pybytes())

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        self._atomic_write(self.path(name), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json("manifest.json")

    def digest(self) -> str:
        """sha256 (16 hex) of the spec hash and every shard's sha256 in the manifest: the
        features' content without reading a shard (the MLflow dataset digest)."""
        manifest = self.read_manifest()
        if manifest is None:
            raise DataFileMissing(f"{self.uri}/manifest.json is missing: run the embed stage first (dvc repro embed)")
        h = hashlib.sha256(manifest["spec"]["spec_hash"].encode())
        for entry in sorted(manifest["shards"], key=lambda e: e["file"]):
            h.update(entry["sha256"].encode())
        return h.hexdigest()[:16]

    def clear(self) -> None:
        """Remove every shard, rejects and the manifest (a changed feature spec)."""
        for kind in KINDS:
            for name in self.shards(kind):
                self.fs.rm(self.path(kind, name))
        for name in ("rejects.parquet", "manifest.json", "spec.json"):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))

    def shard_entries(self, reports: Mapping[str, ShardReport] | None = None,
                      previous: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Manifest entries for every complete shard in storage (listed, not planned): the
        row count and sha256 from this run's ``reports`` or the ``previous`` manifest when
        the stored size is theirs, else read from the stored bytes."""
        reports = reports or {}
        known = {e["file"]: e for e in (previous or {}).get("shards", []) if "bytes" in e}
        out = []
        for kind in KINDS:
            for name, size in self.listing(kind).items():
                file = f"{kind}/{name}"
                report = reports.get(name)
                if report is not None and report.kind == kind and report.bytes == size:
                    out.append(report.entry())
                elif file in known and known[file]["bytes"] == size:
                    out.append(dict(known[file]))
                else:
                    with self.fs.open(self.path(kind, name), "rb") as f:
                        data = f.read()
                    rows = pq.read_metadata(pa.BufferReader(data)).num_rows
                    out.append({"kind": kind, "file": file, "rows": rows, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()})
        return out


def load_image_features(uri: str, columns: Iterable[str], uids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Image feature columns as numpy arrays, shaped per the manifest, rows sorted by uid.

    Returns ``{"uid": N-array of str, col: N×shape}``; ``uids`` keeps only those rows.
    """
    store = FeatureStore(uri)
    manifest = store.read_manifest()
    if manifest is None:
        raise DataFileMissing(f"{uri}/manifest.json is missing: the embed stage has not finished")
    columns = list(columns)
    table = store.read_all("images", ["uid", *columns])
    table = table.sort_by("uid")
    if uids is not None:
        keep = pa.array(sorted(set(uids)))
        table = table.filter(pc.is_in(table.column("uid"), value_set=keep))
    shapes = manifest["spec"]["columns"]
    out: dict[str, np.ndarray] = {"uid": np.asarray(table.column("uid").to_pylist())}
    for c in columns:
        out[c] = column_to_numpy(table.column(c), tuple(shapes[c]))
    return out


# recorded for information (the model's pretraining size), not how these pixels were made
_NOT_COMPARED = ("config_input_size",)


def _pixels_part(preprocessing: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if preprocessing is None:
        return None
    # a JSON round trip: tuples and lists, ints and floats compare as the manifest stores them
    as_stored = json.loads(json.dumps(dict(preprocessing)))
    return {k: v for k, v in as_stored.items() if k not in _NOT_COMPARED}


def describe_preprocessing(preprocessing: Mapping[str, Any] | None) -> str:
    """One line for an error message, e.g. ``mean [0.485, 0.456, 0.406] std [0.229, 0.224,
    0.225] bicubic crop_mode center crop_pct 1.0 3×112×112``."""
    p = _pixels_part(preprocessing)
    if p is None:
        return "unrecorded (embedded before dinoalign recorded preprocessing)"
    size = "×".join(str(v) for v in p.pop("input_size", []))
    parts = [f"mean {p.pop('mean', None)} std {p.pop('std', None)}", str(p.pop("interpolation", None))]
    parts += [f"{k} {v}" for k, v in sorted(p.items())]
    return " ".join([*parts, size])


def recorded_preprocessing(spec: Mapping[str, Any], tower: str) -> dict[str, Any] | None:
    """The preprocessing of ``tower`` (``backbone`` or ``clip``) in a features spec; None
    for features embedded before it was recorded (or without that tower)."""
    return (spec.get("preprocessing") or {}).get(tower)


def check_preprocessing(
    spec: Mapping[str, Any], tower: str, current: Mapping[str, Any], *, features: str, user: str
) -> None:
    """Refuse to mix features: raise PreprocessingMismatch (a ValueError) unless the
    ``tower`` preprocessing recorded in the features' ``spec`` (at ``features``) is
    ``current``, what ``user`` (e.g. "this evaluation's backbone") applies to the images it
    embeds itself. The one-line message names both."""
    recorded = recorded_preprocessing(spec, tower)
    if _pixels_part(recorded) != _pixels_part(current):
        raise PreprocessingMismatch(
            f"{tower} preprocessing mismatch: the features at {features} were embedded with "
            f"[{describe_preprocessing(recorded)}] but {user} uses "
            f"[{describe_preprocessing(current)}]; features made with different preprocessing "
            "cannot be mixed: re-run embed with these params (dvc repro embed) or use the "
            "params the features were made with"
        )

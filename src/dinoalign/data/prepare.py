"""The ``prepare`` stage's logic: a configured source -> validated pairs manifest (the
stage itself: :mod:`dinoalign.stages.prepare`).

Output layout (``paths.pairs``, a DVC out)::

    manifest/part-00000.parquet ...   MANIFEST_SCHEMA rows, sorted by uid
    rejects.parquet                   REJECTS_SCHEMA rows (uid, stage, reason, detail, key)
    summary.json                      counts per split, rejects per reason, shard list (written last)

Every uid the source yields ends in exactly one of the manifest or the rejects table.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dinoalign.config import DataConfig
from dinoalign.data.images import (
    ImageRejected,
    image_limits,
    probe_image_sha256,
)
from dinoalign.data.incoming import read_incoming
from dinoalign.data.schema import (
    MANIFEST_SCHEMA,
    PairRecord,
    Reject,
    records_to_table,
    rejects_to_table,
)
from dinoalign.data.sources import build_source
from dinoalign.errors import DataError, DataFileMissing
from dinoalign.storage import atomic_path, remove_temporaries, write_atomic

STAGE = "prepare"


def validate_records(
    records: Iterable[PairRecord], *, max_pixels: int, min_side: int, workers: int = 8, **limits: Any,
) -> Iterator[PairRecord | Reject]:
    """Decode every image once (threads: decoding is I/O + C code) and turn failures into
    rejects with the decoder's reason code; a valid record gets ``image_sha256``, the sha256
    of the bytes validated. Order of the output is not significant. Each
    read is bounded (``limits``: :func:`probe_image_sha256`'s other bounds, ``read_timeout_s``,
    ``max_bytes``, ...), so a stalled or endless URL is a ``read_timeout`` / ``too_large``
    reject, not a hung or killed stage; a transient failure is tried ``read_attempts`` times."""
    limits = dict(max_pixels=max_pixels, min_side=min_side, **limits)

    def check(rec: PairRecord) -> PairRecord | Reject:
        try:
            # the hash of the bytes validated: embed's content key (changed pixels re-embed)
            rec.image_sha256 = probe_image_sha256(rec.image_uri, **limits)[1]
            return rec
        except ImageRejected as e:
            return Reject(uid=rec.uid, stage=STAGE, reason=e.reason, detail=e.detail, key=rec.image_uri)

    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(check, records, chunksize=16)


def _relative_to_root(uri: str | None, root: Path) -> str | None:
    """Paths inside the repo are stored repo-relative so a fresh clone + ``dvc pull`` works."""
    if uri is None or "://" in uri:
        return uri
    p = Path(uri)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return uri
    return uri


def write_manifest(
    items: Iterable[PairRecord | Reject], out_dir: Path, shard_size: int, root: Path
) -> dict[str, Any]:
    """Split ``items`` into the manifest shards and the rejects table; return the summary."""
    records: dict[str, PairRecord] = {}
    rejects: list[Reject] = []
    for item in items:
        if isinstance(item, Reject):
            rejects.append(item)
        elif item.uid in records:
            rejects.append(Reject(item.uid, STAGE, "duplicate_uid", "same uid seen earlier", item.image_uri))
        else:
            item.image_uri = _relative_to_root(item.image_uri, root) or item.image_uri
            item.mask_uri = _relative_to_root(item.mask_uri, root)
            records[item.uid] = item

    manifest_dir = out_dir / "manifest"
    manifest_dir.mkdir(parents=True, exist_ok=True)
    for old in manifest_dir.glob("*.parquet"):
        old.unlink()
    ordered = [records[u] for u in sorted(records)]
    chunks = [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)] or [[]]
    shards = []
    for i, chunk in enumerate(chunks):
        name = f"part-{i:05d}.parquet"
        _atomic_parquet(records_to_table(chunk), manifest_dir / name)
        shards.append({"file": f"manifest/{name}", "rows": len(chunk)})
    _atomic_parquet(rejects_to_table(sorted(rejects, key=lambda r: (r.uid, r.reason))), out_dir / "rejects.parquet")

    splits = collections.Counter(r.split for r in ordered)
    summary = {
        "n_pairs": len(ordered),
        "n_captions": sum(len(r.captions) for r in ordered),
        "n_rejects": len(rejects),
        "splits": dict(sorted(splits.items())),
        "captions_per_split": {
            s: sum(len(r.captions) for r in ordered if r.split == s) for s in sorted(splits)
        },
        "labelled": sum(r.label is not None for r in ordered),
        "with_mask": sum(r.mask_uri is not None for r in ordered),
        "rejects_by_reason": dict(sorted(collections.Counter(r.reason for r in rejects).items())),
        "sources": sorted({r.source for r in ordered}),
        "shards": shards,
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def prepare_pairs(
    data: DataConfig, shard_size: int, validate_images: bool, out_dir: Path, root: Path,
    incoming: Path | None = None,
) -> dict[str, Any]:
    """Read the source ``data.source`` (plus the pairs ``dinoalign retrain`` appended in
    the folder ``incoming``), validate the images when asked, write the manifest, rejects
    and summary to ``out_dir``; return the summary. ``root``: the checkout, against which
    the manifest records relative image paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir)  # of a killed run: what it wrote whole is kept
    items = build_source(data, out_dir)
    if incoming is not None:
        items = itertools.chain(items, read_incoming(incoming))
    if validate_images:
        items = _validate_stream(items, data)
    return write_manifest(items, out_dir, shard_size, root)


def _validate_stream(items: Iterable[PairRecord | Reject], data: DataConfig) -> Iterator[PairRecord | Reject]:
    pending: list[PairRecord] = []
    for item in items:
        if isinstance(item, Reject):
            yield item
        else:
            pending.append(item)
    yield from validate_records(pending, **image_limits(data))


def _atomic_parquet(table: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def manifest_digest(pairs_dir: str | Path) -> str:
    """sha256 (16 hex) of the manifest shards' bytes in order: the pairs as the later
    stages read them (the MLflow dataset digest of ``paths.pairs``)."""
    pairs_dir = Path(pairs_dir)
    summary = json.loads((pairs_dir / "summary.json").read_text())
    h = hashlib.sha256()
    for shard in summary["shards"]:
        h.update((pairs_dir / shard["file"]).read_bytes())
    return h.hexdigest()[:16]


def split_digest(manifest: Any, split: str) -> str:
    """sha256 (16 hex) of the sorted uids of ``split`` in a pairs manifest table: the
    evaluation set's fingerprint (its MLflow dataset digest, retrain's ``eval_set``)."""
    uids = sorted(u for u, s in zip(manifest.column("uid").to_pylist(), manifest.column("split").to_pylist())
                  if s == split)
    if not uids:
        raise DataError(f"the pairs manifest has no {split!r} split to evaluate on")
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]


def read_pairs(pairs_dir: str | Path) -> Any:
    """All manifest shards of a prepare output as one pyarrow Table (sorted by uid)."""
    pairs_dir = Path(pairs_dir)
    if not (pairs_dir / "summary.json").is_file():
        raise DataFileMissing(
            f"{pairs_dir}/summary.json is missing: run the prepare stage first (dvc repro prepare)"
        )
    summary = json.loads((pairs_dir / "summary.json").read_text())
    tables = [pq.read_table(pairs_dir / s["file"]) for s in summary["shards"]]
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()

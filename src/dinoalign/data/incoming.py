"""Caption data appended for retraining (``dinoalign retrain``): a DVC-tracked folder
(``paths.incoming``, default ``incoming/pairs``, versioned by ``incoming/pairs.dvc``) whose
pairs the prepare stage adds to whatever ``data.source`` yields.

Layout of the folder::

    pairs.parquet     key, image (relative to the folder), captions (list), split, batch
    images/           the appended images, copied in (``<uid>.<ext>``)
    rejects.parquet   rows of new data that did not become a pair (REJECTS_SCHEMA, stage "retrain")

The ledger of batches (id, source URI, fingerprint, counts, status) is retraining's own
state and lives beside its decisions (``paths.decisions``), outside this folder, so
that marking a batch decided does not change the data the pipeline depends on.

Identity: a new pair's ``key`` is the uid it has in its own source (a pairs table or
webdataset shards), so ``uid = make_uid("incoming", key)`` is stable across retrains and a
pair seen before is never appended twice. A key seen before whose captions or image bytes
changed is an edit: its row and image are replaced in place (counted ``updated``), so the
prepare stage gives the uid its new content hash and embed re-embeds exactly it (features
are keyed by content: dinoalign.embed). Appended pairs always join the ``train`` split:
the evaluation split stays fixed, so a candidate and the champion are compared on the
same images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dinoalign.data.images import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S
from dinoalign.data.schema import REJECTS_SCHEMA, PairRecord, Reject, make_uid, rejects_to_table
from dinoalign.data.sources import parent_uri
from dinoalign.data.sources.pairs import TABLE_FORMATS, PairsSourceConfig, pairs_source
from dinoalign.data.sources.webdataset import WebDatasetSourceConfig, webdataset_source
from dinoalign.errors import DataError, DataFileMissing
from dinoalign.storage import ReadTimedOut, ReadTooLarge, atomic_path, fs_for, read_bytes, write_atomic

SOURCE = "incoming"
STAGE = "retrain"
TABLE, REJECTS, IMAGES = "pairs.parquet", "rejects.parquet", "images"
SPLIT = "train"
TABLE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.string(), nullable=False),
    pa.field("captions", pa.list_(pa.string()), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("batch", pa.string(), nullable=False),
])
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


# ----------------------------------------------------------------------------- prepare side
def read_incoming(folder: Path) -> Iterator[PairRecord | Reject]:
    """The appended pairs as manifest items (none when nothing was ever appended).

    Raises FileNotFoundError when ``<folder>.dvc`` exists but the data is not checked
    out: building the manifest without it would silently drop the appended pairs."""
    table = folder / TABLE
    if not table.exists():
        pointer = folder.with_name(folder.name + ".dvc")
        if pointer.exists():
            raise DataFileMissing(f"{pointer} tracks appended pairs but {folder}/{TABLE} is not checked out: "
                                    f"run `dvc pull {pointer}` first")
        return iter(())
    cfg = PairsSourceConfig(path=str(table), image_column="image", caption_column="captions", key_column="key",
                            split_column="split", name=SOURCE, allowed_roots=[str(folder)])  # copied in here
    return pairs_source(cfg, folder)


# ----------------------------------------------------------------------------- new data
def is_table(uri: str) -> bool:
    return any(uri.lower().endswith(s) for s in TABLE_FORMATS)


def fingerprint(uri: str) -> str:
    """sha256 over what is at ``uri`` (a file, or every file under a folder/prefix): path,
    size and ETag or mtime, so a drop location that has not changed is recognised
    without reading it."""
    fs, path = fs_for(uri)
    if not fs.exists(path):
        raise DataFileMissing(f"no new data at {uri}")
    files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    h = hashlib.sha256()
    for name in sorted(files):
        info = files[name]
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        h.update(f"{name}\0{info.get('size')}\0{stamp}\n".encode())
    return h.hexdigest()


def new_data_items(uri: str, workdir: Path, image_column: str = "image", caption_column: str = "caption",
                   key_column: str | None = None, allowed_roots: list[str] | None = None
                   ) -> Iterator[PairRecord | Reject]:
    """The pairs at ``uri``: a csv/tsv/parquet table (the ``pairs`` source), or webdataset
    shards (one ``.tar`` or a folder/prefix of them; images extracted under ``workdir``).

    New data is untrusted: a table's images must resolve under ``allowed_roots``, by
    default the table's own folder (a ``../`` or ``file://`` row elsewhere is the reject
    ``outside_allowed_roots``, never read)."""
    if is_table(uri):
        roots = list(allowed_roots) if allowed_roots is not None else [parent_uri(uri)]
        cfg = PairsSourceConfig(path=uri, image_column=image_column, caption_column=caption_column,
                                key_column=key_column, name="new", allowed_roots=roots)
        return pairs_source(cfg, workdir)
    fs, path = fs_for(uri)
    if fs.isdir(path):
        shards = sorted(p for p in fs.find(path) if p.lower().endswith(_TAR_SUFFIXES))
        if not shards:
            raise DataFileMissing(f"{uri} holds no pairs table and no .tar shards")
        scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
        urls = tuple(f"{scheme}{p}" if scheme else p for p in shards)
    elif uri.lower().endswith(_TAR_SUFFIXES):
        urls = (uri,)
    else:
        raise DataError(f"{uri}: expected a pairs table ({'/'.join(TABLE_FORMATS)}), a webdataset .tar "
                         "or a folder of .tar shards")
    return webdataset_source(WebDatasetSourceConfig(urls=urls, split=SPLIT, name="new"), workdir)


# ----------------------------------------------------------------------------- the folder
def existing_rows(folder: Path) -> dict[str, dict[str, Any]]:
    """The appended rows by key (empty when nothing was appended)."""
    table = folder / TABLE
    return {r["key"]: r for r in pq.read_table(table).cast(TABLE_SCHEMA).to_pylist()} if table.exists() else {}


def append_batch(folder: Path, items: Iterator[PairRecord | Reject], batch: str) -> dict[str, int]:
    """Copy the images of new records into ``folder`` and append their rows (split
    ``train``, ``batch``) to the table; a record whose key is already there is skipped when
    its captions and image bytes are the same (``already_present``) and replaces its row
    and image when either changed (``updated``, the row's ``batch`` becomes this one);
    unreadable images and the source's own rejects go to ``rejects.parquet``. Nothing is
    written when no record is new or changed. Returns counts."""
    folder.mkdir(parents=True, exist_ok=True)
    known = existing_rows(folder)
    rows: dict[str, dict[str, Any]] = {}  # key -> new or replacing row, in arrival order
    rejects: list[Reject] = []
    seen = present = updated = 0
    for item in items:
        if isinstance(item, Reject):
            rejects.append(Reject(item.uid, STAGE, item.reason, item.detail, item.key))
            continue
        seen += 1
        key = item.uid
        if key in rows:  # twice in one batch: the first stays (as a second batch would see it)
            present += 1
            continue
        name = f"{IMAGES}/{make_uid(SOURCE, key)}{_suffix(item.image_uri)}"
        try:  # bounded like every image read (data.* defaults): a hostile URL is a reject
            data = read_bytes(item.image_uri, max_bytes=DEFAULT_MAX_BYTES, timeout_s=DEFAULT_READ_TIMEOUT_S)
        except (ReadTooLarge, ReadTimedOut) as e:
            reason = "too_large" if isinstance(e, ReadTooLarge) else "read_timeout"
            rejects.append(Reject(make_uid(SOURCE, key), STAGE, reason, str(e), key))
            continue
        except (FileNotFoundError, OSError) as e:
            rejects.append(Reject(make_uid(SOURCE, key), STAGE, "missing", f"{item.image_uri}: {e}", key))
            continue
        before = known.get(key)
        if before is not None:
            stored = folder / before["image"]
            if before["captions"] == list(item.captions) and stored.is_file() and stored.read_bytes() == data:
                present += 1
                continue
            updated += 1
            if before["image"] != name:  # another file type: the old file goes with its row
                stored.unlink(missing_ok=True)
        write_atomic(folder / name, data)
        rows[key] = {"key": key, "image": name, "captions": list(item.captions), "split": SPLIT, "batch": batch}
    if rows:
        merged = {**known, **rows}  # a replaced row keeps its place, new ones follow
        _atomic_parquet(pa.Table.from_pylist(list(merged.values()), schema=TABLE_SCHEMA), folder / TABLE)
        if rejects:
            previous = folder / REJECTS
            table = rejects_to_table(rejects)
            if previous.exists():
                table = pa.concat_tables([pq.read_table(previous).cast(REJECTS_SCHEMA), table])
            _atomic_parquet(table, previous)
    return {"records": seen, "appended": len(rows) - updated, "updated": updated, "already_present": present,
            "rejected": len(rejects)}


def _suffix(uri: str) -> str:
    suffix = os.path.splitext(uri.split("?", 1)[0])[1].lower()
    return suffix if suffix in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff") else ".img"


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)

"""Image-caption pairs from a CSV, TSV or Parquet table (local or ``s3://``).

Each row names an image (a path relative to the table's folder, an absolute path, an
``s3://`` or ``http(s)://`` URL) and a caption (or, in a Parquet list column, several).
Rows with the same key — the optional ``key_column``, else the image reference exactly
as written — merge into one ``PairRecord`` whose captions keep the row order;
``uid = make_uid(cfg.name, key)``.
The first valid row of a key fixes its image and split (``split_column``, or
``default_split`` when there is no such column or the cell is empty).

Rejects, one per dropped row (uid from ``"row:<index>"``, 0-based data row; key = the
sample key when known), so every row ends in a record or a reject (with one caption per
row, ``captions in records + rejects == rows``):

- ``missing_image``: empty image cell; ``missing_key``: empty key cell;
- ``empty_caption``: missing or blank caption;
- ``conflicting_row``: a row whose image or split differs from the first row of its key;
- ``outside_allowed_roots``: with ``allowed_roots`` set, an image that does not resolve
  under one of them (``../`` walked, symlinks followed, ``file://`` read as a path, so
  ``../../etc/passwd`` or ``file:///etc/passwd`` is never opened).

A key whose rows are all rejected yields no record.
"""

from __future__ import annotations

import math
import os
import posixpath
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinoalign.errors import ConfigError, DataFileMissing
from dinoalign.data.config import TABLE_FORMATS, PairsSourceConfig
from dinoalign.data.schema import PairRecord, Reject, make_uid
from dinoalign.data.sources import SOURCES, STAGE, clean_caption, join_uri, parent_uri
from dinoalign.storage import open_uri

@SOURCES.register("pairs")
def pairs_source(cfg: PairsSourceConfig, workdir: Path) -> Iterator[PairRecord | Reject]:
    """Records merged by key from the table at ``cfg.path`` (``workdir`` is not needed:
    images stay where the table points)."""
    columns = read_pairs_table(cfg)
    folder = parent_uri(cfg.path)
    n_rows = len(columns[cfg.image_column])
    records: dict[str, PairRecord] = {}
    for row in range(n_rows):
        image_ref = _cell(columns[cfg.image_column][row])
        image_uri = join_uri(folder, image_ref) if image_ref else ""
        key = _cell(columns[cfg.key_column][row]) if cfg.key_column else image_ref
        captions = _captions(columns[cfg.caption_column][row])
        split = (
            _cell(columns[cfg.split_column][row]) if cfg.split_column else None
        ) or cfg.default_split
        if image_ref is None:
            problem = ("missing_image", f"the {cfg.image_column!r} cell is empty")
        elif key is None:
            problem = ("missing_key", f"the {cfg.key_column!r} cell is empty")
        elif not captions:
            problem = ("empty_caption", f"the {cfg.caption_column!r} cell is missing or blank")
        elif cfg.allowed_roots is not None and not within_roots(image_uri, cfg.allowed_roots):
            problem = ("outside_allowed_roots", f"{image_ref!r} resolves outside the allowed roots "
                                                f"{list(cfg.allowed_roots)} (data.allowed_roots)")
        else:
            problem = _conflict(records.get(key), image_uri, split)
        if problem is not None:
            reason, detail = problem
            yield Reject(
                make_uid(cfg.name, f"row:{row}"), STAGE, reason, f"row {row}: {detail}", key or ""
            )
        elif key in records:
            records[key].captions.extend(captions)
        else:
            records[key] = PairRecord(
                uid=make_uid(cfg.name, key),
                image_uri=image_uri,
                captions=captions,
                split=split,
                source=cfg.name,
            )
    yield from records.values()


def _resolved(uri: str) -> tuple[str, str, str]:
    """(scheme, host, normalised path) of a URI; local paths (and ``file://``) are made
    absolute with ``..`` and symlinks resolved, URL paths are percent-decoded and
    ``..``-normalised as a server would."""
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    if "://" not in uri:
        return "", "", os.path.realpath(uri)
    parts = urllib.parse.urlsplit(uri)
    path = posixpath.normpath("/" + urllib.parse.unquote(parts.path).lstrip("/"))
    return parts.scheme.lower(), parts.netloc.lower(), path.replace("//", "/")


def within_roots(uri: str, roots: list[str] | tuple[str, ...]) -> bool:
    """True when ``uri`` resolves to ``root`` or below one of ``roots`` (same scheme and
    host for URLs)."""
    scheme, host, path = _resolved(uri)
    for root in roots:
        r_scheme, r_host, r_path = _resolved(root)
        if (scheme, host) == (r_scheme, r_host) and (
                path == r_path or path.startswith(r_path.rstrip("/" + os.sep) + ("/" if scheme else os.sep))):
            return True
    return False


def read_pairs_table(cfg: PairsSourceConfig) -> dict[str, list[Any]]:
    """The configured columns of the table, as column name -> list of cell values."""
    table_format = cfg.format or TABLE_FORMATS.get(Path(cfg.path).suffix.lower())
    if table_format is None:
        raise ConfigError(
            f"cannot tell the format of {cfg.path} from its suffix: name it "
            f"{'/'.join(TABLE_FORMATS)} or set pairs.format"
        )
    wanted = {
        "image_column": cfg.image_column,
        "caption_column": cfg.caption_column,
        "key_column": cfg.key_column,
        "split_column": cfg.split_column,
    }
    try:
        table_file = open_uri(cfg.path, "rb")
    except FileNotFoundError:
        raise DataFileMissing(f"pairs table {cfg.path} not found: check pairs.path") from None
    separator = cfg.separator or ("\t" if table_format == "tsv" else ",")
    with table_file as f:
        if table_format == "parquet":
            try:
                parquet = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise ConfigError(
                    f"pairs table {cfg.path} is not a readable Parquet file ({e}); check the "
                    "file, or set pairs.format if it is csv/tsv"
                ) from None
            _check_columns(cfg.path, parquet.schema_arrow.names, wanted)
            table = parquet.read(columns=sorted({c for c in wanted.values() if c}))
            return {name: table.column(name).to_pylist() for name in table.column_names}
        try:
            frame = pd.read_csv(
                f, sep=separator, dtype=str, keep_default_na=False, encoding=cfg.encoding
            )
        except pd.errors.EmptyDataError:
            raise ConfigError(
                f"pairs table {cfg.path} is empty: it needs a header row with the columns "
                f"{[c for c in wanted.values() if c]} and one row per (image, caption)"
            ) from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"pairs table {cfg.path} is not {cfg.encoding} text (byte {e.object[e.start]:#04x} "
                f"at offset {e.start}): set pairs.encoding (e.g. latin-1 or cp1252)"
            ) from None
        except pd.errors.ParserError as e:
            raise ConfigError(
                f"pairs table {cfg.path} is not valid {table_format} with separator "
                f"{separator!r}: {str(e).strip().splitlines()[-1]}"
            ) from None
    _check_columns(cfg.path, list(frame.columns), wanted, separator)
    return {name: frame[name].tolist() for name in {c for c in wanted.values() if c}}


def _check_columns(
    path: str, present: list[str], wanted: dict[str, str | None], separator: str | None = None
) -> None:
    for field, column in wanted.items():
        if column and column not in present:
            hint = ""
            other = [s for s in (";", "\t", ",", "|") if s != separator and any(s in p for p in present)]
            if separator is not None and len(present) == 1 and other:
                hint = f"; the header looks separated by {other[0]!r}: set pairs.separator"
            raise ConfigError(
                f"pairs table {path} has no column {column!r} (pairs.{field}); "
                f"its columns are {present}{hint}"
            )


def _conflict(record: PairRecord | None, image_uri: str, split: str) -> tuple[str, str] | None:
    if record is None:
        return None
    if record.image_uri != image_uri:
        return (
            "conflicting_row",
            f"image {image_uri} differs from {record.image_uri} of the same key",
        )
    if record.split != split:
        return "conflicting_row", f"split {split!r} differs from {record.split!r} of the same image"
    return None


def _captions(value: Any) -> list[str]:
    """The non-blank captions of a cell: one string, or a list of them (Parquet lists)."""
    cells = list(value) if isinstance(value, (list, tuple)) else [value]
    return [caption for caption in map(clean_caption, cells) if caption is not None]


def _cell(value: Any) -> str | None:
    """A table cell as a stripped string; None for null, NaN or blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip() or None

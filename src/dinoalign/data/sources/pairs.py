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

CSV/TSV text is read line by line (:func:`read_text_table`), so that every physical line
ends as (part of) a row or as a reject naming its line (uid from ``"line:<n>"``, 1-based,
the header is line 1; blank lines are skipped), and the details of a row's rejects name
its line too:

- ``stray_quote``: a quote opens a field and the field runs over the end of the line
  into lines that each read as a whole row on their own, or never closes. A CSV reader
  (pandas, ``csv``) would join those lines into one caption and lose their rows
  silently; here the line with the quote is the reject and reading goes on at the next
  line. A quoted caption that really spans lines (no inner line reads as a row) stays one row;
- ``too_many_fields``: more fields than the header (an unquoted separator in a caption);
- ``malformed_row``: a line the CSV reader refuses (a field over its 128 KiB limit).

Fewer fields than the header are empty cells, as in pandas.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import posixpath
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    table = read_pairs_table(cfg)
    columns = table.columns
    for line, reason, detail in table.malformed:
        yield Reject(make_uid(cfg.name, f"line:{line}"), STAGE, reason, f"line {line}: {detail}", "")
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
            where = f" (line {table.lines[row]})" if table.lines is not None else ""
            yield Reject(
                make_uid(cfg.name, f"row:{row}"), STAGE, reason, f"row {row}: {detail}{where}", key or ""
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


@dataclasses.dataclass
class PairsTable:
    """The configured columns of a pairs table (column name -> cell values, one per row);
    for CSV/TSV also the physical line each row starts on (1-based, header = line 1) and
    the lines that are no row: ``(line, reason, detail)``."""

    columns: dict[str, list[Any]]
    lines: list[int] | None = None
    malformed: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)


def read_pairs_table(cfg: PairsSourceConfig) -> PairsTable:
    """The configured columns of the table at ``cfg.path`` (see :class:`PairsTable`)."""
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
            return PairsTable({name: table.column(name).to_pylist() for name in table.column_names})
        data = f.read()
    try:
        text = data.decode(cfg.encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"pairs table {cfg.path} is not {cfg.encoding} text (byte {e.object[e.start]:#04x} "
            f"at offset {e.start}): set pairs.encoding (e.g. latin-1 or cp1252)"
        ) from None
    header, rows, lines, malformed = read_text_table(text.removeprefix("\ufeff"), separator)
    if header is None:
        raise ConfigError(
            f"pairs table {cfg.path} is empty: it needs a header row with the columns "
            f"{[c for c in wanted.values() if c]} and one row per (image, caption)"
        )
    _check_columns(cfg.path, header, wanted, separator)
    names = {c for c in wanted.values() if c}
    index = {name: header.index(name) for name in names}
    return PairsTable({name: [row[i] for row in rows] for name, i in index.items()}, lines, malformed)


_PHYSICAL_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
_QUOTE = '"'


class _LineFeed:
    """Physical lines for ``csv.reader`` from index ``next``; ``exhausted`` once the reader
    asked past the last one (mid-record: a quote that never closes)."""

    def __init__(self, lines: list[str], start: int) -> None:
        self.lines, self.next, self.exhausted = lines, start, False

    def __iter__(self) -> "_LineFeed":
        return self

    def __next__(self) -> str:
        if self.next >= len(self.lines):
            self.exhausted = True
            raise StopIteration
        self.next += 1
        return self.lines[self.next - 1]


def read_text_table(
    text: str, separator: str
) -> tuple[list[str] | None, list[list[str]], list[int], list[tuple[int, str, str]]]:
    """CSV/TSV ``text`` (quote ``"``, doubled inside a quoted field) read so that every
    physical line is accounted: ``(header, rows, the line each row starts on, malformed
    lines as (line, reason, detail))``; lines are 1-based, blank lines are skipped, the
    header is None when there is no non-blank line. Rows are padded with empty cells to
    the header's width. The reasons are in the module docstring."""
    lines = _PHYSICAL_LINE.findall(text)
    header: list[str] | None = None
    rows: list[list[str]] = []
    starts: list[int] = []
    malformed: list[tuple[int, str, str]] = []
    i = 0
    while i < len(lines):
        feed = _LineFeed(lines, i)
        reader = csv.reader(feed, delimiter=separator, quotechar=_QUOTE, strict=False)
        while True:
            begin = feed.next
            while begin < len(lines) and not lines[begin].strip():
                begin += 1  # blank lines are no rows
            feed.next = begin
            try:
                fields = next(reader)
            except StopIteration:
                i = len(lines)
                break
            except csv.Error as e:  # a field over the reader's limit, most likely
                spanned = feed.next - begin > 1
                malformed.append((begin + 1, "stray_quote" if spanned else "malformed_row",
                                  f"{e}{_STRAY_QUOTE_HINT if spanned else ''}: {_excerpt(lines[begin])}"))
                i = begin + 1
                break
            end = feed.next
            if header is None:
                header = fields
                continue
            if feed.exhausted or (end - begin > 1 and any(
                    _reads_as_row(lines[j], separator, len(header)) for j in range(begin + 1, end))):
                what = ("never closes" if feed.exhausted else
                        f"closes only on line {end}, running over lines that each read as a row")
                malformed.append((begin + 1, "stray_quote", f"a quoted field opens here and {what}"
                                  f"{_STRAY_QUOTE_HINT}: {_excerpt(lines[begin])}"))
                i = begin + 1
                break
            if len(fields) > len(header):
                malformed.append((begin + 1, "too_many_fields",
                                  f"{len(fields)} fields, the header has {len(header)} (an unquoted "
                                  f"{separator!r} in a cell? quote the cell): {_excerpt(lines[begin])}"))
                continue
            rows.append(fields + [""] * (len(header) - len(fields)))
            starts.append(begin + 1)
    return header, rows, starts, malformed


_STRAY_QUOTE_HINT = " (a stray quote? the line is rejected and reading goes on at the next line)"


def _reads_as_row(line: str, separator: str, width: int) -> bool:
    """True when ``line`` alone is a complete record of ``width`` fields."""
    feed = _LineFeed([line], 0)
    try:
        fields = next(csv.reader(feed, delimiter=separator, quotechar=_QUOTE, strict=False))
    except (csv.Error, StopIteration):
        return False
    return not feed.exhausted and len(fields) == width


def _excerpt(line: str, limit: int = 80) -> str:
    line = line.rstrip("\r\n")
    return repr(line if len(line) <= limit else line[:limit] + "...")


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

"""A hostile-input corpus for the prepare stage (issue #19), generated (no checked-in
binaries): what a careless or hostile user puts in a pairs table, a webdataset shard or a
COCO file, mixed with good rows, and what each input must become.

Each ``*_corpus(folder, ...)`` writes its inputs under ``folder`` and returns a
:class:`Corpus`: the params overrides that point ``dinoalign prepare`` at them, and the
outcome expected of every input, ``(uid, reason)`` with reason None for a manifest
record. ``mask_corpus`` covers the one reason prepare cannot give (a colour mask is
refused where masks are read). ``write_hostile_table`` writes a table that must stop
prepare with one clear line.

Image files come from :mod:`badfiles` (one per decoder failure, one per unusual good mode)
plus the cases below; URLs go to :mod:`flaky_http`'s server (stall, 503, 403, 404).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from badfiles import write_bad_corpus, write_good_corpus
from dinoalign.data.schema import make_uid

MAX_BYTES = 200_000  # data.max_bytes of the corpus runs: too_large.png is bigger
READ_TIMEOUT_S = 1.0  # data.read_timeout_s: the stalled URL gives up after this
MIN_SIDE = 14
MAX_PIXELS = 1_000_000


@dataclasses.dataclass
class Corpus:
    """Inputs of one prepare run and what each must end as."""

    overrides: list[str]
    expected: collections.Counter[tuple[str, str | None]]  # (uid, reject reason | None: a record)
    line_uids: dict[int, str] = dataclasses.field(default_factory=dict)  # pairs: physical line -> uid
    n_lines: int = 0  # pairs: physical lines of the table
    blank_lines: set[int] = dataclasses.field(default_factory=set)  # pairs: lines that are no row

    @property
    def reasons(self) -> set[str]:
        return {reason for _, reason in self.expected if reason}


def bounds(root: Path) -> list[str]:
    """The data.* bounds every corpus run uses (small and fast: one try, short deadline)."""
    return [f"data.max_bytes={MAX_BYTES}", f"data.read_timeout_s={READ_TIMEOUT_S}", "data.read_attempts=1",
            f"data.min_side={MIN_SIDE}", f"data.max_pixels={MAX_PIXELS}", "data.max_aspect_ratio=20",
            "prepare.validate_images=true", "paths.incoming=null", f"paths.pairs={root / 'pairs'}"]


# ----------------------------------------------------------------------------- image files


def _png(size: tuple[int, int], mode: str = "RGB", pixels: np.ndarray | None = None) -> bytes:
    image = Image.fromarray(pixels) if pixels is not None else Image.new(mode, size, 0)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_more_bad_files(directory: Path) -> dict[str, str]:
    """Cases beyond :func:`badfiles.write_bad_corpus`: name -> expected reason."""
    directory.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    files = {
        "too_large.png": (_png((300, 300), pixels=noise), "too_large"),  # > MAX_BYTES
        "strip.png": (_png((400, 14), "L"), "extreme_aspect_ratio"),  # 400:14 > 20
        "photo.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "not_an_image"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="9"/></svg>', "not_an_image"),
        "ghostscript.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\nshowpage\n", "not_an_image"),
        "gzipped.png": (gzip.compress(bytes(1 << 20)), "not_an_image"),
    }
    for name, (data, _) in files.items():
        (directory / name).write_bytes(data)
    (directory / "a_folder.png").mkdir(exist_ok=True)
    loop = directory / "loop.png"
    if not loop.is_symlink():
        os.symlink(loop.name, loop)  # points at itself
    return {**{name: reason for name, (_, reason) in files.items()},
            "a_folder.png": "read_error", "loop.png": "read_error", "absent.png": "missing"}


# ----------------------------------------------------------------------------- pairs table


class _Table:
    """A CSV written line by line, with the uid and outcome each line must end in."""

    def __init__(self, name: str, header: list[str]) -> None:
        self.name = name
        self.text = _csv_line(header)
        self.line = 1  # the header
        self.row = 0  # data rows as the reader counts them (line rejects are no rows)
        self.expected: collections.Counter[tuple[str, str | None]] = collections.Counter()
        self.line_uids: dict[int, str] = {}
        self.blank_lines: set[int] = set()

    def _add(self, text: str, uid: str | None) -> None:
        for _ in range(text.count("\n") or 1):
            self.line += 1
            if uid is not None:
                self.line_uids[self.line] = uid
        self.text += text

    def record(self, key: str, image: str, caption: str, reason: str | None = None) -> str:
        """A row that makes (or adds a caption to) the record of ``key``; ``reason``: the
        reject its image must get at validation."""
        uid = make_uid(self.name, key)
        if all(u != uid for u, _ in self.expected):
            self.expected[(uid, reason)] += 1
        self._add(_csv_line([key, image, caption]), uid)
        self.row += 1
        return uid

    def row_reject(self, cells: list[str], reason: str) -> None:
        uid = make_uid(self.name, f"row:{self.row}")
        self.expected[(uid, reason)] += 1
        self._add(_csv_line(cells), uid)
        self.row += 1

    def line_reject(self, text: str, reason: str) -> None:
        uid = make_uid(self.name, f"line:{self.line + 1}")
        self.expected[(uid, reason)] += 1
        self._add(text, uid)

    def blank(self) -> None:
        self._add("\n", None)
        self.blank_lines.add(self.line)


def _csv_line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


def pairs_corpus(folder: Path, http_url: str) -> Corpus:
    """A pairs CSV (key column ``id``) that mixes good rows with every bad kind: every image
    reject prepare gives, every reject of the pairs source, and lines that a CSV reader
    would join or refuse (stray quotes, extra fields, a huge field)."""
    images = folder / "images"
    good = write_good_corpus(images / "good")
    bad = {**write_bad_corpus(images / "bad"), **write_more_bad_files(images / "bad")}
    (folder.parent / "outside.png").write_bytes(_png((32, 32)))  # readable, but not under the root
    t = _Table("pairs", ["id", "image", "caption"])
    for i, name in enumerate(sorted(good)):
        t.record(f"good-{i}", f"images/good/{name}", f"a good {name} image ✓")
    t.record("good-0", "images/good/" + sorted(good)[0], "a second caption of the same image")  # merged
    for name, reason in sorted(bad.items()):
        t.record(f"bad-{name}", f"images/bad/{name}", f"a caption of {name}", reason)
    for path, reason in [("/ok/fine.png", None), ("/stall/slow.png", "read_timeout"),
                         ("/status/503/busy.png", "unavailable"), ("/status/403/denied.png", "read_error"),
                         ("/status/404/gone.png", "missing")]:
        t.record(f"url-{path}", http_url + path, f"a caption of {path}", reason)
    grey = "images/good/grey.png"
    t.record("multi", grey, "a quoted caption\nthat really spans two lines")
    t.blank()
    t.record("unicode", grey, "ein Bild, 一张图片, صورة 🖼️")
    t.row_reject(["no-image", "", "a caption without an image"], "missing_image")
    t.row_reject(["", grey, "a caption without a key"], "missing_key")
    t.row_reject(["blank", grey, "   \t "], "empty_caption")
    t.row_reject(["empty", grey, ""], "empty_caption")
    t.row_reject(["good-0", "images/good/" + sorted(good)[1], "the same key, another image"], "conflicting_row")
    t.row_reject(["escape", "../outside.png", "a path out of the data"], "outside_allowed_roots")
    t.row_reject(["passwd", "file:///etc/passwd", "a system file"], "outside_allowed_roots")
    t.line_reject(f'stray,{grey},"a stray quote opens here\n', "stray_quote")
    t.record("after-stray-1", grey, "read on its own after the stray quote")
    t.record("after-stray-2", grey, "and so is this one")
    t.line_reject(f"comma,{grey},a caption, with an unquoted comma\n", "too_many_fields")
    t.line_reject(f"huge,{grey},{'x' * 140_000}\n", "malformed_row")
    t.record("last-good", grey, "the last good row")
    t.line_reject(f'unclosed,{grey},"a quote that never closes', "stray_quote")  # no newline: EOF
    table = folder / "pairs.csv"
    table.write_text(t.text, encoding="utf-8")
    overrides = ["data.source=pairs", f"data.pairs.path={table}", "data.pairs.key_column=id",
                 f"data.allowed_roots=['{folder}', '{http_url}/']", *bounds(folder)]
    return Corpus(overrides, t.expected, t.line_uids, t.line, t.blank_lines)


# ----------------------------------------------------------------------------- webdataset


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def webdataset_corpus(folder: Path) -> Corpus:
    """Shards with good samples and every sample and shard reject of the webdataset source,
    a truncated image inside a good shard, and member names that try to leave the folder."""
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    png = _png((32, 32))
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noise).save(jpeg, "JPEG", quality=90)
    cut_jpeg = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    big_png = _png((64, 64), pixels=noise)
    name = "webdataset"
    good = shards / "good.tar"
    expected: collections.Counter[tuple[str, str | None]] = collections.Counter()

    def sample(key: str, reason: str | None) -> None:
        expected[(make_uid(name, key), reason)] += 1

    _tar(good, [
        ("000.png", png), ("000.txt", b"a good sample"),
        ("001.jpg", jpeg.getvalue()), ("001.json", json.dumps({"caption": "caption from json"}).encode()),
        ("002.txt", b"a caption without an image"),
        ("003.png", png),
        ("004.png", png), ("004.txt", b" \n\t "),
        ("005.png", png), ("005.txt", b"\xff\xfe not utf-8"),
        ("006.png", png), ("006.json", b"{not json"),
        ("007.png", png), ("007.json", b"[1, 2]"),
        ("008.png", png), ("008.txt", b"x" * ((1 << 20) + 1)),
        ("009.png", png), ("009.json", json.dumps({"key": "k9"}).encode()), ("009.txt", b"keyed by json"),
        ("010.png", png), ("010.json", json.dumps({"key": "k9"}).encode()), ("010.txt", b"same key"),
        ("011.jpg", cut_jpeg), ("011.txt", b"a truncated image"),
        ("../../../escape/012.png", png), ("../../../escape/012.txt", b"a member name that climbs out"),
        ("/abs/013.png", png), ("/abs/013.txt", b"an absolute member name"),
    ])
    for key, reason in [("000", None), ("001", None), ("002", "no_image"), ("003", "no_caption"),
                        ("004", "empty_caption"), ("005", "bad_caption"), ("006", "bad_json"),
                        ("007", "bad_json"), ("008", "bad_caption"), ("k9", None), ("011", "truncated"),
                        ("../../../escape/012", None), ("/abs/013", None)]:
        sample(key, reason)
    expected[(make_uid(name, f"{good}#010"), "duplicate_key")] += 1

    whole = _tar(shards / "whole.tar", [("a.png", big_png), ("a.txt", b"one"), ("b.png", png), ("b.txt", b"two")])
    with tarfile.open(shards / "whole.tar") as tar:
        second_header = tar.getmembers()[1].offset
    (shards / "cut-header.tar").write_bytes(whole[: second_header + 100])  # inside the 2nd header
    (shards / "cut-member.tar").write_bytes(whole[: second_header // 2])  # inside the 1st image
    (shards / "not-a.tar").write_bytes(b"this is not a tar archive\n" * 40)
    (shards / "folder.tar").mkdir(exist_ok=True)
    urls = [good, shards / "cut-header.tar", shards / "cut-member.tar", shards / "not-a.tar",
            shards / "missing.tar", shards / "folder.tar"]
    for url, reason in zip(urls[1:], ["corrupt_shard"] * 3 + ["shard_read_error"] * 2):
        expected[(make_uid(name, str(url)), reason)] += 1
    url_list = ", ".join(f"'{u}'" for u in urls)
    return Corpus(["data.source=webdataset", f"data.webdataset.urls=[{url_list}]", *bounds(folder)], expected)


# ----------------------------------------------------------------------------- COCO


def coco_corpus(folder: Path) -> Corpus:
    """A COCO captions + instances pair with every COCO reject, an image id given twice
    (7 and "7": one uid, so prepare's duplicate_uid) and a bad image."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for file_name in ("1.png", "2.png", "3.png", "4.png", "7.png", "7-str.png"):
        (images / file_name).write_bytes(_png((32, 32)))
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (images / "5.png").write_bytes(_png((32, 32), pixels=noise)[:1000])  # truncated
    listed = [(1, "1.png"), (2, "2.png"), (3, "3.png"), (4, "4.png"), (5, "5.png"), (7, "7.png"), ("7", "7-str.png")]
    captions = {
        "images": [{"id": i, "file_name": f} for i, f in listed],
        "annotations": [{"id": 100 + n, "image_id": i, "caption": f"a caption of image {i}"}
                        for n, (i, _) in enumerate(listed) if i != 3]
        + [{"id": 200, "image_id": 999, "caption": "an image nobody listed"},
           {"id": 201, "image_id": 1, "caption": "   "},
           {"id": 202, "image_id": 3, "caption": None}],
    }
    instances = {
        "images": [{"id": i, "height": 32, "width": 32} for i in (1, 2, 4)],
        "categories": [{"id": 1, "name": "square"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]},
            {"id": 2, "image_id": 4, "category_id": 1, "iscrowd": 0, "segmentation": "not a polygon"},
        ],
    }
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "instances.json").write_text(json.dumps(instances))
    name = "coco"
    expected: collections.Counter[tuple[str, str | None]] = collections.Counter({
        (make_uid(name, "1"), None): 1, (make_uid(name, "2"), None): 1,
        (make_uid(name, "3"), "no_captions"): 1, (make_uid(name, "4"), "bad_annotation"): 1,
        (make_uid(name, "5"), "truncated"): 1,
        (make_uid(name, "7"), None): 1, (make_uid(name, "7"), "duplicate_uid"): 1,
        (make_uid(name, "caption:200"), "unknown_image_id"): 1,
        (make_uid(name, "caption:201"), "empty_caption"): 1, (make_uid(name, "caption:202"), "empty_caption"): 1,
    })
    overrides = ["data.source=coco", f"data.coco.captions_json={folder / 'captions.json'}",
                 f"data.coco.instances_json={folder / 'instances.json'}", f"data.coco.image_dir={images}",
                 *bounds(folder)]
    return Corpus(overrides, expected)


# ----------------------------------------------------------------------------- masks, tables


def mask_corpus(folder: Path) -> dict[Path, str]:
    """Label maps the evaluation refuses (read by ``load_mask``, not by prepare): path -> reason."""
    folder.mkdir(parents=True, exist_ok=True)
    colour = folder / "colour_mask.png"
    colour.write_bytes(_png((16, 16), "RGB"))
    return {colour: "unsupported_mode"}


HOSTILE_TABLES = ("empty csv", "header only of other columns", "invalid utf-8", "latin-1 with semicolons",
                  "not parquet", "parquet without the columns", "unknown suffix", "no such file")


def write_hostile_table(folder: Path, case: str) -> tuple[Path, str]:
    """A pairs table that must stop prepare with one clear line: (path, what the line says)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("pairs.parquet" if "parquet" in case else "pairs.txt" if case == "unknown suffix"
                     else "pairs.csv")
    if case == "empty csv":
        path.write_bytes(b"")
        return path, "is empty: it needs a header row"
    if case == "header only of other columns":
        path.write_bytes(b"url,text\n")
        return path, "has no column 'image' (pairs.image_column); its columns are ['url', 'text']"
    if case == "invalid utf-8":
        path.write_bytes(b"image,caption\na.jpg,caf\xe9 au lait\n")
        return path, "is not utf-8 text (byte 0xe9 at offset 23): set pairs.encoding"
    if case == "latin-1 with semicolons":
        path.write_bytes("image;caption\na.jpg;crème brûlée\n".encode("latin-1"))
        return path, "set pairs.encoding"
    if case == "not parquet":
        path.write_bytes(b"image,caption\na.jpg,a cat\n")
        return path, "is not a readable Parquet file"
    if case == "parquet without the columns":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": [1]}), path)
        return path, "has no column 'image' (pairs.image_column); its columns are ['x']"
    if case == "unknown suffix":
        path.write_bytes(b"image,caption\n")
        return path, "cannot tell the format of"
    if case == "no such file":
        return path, "not found: check pairs.path"
    raise AssertionError(case)

"""img2dataset-style WebDataset tar shards (local paths, ``s3://`` or ``http(s)://`` URLs).

``urls`` entries may use brace expansion (``shard-{000..009}.tar``, ``{train,val}.tar``)
and, for local and ``s3://`` paths, glob patterns (``shards/*.tar``). A shard is read as
a stream, once. Tar members are grouped into samples by key: the member path up to the
first dot of its file name (``a/000012.jpg`` and ``a/000012.txt`` -> ``a/000012``),
in any order inside the shard. Per sample:

- image: the first member with extension ``jpg``, ``jpeg``, ``png`` or ``webp``
  (case-insensitive), extracted to ``workdir/images/<shard>/<member key>.<ext>`` so that
  ``image_uri`` is a readable local file (keys with characters outside
  ``[A-Za-z0-9._-]`` are rewritten and suffixed with a short hash);
- caption: the ``txt`` member (UTF-8), else the ``caption`` field of the ``json`` member;
- key: the ``key`` field of the ``json`` member, else the member key;
  ``uid = make_uid(cfg.name, key)``.

Rejects (stage ``prepare``): ``no_image``, ``no_caption``, ``empty_caption``,
``bad_caption`` (not UTF-8, or a ``txt`` member over 1 MiB), ``bad_json`` (unparseable
metadata, or a ``json`` member over 1 MiB), ``duplicate_key`` (a key seen earlier in
this run: uid from ``"<shard url>#<member key>"``), and per shard
(``uid = make_uid(cfg.name, url)``): ``shard_read_error`` (cannot open or read it) and
``corrupt_shard`` (not a valid tar; the shard yields no records and its extracted
images are deleted). A disk too full to extract into is no reject: the stage stops, and
an image is extracted whole or not at all. Records of a shard
are yielded once the whole shard has been read.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import lzma
import posixpath
import re
import shutil
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dinoalign.errors import ConfigError
from dinoalign.data.config import WebDatasetSourceConfig
from dinoalign.data.schema import PairRecord, Reject, make_uid
from dinoalign.data.sources import SOURCES, STAGE, clean_caption
from dinoalign.storage import atomic_path, disk_full, fs_for, open_uri

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
MAX_TEXT_MEMBER_BYTES = 1 << 20  # captions and metadata are small; refuse to buffer more

_TAR_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)
_BRACE = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_SAFE_STEM = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclasses.dataclass
class _Sample:
    """The members of one sample seen so far in a shard."""

    member_key: str
    image_path: Path | None = None
    caption: bytes | None = None
    metadata: bytes | None = None
    oversized: tuple[str, str] | None = None  # (extension, name) of a too large text member


class _ShardFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


@SOURCES.register("webdataset")
def webdataset_source(cfg: WebDatasetSourceConfig, workdir: Path) -> Iterator[PairRecord | Reject]:
    """Records of every sample of every shard of ``cfg.urls`` (see the module docstring)."""
    urls = expand_urls(cfg.urls)
    shard_dirs = _shard_dirs(urls, Path(workdir) / "images")
    seen_keys: set[str] = set()
    for url in urls:
        try:
            samples = _read_shard(url, shard_dirs[url])
        except _ShardFailed as failure:
            shutil.rmtree(shard_dirs[url], ignore_errors=True)
            yield Reject(make_uid(cfg.name, url), STAGE, failure.reason, failure.detail, key=url)
            continue
        for sample in samples:
            yield _sample_item(sample, url, cfg, seen_keys)


def expand_urls(patterns: Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns and (local or ``s3://``) globs, in order, without
    repeats. A glob that matches nothing is a configuration error."""
    urls: list[str] = []
    for pattern in patterns:
        for url in brace_expand(pattern):
            if _GLOB_CHARS.search(url) and not url.startswith(("http://", "https://")):
                matches = _glob(url)
                if not matches:
                    raise ConfigError(f"webdataset.urls: no shard matches {url!r}")
                urls.extend(matches)
            else:
                urls.append(url)
    return list(dict.fromkeys(urls))


def brace_expand(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..009}`` numeric ranges (zero padding kept
    when an end has a leading zero; descending ranges count down), left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _NUMERIC_RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-")[0] == "0" for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        alternatives = [f"{n:0{width}d}" for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        alternatives = body.split(",")
    else:
        raise ConfigError(
            f"cannot expand {{{body}}} in {pattern!r}: "
            "use {a,b,c} or a numeric range {000..009}"
        )
    tails = brace_expand(pattern[match.end() :])
    return [pattern[: match.start()] + alt + tail for alt in alternatives for tail in tails]


def _glob(pattern: str) -> list[str]:
    if "://" not in pattern:
        return sorted(glob.glob(pattern))
    fs, path = fs_for(pattern)
    return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]


def _shard_dirs(urls: list[str], images_dir: Path) -> dict[str, Path]:
    """url -> extraction folder named after the shard file (``.../00012.tar`` -> ``00012``)."""
    dirs: dict[str, Path] = {}
    owner: dict[str, str] = {}
    for url in urls:
        stem = _TAR_SUFFIX.sub("", url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
        if stem in owner:
            raise ConfigError(
                f"webdataset.urls: shards {owner[stem]} and {url} share the file name {stem!r}; "
                "their images would be extracted into the same folder: rename one"
            )
        owner[stem] = url
        dirs[url] = images_dir / stem
    return dirs


def _read_shard(url: str, out_dir: Path) -> list[_Sample]:
    """Stream one tar: extract images into ``out_dir``, keep text members in memory."""
    try:
        stream = open_uri(url, "rb")
    except Exception as exc:  # FileNotFoundError, permissions, network client errors
        raise _ShardFailed(
            "shard_read_error", f"cannot open {url}: {type(exc).__name__}: {exc}"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    samples: dict[str, _Sample] = {}
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            members = 0
            for member in tar:
                members += 1
                if member.isfile():
                    _add_member(tar, member, samples, out_dir)
            # tarfile ends the iteration quietly when the data stops inside (or right at) a
            # header after the first member; a whole archive ends with a 512-byte zero block
            # instead, so a short last read means the shard was cut and members were lost.
            read_past = tar.fileobj.tell() - tar.offset
            if read_past < tarfile.BLOCKSIZE:
                raise _ShardFailed(
                    "corrupt_shard",
                    f"{url} is truncated: it ends {read_past} bytes into a tar header at byte "
                    f"{tar.offset} (after {members} members), without the end-of-archive block",
                )
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise _ShardFailed(
            "corrupt_shard", f"{url} is not a valid tar: {type(exc).__name__}: {exc}"
        ) from None
    except OSError as exc:
        if disk_full(exc) is not None:
            raise  # no room to extract into: the stage stops, the shard is not bad
        raise _ShardFailed(
            "shard_read_error", f"reading {url}: {type(exc).__name__}: {exc}"
        ) from None
    return list(samples.values())


def _add_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, samples: dict[str, _Sample], out_dir: Path
) -> None:
    directory, _, file_name = posixpath.normpath(member.name).rpartition("/")
    stem, _, extension = file_name.partition(".")
    member_key = f"{directory}/{stem}" if directory else stem
    extension = extension.lower()
    sample = samples.setdefault(member_key, _Sample(member_key))
    if extension in IMAGE_EXTENSIONS:
        if sample.image_path is None:
            path = out_dir / f"{_safe_stem(member_key)}.{extension}"
            with tar.extractfile(member) as source, atomic_path(path) as tmp, open(tmp, "wb") as target:  # type: ignore[union-attr]
                shutil.copyfileobj(source, target)
            sample.image_path = path
    elif extension in ("txt", "json"):
        if member.size > MAX_TEXT_MEMBER_BYTES:
            sample.oversized = (extension, member.name)
            return
        content = tar.extractfile(member).read()  # type: ignore[union-attr]
        if extension == "txt":
            sample.caption = content
        else:
            sample.metadata = content


def _sample_item(
    sample: _Sample, url: str, cfg: WebDatasetSourceConfig, seen_keys: set[str]
) -> PairRecord | Reject:
    metadata: Any = {}
    metadata_error = None
    if sample.metadata is not None:
        try:
            metadata = json.loads(sample.metadata)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            metadata_error = str(exc)
        if not isinstance(metadata, dict):
            metadata, metadata_error = {}, metadata_error or "the json member is not an object"
    key = str(metadata["key"]) if metadata.get("key") not in (None, "") else sample.member_key

    def reject(reason: str, detail: str, uid: str | None = None) -> Reject:
        uid = uid or make_uid(cfg.name, key)
        return Reject(uid, STAGE, reason, f"{url}: sample {sample.member_key}: {detail}", key)

    if sample.oversized is not None:
        extension, member_name = sample.oversized
        reason = "bad_json" if extension == "json" else "bad_caption"
        return reject(reason, f"{member_name} is over {MAX_TEXT_MEMBER_BYTES} bytes")
    if metadata_error is not None:
        return reject("bad_json", metadata_error)
    if sample.image_path is None:
        return reject("no_image", f"no {'/'.join(sorted(IMAGE_EXTENSIONS))} member")
    if sample.caption is not None:
        try:
            text: Any = sample.caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            return reject("bad_caption", f"txt member is not UTF-8: {exc}")
    else:
        text = metadata.get("caption")
        if not isinstance(text, str):
            return reject("no_caption", "no txt member and no 'caption' string in the json member")
    caption = clean_caption(text)
    if caption is None:
        return reject("empty_caption", "the caption is blank")
    if key in seen_keys:
        duplicate_uid = make_uid(cfg.name, f"{url}#{sample.member_key}")
        return reject("duplicate_key", f"key {key!r} was already used", duplicate_uid)
    seen_keys.add(key)
    return PairRecord(
        uid=make_uid(cfg.name, key),
        image_uri=str(sample.image_path),
        captions=[caption],
        split=cfg.split,
        source=cfg.name,
    )


def _safe_stem(member_key: str) -> str:
    """A file name for ``member_key`` that cannot leave the shard folder; unusual keys get
    a hash suffix so that two keys never share a file."""
    if _SAFE_STEM.fullmatch(member_key):
        return member_key
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", member_key).lstrip(".")[:100]
    return f"{cleaned}-{hashlib.blake2b(member_key.encode(), digest_size=4).hexdigest()}"

"""S3-compatible storage settings in one place.

Every client that touches object storage (boto3, fsspec/s3fs, pyarrow's S3 filesystem
used by Ray Data and Ray Train, MLflow, the DVC remote) is configured from the same
environment variables: ``AWS_ENDPOINT_URL`` (or ``DINOALIGN_S3_ENDPOINT``),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and the retry
policy ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` (botocore's own variables, so the DVC
remote and the MLflow server, which create their own botocore clients, follow it too).
Credentials are never read from params.yaml and never logged: the DVC remote gets them in
``.dvc/config.local`` only (:func:`configure_dvc_remote`), the MLflow server in its
environment (:func:`mlflow_server_env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.asyn import sync

from dinoalign.errors import ConfigError, DataFileMissing


DEFAULT_MAX_ATTEMPTS = 5  # botocore "standard" mode: exponential backoff with jitter, <= 20 s apart


@dataclasses.dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None
    region: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_mode: str = "standard"

    def __repr__(self) -> str:  # never print secrets
        return (f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"max_attempts={self.max_attempts}, retry_mode={self.retry_mode!r})")


def s3_settings() -> S3Settings:
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    if not attempts.isdigit() or int(attempts) < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={attempts!r}: expected a positive integer")
    return S3Settings(
        endpoint_url=os.environ.get("DINOALIGN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL"),
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        max_attempts=int(attempts),
        retry_mode=os.environ.get("AWS_RETRY_MODE", "standard"),
    )


def botocore_config(settings: S3Settings | None = None) -> Any:
    """The retry policy for every botocore-based client (boto3, s3fs)."""
    from botocore.config import Config

    s = settings or s3_settings()
    return Config(retries={"max_attempts": s.max_attempts, "mode": s.retry_mode})


def client_env(settings: S3Settings | None = None, *, with_keys: bool = True) -> dict[str, str]:
    """Environment variables that point a client process (DVC, MLflow, Ray workers,
    pyarrow) at the same S3 as this process. Keys only when ``with_keys``."""
    s = settings or s3_settings()
    env = {"AWS_DEFAULT_REGION": s.region, "AWS_MAX_ATTEMPTS": str(s.max_attempts),
           "AWS_RETRY_MODE": s.retry_mode}
    if s.endpoint_url:
        env["AWS_ENDPOINT_URL"] = s.endpoint_url
    if with_keys and s.access_key and s.secret_key:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = s.access_key, s.secret_key
    return env


def mlflow_server_env(settings: S3Settings | None = None) -> dict[str, str]:
    """What an ``mlflow server`` with an ``s3://`` artifact destination needs: the endpoint
    as ``MLFLOW_S3_ENDPOINT_URL`` and the keys (its clients then need neither: artifacts
    are proxied through the server)."""
    s = settings or s3_settings()
    env = client_env(s)
    if s.endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = s.endpoint_url
    return env


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fs_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path, ``file://``, ``s3://`` or ``http(s)://`` URI."""
    if uri.startswith("s3://"):
        s = s3_settings()
        fs = fsspec.filesystem(
            "s3",
            key=s.access_key,
            secret=s.secret_key,
            endpoint_url=s.endpoint_url,
            client_kwargs={"region_name": s.region},
            config_kwargs={"retries": {"max_attempts": s.max_attempts, "mode": s.retry_mode}},
            skip_instance_cache=False,
        )
        return fs, uri[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def open_uri(uri: str, mode: str = "rb") -> IO[Any]:
    fs, path = fs_for(uri)
    return fs.open(path, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary name beside local ``path`` for a writer that wants a file name
    (``pq.write_table``, ``Image.save``); renamed onto ``path`` when the block ends
    normally and removed when it raises, so a reader or a crashed run never sees a
    half-written file under the final name. The parent folder is created.

    The temporary name, ``.<name>.<pid>-<random>.tmp``, is unique per writer (concurrent
    writers of one file never share it) and hidden; the file gets the usual umask mode.
    This is the one place in dinoalign that writes a temporary file and renames it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp, str(tmp)):
            e.filename = str(final)  # name the file being written (a full disk: which output), not its temporary
        raise


# the names atomic_path gives its temporaries
_TEMPORARY_NAME = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp")


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries :func:`atomic_path` left anywhere under local ``folder``:
    those of writers killed between their write and their rename (SIGKILL, the OOM killer,
    a power cut), which nothing else removes, so a DVC output would keep them for good.
    A stage calls this on the folder it owns before it writes there (a live writer's
    temporary would go too). Returns the files removed; a missing folder has none."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob(".*.tmp") if _TEMPORARY_NAME.fullmatch(p.name) and p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def write_atomic(uri: str | os.PathLike[str], data: bytes | str, *, fsync: bool = False) -> None:
    """Write ``data`` (``str`` as UTF-8) to a local path or URI so that it appears whole or
    not at all: locally through :func:`atomic_path` (``fsync`` also flushes it to disk
    before the rename); on S3 as one PUT, which is atomic by itself."""
    body = data.encode("utf-8") if isinstance(data, str) else data
    uri = os.fspath(uri)
    if is_remote(uri):
        with open_uri(uri, "wb") as f:
            f.write(body)
        return
    with atomic_path(uri.removeprefix("file://")) as tmp, open(tmp, "wb") as f:
        f.write(body)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


class ReadLimitExceeded(Exception):
    """A bounded :func:`read_bytes` gave up (not an ``OSError``: nothing failed to open)."""


class ReadTimedOut(ReadLimitExceeded):
    """The whole read took longer than its ``timeout_s`` (a stalled or trickling source)."""


class ReadTooLarge(ReadLimitExceeded):
    """The object has (or streamed) more than ``max_bytes`` bytes."""


# HTTP statuses that say "not now" rather than "never": timeout, too early, too many
# requests, and the server-side 5xx errors
TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# s3fs turns S3's 5xx and SlowDown into OSError(EBUSY / EREMOTEIO); the rest are sockets
_TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET,
    errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
})
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                 "ServiceUnavailable", "InternalError", "RequestLimitExceeded"})


# a write that found no room: no space left on the device, over a disk quota, or past the
# process's file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored: how the tests fill a disk)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


# SQLite's SQLITE_FULL (MLflow's sqlite store, through SQLAlchemy and MlflowException,
# which keep the text but not always the exception)
SQLITE_FULL_MESSAGE = "database or disk is full"


def disk_full(exc: BaseException) -> BaseException | None:
    """The error that says a write found the disk full: an ``OSError`` of
    :data:`DISK_FULL_ERRNOS`, or SQLite's "database or disk is full" (the MLflow store);
    ``exc`` itself or one it was raised from (``__cause__``, ``__context__``, or the
    ``cause`` of a Ray task error); None when there is none. ``dinoalign.cli.main`` turns
    it into one line."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if SQLITE_FULL_MESSAGE in str(exc):
            return exc
        cause = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed read may succeed if tried again: a timeout (:class:`ReadTimedOut`
    included), a refused, reset or dropped connection, HTTP 408/425/429/5xx, S3 throttling
    or 5xx (botocore's and s3fs's forms). A missing object, a denied one, a read over its
    byte cap or any other error is permanent. Follows ``__cause__`` (s3fs wraps botocore)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ReadTimedOut, ConnectionError)):
            return True
        status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
        if isinstance(status, int):
            return status in TRANSIENT_HTTP_STATUSES
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            http = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _TRANSIENT_S3_CODES or http in TRANSIENT_HTTP_STATUSES
        if _is_connection_error(exc):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__
    return False


def _is_connection_error(exc: BaseException) -> bool:
    """aiohttp's and botocore's own connection errors (not OSError subclasses)."""
    kinds: list[type] = []
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bce

        kinds += [bce.ConnectionError, bce.HTTPClientError]
    return isinstance(exc, tuple(kinds))


_READ_CHUNK = 1 << 20


def read_bytes(uri: str, *, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The whole object at ``uri``. Without limits, one plain read (trusted files: weights,
    configs). With ``max_bytes`` and/or ``timeout_s`` (untrusted inputs: image URLs), the
    read is bounded and raises :class:`ReadTooLarge` / :class:`ReadTimedOut` instead of
    growing or hanging:

    - ``http(s)://``: one streamed GET on fsspec's aiohttp session; a ``Content-Length``
      above the cap is refused before the body, a body without one is counted as it
      arrives, and ``timeout_s`` is a total deadline over connect, headers and body
      (``asyncio.wait_for`` cancels the request and closes its connection).
    - anything else (local, ``s3://``): a known size above the cap is refused before
      reading, then chunks are read with the cap and the deadline checked between them
      (one blocked read on S3 is bounded by botocore's own read timeout).
    """
    if max_bytes is None and timeout_s is None:
        with open_uri(uri, "rb") as f:
            return f.read()
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    fs, path = fs_for(uri)
    if uri.startswith(("http://", "https://")):
        return _read_http(fs, path, max_bytes, timeout_s)
    return _read_chunked(fs, path, max_bytes, timeout_s)


def _too_large(uri: str, size: int, max_bytes: int, known: bool) -> ReadTooLarge:
    what = f"{size} bytes" if known else f"more than {max_bytes} bytes streamed"
    return ReadTooLarge(f"{uri}: {what} > max_bytes {max_bytes}")


def _read_http(fs: Any, url: str, max_bytes: int | None, timeout_s: float | None) -> bytes:
    async def fetch() -> bytes:
        session = await fs.set_session()
        async with session.get(fs.encode_url(url), **fs.kwargs) as response:
            fs._raise_not_found_for_status(response, url)
            declared = response.content_length
            if max_bytes is not None and declared is not None and declared > max_bytes:
                raise _too_large(url, declared, max_bytes, True)
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if max_bytes is not None and len(body) > max_bytes:
                    raise _too_large(url, len(body), max_bytes, False)
            return bytes(body)

    async def bounded() -> bytes:
        if timeout_s is None:
            return await fetch()
        try:
            return await asyncio.wait_for(fetch(), timeout_s)
        except TimeoutError:  # ours, or one of the session's own (aiohttp) timeouts
            raise ReadTimedOut(f"{url}: not read within read timeout {timeout_s:g} s") from None

    return sync(fs.loop, bounded)


def _read_chunked(fs: Any, path: str, max_bytes: int | None, timeout_s: float | None) -> bytes:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with fs.open(path, "rb") as f:
        size = getattr(f, "size", None)
        if not isinstance(size, int):
            try:
                st = os.fstat(f.fileno())
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
            except (AttributeError, OSError, ValueError):  # no file descriptor behind it
                size = None
        if max_bytes is not None and size is not None and size > max_bytes:
            raise _too_large(path, size, max_bytes, True)
        body = bytearray()
        # a known size is read in one call; its + 1 sees a file that grew since
        want = _READ_CHUNK if size is None else size + 1
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise ReadTimedOut(f"{path}: not read within read timeout {timeout_s:g} s")
            if max_bytes is not None:
                want = min(want, max_bytes + 1 - len(body))
            chunk = f.read(want)
            if not chunk:
                return bytes(body)
            body += chunk
            if max_bytes is not None and len(body) > max_bytes:
                raise _too_large(path, len(body), max_bytes, False)
            want = _READ_CHUNK


def boto3_client(service: str = "s3", settings: S3Settings | None = None) -> Any:
    """A boto3 client for this S3 (``settings``: default from the environment)."""
    import boto3

    s = settings or s3_settings()
    return boto3.client(
        service,
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        region_name=s.region,
        config=botocore_config(s),
    )


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for Ray Data / Ray Train / parquet I/O."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        s = s3_settings()
        endpoint = s.endpoint_url or None
        scheme = "https"
        if endpoint and "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(
            access_key=s.access_key,
            secret_key=s.secret_key,
            endpoint_override=endpoint,
            scheme=scheme,
            region=s.region,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s.max_attempts),
        )
        return fs, uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def configure_dvc_remote(repo: str | os.PathLike[str], name: str, url: str, *, default: bool = False,
                         shared: bool = False, settings: S3Settings | None = None) -> None:
    """Point DVC remote ``name`` at ``url`` (``s3://bucket/prefix``) on this S3.

    What ``dvc remote add`` + ``dvc remote modify`` would write, through DVC's own config
    API (one import instead of five CLI start-ups). The URL, ``endpointurl`` and region go
    to ``.dvc/config`` when ``shared`` (a stable endpoint every clone uses: commit it) or
    else to ``.dvc/config.local``, like the keys, which always go to ``.dvc/config.local``
    (git-ignored by DVC). ``default`` makes it the remote of ``dvc push``/``dvc pull`` in
    this checkout (``core.remote`` in the local config).
    """
    from dvc.config import Config

    if not url.startswith("s3://"):
        raise ConfigError(f"DVC remote url {url!r}: expected s3://bucket/prefix")
    s = settings or s3_settings()
    dvc_dir = os.path.join(os.fspath(repo), ".dvc")
    if not os.path.isdir(dvc_dir):
        raise DataFileMissing(f"{repo} is not a DVC repository (no .dvc/): run `dvc init` there first")
    # config.local holds the S3 secret: owner-only before anything is written into it (DVC
    # rewrites the file in place, so the mode stays; umask plays no part)
    local = os.path.join(dvc_dir, "config.local")
    os.close(os.open(local, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(local, 0o600)
    config = Config(dvc_dir=dvc_dir, validate=False)
    where = {"url": url, "region": s.region}
    if s.endpoint_url:
        where["endpointurl"] = s.endpoint_url
    with config.edit("repo" if shared else "local") as conf:
        conf["remote"][name] = {**conf["remote"].get(name, {}), **where}
    with config.edit("local") as conf:
        remote = conf["remote"].setdefault(name, {})
        if s.access_key and s.secret_key:
            remote["access_key_id"], remote["secret_access_key"] = s.access_key, s.secret_key
        if default:
            conf["core"]["remote"] = name
    os.chmod(local, 0o600)


def unset_default_dvc_remote(repo: str | os.PathLike[str], name: str) -> bool:
    """Undo ``configure_dvc_remote(default=True)`` for remote ``name``: this checkout's
    ``dvc push`` goes back to the committed default remote. True when something changed."""
    from dvc.config import Config

    config = Config(dvc_dir=os.path.join(os.fspath(repo), ".dvc"), validate=False)
    with config.edit("local") as conf:
        if conf["core"].get("remote") != name:
            return False
        del conf["core"]["remote"]
    return True


def under_root(uri: str, root: str | os.PathLike[str]) -> str:
    """A location from params as an absolute path or URI: a relative local path is taken
    relative to the repo root (where params.yaml lives); URIs and absolute paths are kept."""
    if is_remote(uri) or uri.startswith("file://") or os.path.isabs(uri):
        return uri
    return os.path.join(os.fspath(root), uri)


LOCAL_DIR = "local-dir:"  # open_clip's schema for a model folder (config + weights)


def model_name_at_root(name: str, root: str | os.PathLike[str] | None) -> str:
    """An open_clip model name with a relative ``local-dir:`` folder resolved against the
    repo root (the demo's teacher CLIP is ``local-dir:artifacts/teacher/model``); other
    names, and every name when ``root`` is None, are kept. Specs and hashes record the
    name as params give it; only loading resolves it, so a checkout's location never
    changes an identity."""
    if root is None or not name.startswith(LOCAL_DIR):
        return name
    return LOCAL_DIR + under_root(name[len(LOCAL_DIR):], root)

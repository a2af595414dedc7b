"""Bounded work on hostile inputs (issue #19): every image read has a total deadline and a
byte cap, every decoded image a memory bound whatever its aspect ratio, and each such case
is a reject with its reason, never a hang or an out-of-memory kill.

A tiny HTTP server on 127.0.0.1 serves the hostile cases: a tarpit (one byte every 0.2 s,
forever), a server that never answers, an endless body without Content-Length, a declared
Content-Length over the cap, a 14×1,000,000 PNG (a few KB), a normal PNG and a 404.
"""

from __future__ import annotations

import http.server
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinoalign.config import ConfigError, load_params
from dinoalign.data.images import ImageRejected, decode_image, load_image, probe_image, resize_crop
from dinoalign.data.schema import make_uid
from dinoalign.storage import ReadTimedOut, ReadTooLarge, read_bytes

LIMITS = {"max_pixels": 10**8, "min_side": 14}
ONCE = {"read_attempts": 1}  # the deadline tests time one read (a read_timeout is retried)
DEADLINE_S = 2.0
SLACK_S = 8.0  # generous: a 2-core machine shared with other test runs
STRIP = (1_000_000, 14)  # width × height: 14 M pixels, under data.max_pixels


def _png(size: tuple[int, int], mode: str = "RGB", colour: int | tuple[int, ...] = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


NORMAL_PNG = _png((40, 30), colour=(200, 30, 10))


class _Hostile(http.server.BaseHTTPRequestHandler):
    """One path per case; the slow and endless ones stop when the client hangs up or the
    server is stopped (``server.stopping``)."""

    server_version = "hostile/1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _head(self, length: int | None, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        stopping: threading.Event = self.server.stopping  # type: ignore[attr-defined]
        try:
            if self.path == "/normal.png":
                self._head(len(NORMAL_PNG))
                self.wfile.write(NORMAL_PNG)
            elif self.path == "/strip.png":
                data = self.server.strip_png  # type: ignore[attr-defined]
                self._head(len(data))
                self.wfile.write(data)
            elif self.path == "/tarpit.png":
                self._head(None)
                self.wfile.write(b"\x89PNG")
                while not stopping.wait(0.2):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
            elif self.path == "/stall.png":  # accepts, never answers
                stopping.wait(120)
            elif self.path == "/endless.png":
                self._head(None)
                chunk = b"\x00" * 65536
                while not stopping.is_set():
                    self.wfile.write(chunk)
            elif self.path == "/declared-huge.png":
                self._head(10**12)
                self.wfile.write(b"\x89PNG\r\n\x1a\n")
                stopping.wait(120)
            else:
                self._head(0, status=404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a bounded reader must do


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    httpd.daemon_threads = True
    httpd.stopping = threading.Event()  # type: ignore[attr-defined]
    httpd.strip_png = _png(STRIP, "L")  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.stopping.set()  # type: ignore[attr-defined]
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def _reason(uri: str, **limits: object) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(ImageRejected) as caught:
        probe_image(uri, **{**LIMITS, **ONCE, "read_timeout_s": DEADLINE_S, "max_bytes": 2**20, **limits})
    return caught.value.reason, time.monotonic() - start


# ----------------------------------------------------------------------------- reads


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/tarpit.png", "read_timeout"),
        ("/stall.png", "read_timeout"),
        ("/endless.png", "too_large"),
        ("/declared-huge.png", "too_large"),
        ("/strip.png", "extreme_aspect_ratio"),
        ("/nope.png", "missing"),
    ],
)
def test_hostile_urls_are_rejects_within_the_deadline(server: str, path: str, reason: str) -> None:
    got, took = _reason(server + path)
    assert got == reason
    assert took < DEADLINE_S + SLACK_S


@pytest.mark.timeout(60)
def test_normal_url_and_file_still_decode(server: str, tmp_path: Path) -> None:
    bounds = {"read_timeout_s": DEADLINE_S, "max_bytes": 2**20}
    image = load_image(server + "/normal.png", **LIMITS, **bounds)
    assert image.shape == (30, 40, 3) and (image[0, 0] == (200, 30, 10)).all()
    (tmp_path / "a.png").write_bytes(NORMAL_PNG)
    assert probe_image(str(tmp_path / "a.png"), **LIMITS, **bounds) == (40, 30)
    # defaults (data.* defaults) leave normal inputs as they were
    assert (load_image(str(tmp_path / "a.png"), **LIMITS) == image).all()


@pytest.mark.timeout(60)
def test_local_files_are_capped_by_size_and_by_what_they_stream(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(NORMAL_PNG + b"\x00" * 5000)
    with pytest.raises(ReadTooLarge, match="bytes > max_bytes 1000"):
        read_bytes(str(big), max_bytes=1000)
    assert read_bytes(str(big), max_bytes=10**6, timeout_s=5) == big.read_bytes()
    assert read_bytes(str(big)) == big.read_bytes()  # unbounded: the plain read
    with pytest.raises(ImageRejected) as caught:
        load_image(str(big), **LIMITS, max_bytes=1000)
    assert caught.value.reason == "too_large"
    # an endless local stream (no size to stat) stops at the cap
    with pytest.raises(ReadTooLarge, match="more than 4096 bytes streamed"):
        read_bytes("/dev/zero", max_bytes=4096, timeout_s=5)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty_file"):
        load_image(str(tmp_path / "empty.png"), **LIMITS)


@pytest.mark.timeout(60)
def test_bounded_read_errors_are_typed(server: str) -> None:
    with pytest.raises(ReadTimedOut, match="read timeout 1 s"):
        read_bytes(server + "/tarpit.png", timeout_s=1)
    with pytest.raises(ReadTooLarge, match="1000000000000 bytes > max_bytes 10"):
        read_bytes(server + "/declared-huge.png", max_bytes=10, timeout_s=10)
    assert read_bytes(server + "/normal.png", max_bytes=len(NORMAL_PNG), timeout_s=10) == NORMAL_PNG
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        read_bytes(server + "/normal.png", max_bytes=0)


@pytest.mark.timeout(60)
def test_transient_failures_are_retried_with_backoff_and_permanent_ones_are_not() -> None:
    """Issue #20: a 503, 429 or 5xx, a refused connection or a timeout may pass if tried
    again (``unavailable``, ``read_timeout``: tried ``read_attempts`` times); a 404, 403 or
    400 will not (``missing``, ``read_error``: tried once)."""
    import socket

    from flaky_http import flaky_server

    retry = {**LIMITS, "read_timeout_s": DEADLINE_S, "read_attempts": 3, "read_backoff_s": 0.05}
    with flaky_server() as srv:
        start = time.monotonic()
        image = load_image(srv.url + "/flaky/2/a.png", **retry)  # 503, 503, then the image
        assert image.shape == (30, 40, 3) and srv.hits["/flaky/2/a.png"] == 3
        assert time.monotonic() - start >= 0.05 * (0.5 + 1)  # it waited between tries
        with pytest.raises(ImageRejected) as caught:
            load_image(srv.url + "/flaky/5/b.png", **retry)
        assert caught.value.reason == "unavailable" and "503" in caught.value.detail
        assert "(tried 3 times)" in caught.value.detail and srv.hits["/flaky/5/b.png"] == 3
        for code, reason, tries in [(429, "unavailable", 3), (500, "unavailable", 3), (502, "unavailable", 3),
                                    (404, "missing", 1), (403, "read_error", 1), (400, "read_error", 1)]:
            with pytest.raises(ImageRejected) as caught:
                probe_image(f"{srv.url}/status/{code}/c.png", **retry)
            assert (caught.value.reason, srv.hits[f"/status/{code}/c.png"]) == (reason, tries), code
    with socket.socket() as s:  # nothing listens here: connection refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/x.png"
    with pytest.raises(ImageRejected) as caught:
        load_image(refused, **retry)
    assert caught.value.reason == "unavailable" and "(tried 3 times)" in caught.value.detail


def test_transient_is_told_from_permanent_for_s3_errors() -> None:
    """S3's throttling and 5xx as botocore raises them, and as s3fs wraps them."""
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from dinoalign.storage import is_transient

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def wrapped(cause: BaseException, code: int) -> OSError:  # s3fs.errors.translate_boto_error
        exc = OSError(code, "from s3fs")
        exc.__cause__ = cause
        return exc

    for exc in [client_error("SlowDown", 503), client_error("InternalError", 500), client_error("X", 502),
                EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="x"),
                wrapped(client_error("ServiceUnavailable", 503), errno.EBUSY), ConnectionResetError()]:
        assert is_transient(exc), exc
    for exc in [client_error("AccessDenied", 403), client_error("InvalidRange", 416), PermissionError(),
                FileNotFoundError(), ValueError("bad url"), wrapped(client_error("AccessDenied", 403), errno.EACCES)]:
        assert not is_transient(exc), exc


# ----------------------------------------------------------------------------- shapes


def test_extreme_aspect_ratio_is_refused_from_the_header() -> None:
    strip = _png((300, 14))  # 21.4 : 1
    with pytest.raises(ImageRejected, match=r"extreme_aspect_ratio: 300x14: aspect ratio 21.43 > "
                                            r"max_aspect_ratio 20"):
        decode_image(strip, **LIMITS)
    assert decode_image(strip, **LIMITS, max_aspect_ratio=22).shape == (14, 300, 3)
    assert decode_image(_png((14, 280)), **LIMITS).shape == (280, 14, 3)  # exactly 20 : 1
    with pytest.raises(ImageRejected, match="too_small"):  # too_small is checked first
        decode_image(_png((300, 10)), **LIMITS)
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        decode_image(strip, **LIMITS, max_aspect_ratio=0.5)


_MEMORY_PROBE = """
import io, resource, sys
import numpy as np
from PIL import Image
from dinoalign.data.images import decode_image, resize_crop
buffer = io.BytesIO()
Image.new("L", (1_000_000, 14), 0).save(buffer, "PNG")
data = buffer.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode_image(data, max_pixels=10**8, min_side=14, max_aspect_ratio=10**7)
out = resize_crop(image, int(sys.argv[1]), "bicubic", float(sys.argv[2]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{out.shape}|{len(data)}|{(after - before) // 1024}")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("size", "crop_pct"), [(112, 1.0), (448, 0.875)])
def test_resize_crop_memory_holds_whatever_the_aspect_ratio(size: int, crop_pct: float) -> None:
    """A 14×1,000,000 strip (a few KB of PNG) let through (max_aspect_ratio raised): the
    short-side resize would be 2.7 GB at 112 px and 43 GB at 448; resize_crop resizes only
    the crop window. In a child process under a 3 GiB address-space limit, so a regression
    fails with MemoryError instead of eating the machine."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(size), str(crop_pct)],
        capture_output=True, text=True, timeout=100, preexec_fn=limit,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, png_bytes, peak_mib = done.stdout.strip().split("|")
    assert shape == f"({size}, {size}, 3)"
    assert int(png_bytes) < 100_000
    assert int(peak_mib) < 600  # decoded strip 42 MB + PIL copies; the full resize: gigabytes


def test_window_resize_matches_the_full_resize_on_smooth_images(monkeypatch: pytest.MonkeyPatch) -> None:
    from dinoalign.data import images

    yy, xx = np.mgrid[0:900, 0:20]
    smooth = np.stack([np.sin(yy / 9.0) * 100 + 120, np.cos(xx / 4.0 + yy / 13.0) * 100 + 120,
                       yy * 0 + 77], -1).astype(np.uint8)
    for array in (smooth, smooth.transpose(1, 0, 2).copy()):
        full = resize_crop(array, 112, "bicubic")  # 45 : 1 at 112 px: the full resize
        monkeypatch.setattr(images, "_FULL_RESIZE_MAX_PIXELS", 1000)
        window = resize_crop(array, 112, "bicubic")
        monkeypatch.undo()
        assert window.shape == full.shape == (112, 112, 3)
        assert np.abs(window.astype(int) - full.astype(int)).max() <= 2


# ----------------------------------------------------------------------------- stages


@pytest.mark.timeout(120)
def test_prepare_pairs_ends_every_hostile_url_in_rejects_with_its_reason(
    server: str, repo_root: Path, tmp_path: Path
) -> None:
    from dinoalign.data.prepare import prepare_pairs, read_pairs

    expected = {
        "/normal.png": None,
        "/tarpit.png": "read_timeout",
        "/stall.png": "read_timeout",
        "/endless.png": "too_large",
        "/declared-huge.png": "too_large",
        "/strip.png": "extreme_aspect_ratio",
        "/nope.png": "missing",
    }
    table = tmp_path / "pairs.csv"
    pd.DataFrame({"image": [server + p for p in expected],
                  "caption": [f"caption {i}" for i in range(len(expected))]}).to_csv(table, index=False)
    params = load_params(repo_root / "params.yaml", [
        "data.source=pairs", f"data.pairs.path={table}", "paths.incoming=null",
        f"paths.pairs={tmp_path / 'pairs'}", f"data.read_timeout_s={DEADLINE_S}",
        "data.max_bytes=1048576", "data.read_attempts=1",
    ])
    start = time.monotonic()
    summary = prepare_pairs(params.data, params.prepare.shard_size, params.prepare.validate_images,
                            tmp_path / params.paths.pairs, tmp_path)
    assert time.monotonic() - start < 2 * (DEADLINE_S + SLACK_S)
    manifest = read_pairs(tmp_path / "pairs").to_pylist()
    rejects = {r["uid"]: r for r in pq.read_table(tmp_path / "pairs" / "rejects.parquet").to_pylist()}
    assert [r["uid"] for r in manifest] == [make_uid("pairs", server + "/normal.png")]
    assert {uid: r["reason"] for uid, r in rejects.items()} == {
        make_uid("pairs", server + p): reason for p, reason in expected.items() if reason
    }
    assert summary["rejects_by_reason"] == {"extreme_aspect_ratio": 1, "missing": 1,
                                            "read_timeout": 2, "too_large": 2}


@pytest.mark.timeout(60)
def test_segment_and_classify_image_read_is_one_line_not_a_runtime_error(
    server: str, repo_root: Path, tmp_path: Path
) -> None:
    """`dinoalign segment` on a 14×100000 image used to reach the segmentation resize
    (a 0-pixel side) and raise a RuntimeError; now the read refuses it: InferenceError,
    which the CLI prints as one line with exit 2 (cli.main)."""
    from dinoalign.errors import InferenceError
    from dinoalign.predict import read_image

    path = tmp_path / "strip.png"
    path.write_bytes(_png((100_000, 14), "L"))
    params = load_params(repo_root / "params.yaml", [f"data.read_timeout_s={DEADLINE_S}", "data.read_attempts=1"])
    for uri in (str(path), server + "/tarpit.png"):
        with pytest.raises(InferenceError) as caught:
            read_image(uri, params.data)
        assert "\n" not in str(caught.value)
    assert "extreme_aspect_ratio" in str(
        pytest.raises(InferenceError, read_image, str(path), params.data).value
    )
    assert read_image(server + "/normal.png", params.data).shape == (30, 40, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.read_timeout_s=0", "data.read_timeout_s must be > 0, got 0"),
        ("data.max_bytes=0", "data.max_bytes must be >= 1, got 0"),
        ("data.max_aspect_ratio=0.5", "data.max_aspect_ratio must be >= 1, got 0.5"),
        ("data.read_attempts=0", "data.read_attempts must be >= 1, got 0"),
        ("data.read_backoff_s=-1", "data.read_backoff_s must be >= 0 seconds, got -1"),
    ],
)
def test_bound_params_are_checked_at_load(repo_root: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_params(repo_root / "params.yaml", [override])
    params = load_params(repo_root / "params.yaml")
    assert (params.data.read_timeout_s, params.data.max_bytes, params.data.max_aspect_ratio) == (
        60, 64 * 2**20, 20
    )

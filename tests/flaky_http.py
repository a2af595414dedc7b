"""An HTTP server on 127.0.0.1 whose image URLs fail for a while or for good, for the
transient-vs-permanent read tests (importable as ``flaky_http``).

    /ok/<name>.png            a 40×30 PNG
    /flaky/<n>/<name>.png     HTTP 503 for the first n requests of that path, then the PNG
    /status/<code>/<name>.png always HTTP <code>
    /stall/<name>.png         accepts the request and never answers (until the server stops)

``server.hits[path]`` counts the requests of each path (so a test sees what was retried).
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import io
import threading
from collections.abc import Iterator

from PIL import Image


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 10)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


class _Flaky(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server: FlakyServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.hits[self.path] += 1
            hits = server.hits[self.path]
        parts = self.path.strip("/").split("/")
        if parts[0] == "stall":
            server.stopping.wait(600)  # longer than any test waits: only a bounded read ends it
            return
        if parts[0] == "ok" or (parts[0] == "flaky" and hits > int(parts[1])):
            status, body = 200, PNG
        elif parts[0] == "flaky":
            status, body = 503, b"try again later"
        else:
            status, body = int(parts[1]), b"no"
        self.send_response(status)
        self.send_header("Content-Type", "image/png" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FlakyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Flaky)
        self.hits: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def flaky_server() -> Iterator[FlakyServer]:
    server = FlakyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(10)

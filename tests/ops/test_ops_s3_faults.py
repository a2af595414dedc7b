"""S3 outages: SeaweedFS is killed (SIGKILL) during uploads.

- Each client that storage.py configures (boto3, s3fs, pyarrow) retries through a short
  outage and the upload lands intact.
- ``dvc push`` killed half-way fails with a clear error after its retries; a re-run once the
  server is back completes, and a fresh clone pulls every file with the same hash.
- ``dvc push`` retried by ``ops.dvc.push`` rides out a restart of the server.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from dinoalign.ops import services as infra
from dinoalign.ops import dvc as ops_dvc
from dinoalign.storage import boto3_client, configure_dvc_remote, fs_for, pyarrow_fs

pytestmark = pytest.mark.integration

BUCKET = "faults"


class Server:
    """A SeaweedFS that can be killed and restarted on the same ports and data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.access, self.secret = "faults-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        self.svc = infra.start_seaweedfs(data_dir, self.access, self.secret)

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.svc.url, "AWS_ACCESS_KEY_ID": self.access,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def kill(self) -> None:
        os.killpg(self.svc.pid, signal.SIGKILL)
        self.svc.stop()  # reaps the killed process group
        assert not self.svc.alive()

    def restart(self) -> None:
        self.svc = infra.start_seaweedfs(self.data_dir, self.access, self.secret, ports=self.svc.ports)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield srv
    finally:
        srv.svc.stop()


@pytest.fixture
def s3_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {**server.env, "AWS_MAX_ATTEMPTS": "10"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if not server.svc.alive():
        server.restart()
    infra.ensure_bucket(BUCKET)
    return env


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _put_boto3(key: str, data: bytes) -> None:
    boto3_client().put_object(Bucket=BUCKET, Key=key, Body=data)


def _put_s3fs(key: str, data: bytes) -> None:
    fs, path = fs_for(f"s3://{BUCKET}/{key}")
    fs.invalidate_cache()
    with fs.open(path, "wb") as f:
        f.write(data)


def _put_pyarrow(key: str, data: bytes) -> None:
    fs, path = pyarrow_fs(f"s3://{BUCKET}/{key}")
    with fs.open_output_stream(path) as f:
        f.write(data)


@pytest.mark.parametrize("put", [_put_boto3, _put_s3fs, _put_pyarrow], ids=["boto3", "s3fs", "pyarrow"])
def test_client_retries_ride_out_a_restart(server: Server, s3_env: dict[str, str], put: Callable) -> None:
    before = secrets.token_bytes(50_000)
    _put_boto3(f"{put.__name__}/before.bin", before)
    server.kill()
    payload = secrets.token_bytes(300_000)
    thread, box = _in_thread(lambda: put(f"{put.__name__}/during.bin", payload))
    time.sleep(1.5)
    assert thread.is_alive(), f"the upload gave up while the server was down: {box.get('error')!r}"
    server.restart()
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    s3 = boto3_client()
    assert s3.get_object(Bucket=BUCKET, Key=f"{put.__name__}/during.bin")["Body"].read() == payload
    assert s3.get_object(Bucket=BUCKET, Key=f"{put.__name__}/before.bin")["Body"].read() == before


def _md5s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def _dvc_objects() -> int:
    pages = boto3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="dvc/")
    return sum(len(page.get("Contents", [])) for page in pages)


def test_dvc_push_killed_midway_fails_clearly_then_completes(server: Server, s3_env: dict[str, str],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    (root / "features").mkdir(parents=True)
    rng = secrets.SystemRandom()
    for i in range(600):  # many objects: the kill lands while the push is under way
        (root / "features" / f"part-{i:05d}.bin").write_bytes(rng.randbytes(2048))
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    configure_dvc_remote(root, "stack", f"s3://{BUCKET}/dvc", default=True)
    local = root / ".dvc" / "config.local"  # holds the S3 secret: owner-only (issue #19)
    assert local.stat().st_mode & 0o777 == 0o600 and "secret_access_key" in local.read_text()
    ops_dvc.dvc(root, "add", "-q", "features")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "features")
    expected = _md5s(root / "features")

    # 1. killed mid-way and not back: a clear error after the retries, some objects already up
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no per-request retries: fail fast while the server is gone
    thread, box = _in_thread(lambda: ops_dvc.push(root, attempts=2, backoff=0.5))
    deadline = time.monotonic() + 120
    while _dvc_objects() < 50 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    server.kill()
    thread.join(timeout=300)
    error = box.get("error")
    assert isinstance(error, ops_dvc.DvcError), f"push did not fail: {box}"
    message = str(error)
    assert "failed 2 time(s)" in message and f"s3://{BUCKET}/dvc via {server.svc.url}" in message
    assert "Nothing is lost" in message and "ERROR" in message

    # 2. the server comes back during the retries of the next push: it completes
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    thread, box = _in_thread(lambda: ops_dvc.push(root, attempts=4, backoff=2.0))
    time.sleep(1.0)
    server.restart()
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    resent = int(box["value"].split(" files pushed")[0].split()[-1])
    assert 0 < resent <= len(expected) + 1 - 50  # only what was missing went up (+1: the .dir listing)
    assert "in sync" in ops_dvc.dvc(root, "status", "-c")

    # 3. nothing lost: a fresh clone pulls every file with the same hash
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    configure_dvc_remote(clone, "stack", f"s3://{BUCKET}/dvc", default=True)
    ops_dvc.dvc(clone, "pull", "-q")
    assert _md5s(clone / "features") == expected

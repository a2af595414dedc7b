"""The local stack: a real SeaweedFS (S3 API), a real ``mlflow server`` and a Ray head,
bound to 127.0.0.1 on free ports, started as their own process groups and stopped by PID.

Used by ``dinoalign infra up|down|status`` and by the integration tests. State (PIDs,
ports, URLs, data dirs) lives in ``infra/run/stack.json``. Credentials come from the
environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) and are written only to
SeaweedFS's own identity file (mode 600), never to params, logs or MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name!r} not found next to {sys.executable} or on PATH; run `make env`")
    return found


@dataclass
class Service:
    """One started server process."""

    name: str
    pid: int
    url: str
    log: str
    ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the service's process group, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # not our child: poll the pid
                    done = 0 if self.alive() else self.pid
                if done == self.pid or not self.alive():
                    return
                time.sleep(0.1)


def _spawn(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    return proc.pid


def wait_http(url: str, timeout: float, ok: tuple[int, ...] = (200,), service: Service | None = None) -> None:
    """Poll ``url`` until it answers with one of ``ok`` (any HTTP answer if ok is empty)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise RuntimeError(f"{service.name} exited during start; see {service.log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if not ok or r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if not ok or e.code in ok:
                return
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last})")


# ----------------------------------------------------------------------------- SeaweedFS
def start_seaweedfs(data_dir: Path, access_key: str, secret_key: str, s3_port: int | None = None) -> Service:
    """``weed mini`` with every port chosen free on 127.0.0.1, telemetry off, and an S3
    identity that requires the given keys (without one the store is open to anyone)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ident = data_dir / "s3.json"
    ident.write_text(json.dumps({"identities": [{
        "name": "dinoalign", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ident.chmod(0o600)
    ports = {k: free_port() for k in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                                       "s3_grpc", "admin", "admin_grpc")}
    ports["s3"] = s3_port or free_port()
    cmd = [
        _bin("weed"), "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={ident}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-admin.ui=false", f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}",
        "-metricsPort=0",
    ]
    log = data_dir / "weed.log"
    svc = Service("seaweedfs", _spawn("seaweedfs", cmd, log), f"http://127.0.0.1:{ports['s3']}", str(log), ports)
    try:  # an unauthenticated GET answers 403 once the S3 gateway is up
        wait_http(svc.url + "/", timeout=60, ok=(), service=svc)
    except Exception:
        svc.stop()
        raise
    return svc


def ensure_bucket(bucket: str) -> None:
    from dinoalign.storage import boto3_client

    s3 = boto3_client()
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        s3.create_bucket(Bucket=bucket)


# ----------------------------------------------------------------------------- MLflow
def start_mlflow(backend_uri: str, artifacts_destination: str, log_dir: Path, port: int | None = None) -> Service:
    """``mlflow server`` with proxied artifacts (clients need no S3 keys), jobs off."""
    port = port or free_port()
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    from dinoalign.storage import s3_settings

    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3_settings().endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_settings().endpoint_url
    log = log_dir / "mlflow.log"
    svc = Service("mlflow", _spawn("mlflow", cmd, log, env), f"http://127.0.0.1:{port}", str(log), {"http": port})
    try:
        wait_http(svc.url + "/health", timeout=90, service=svc)
    except Exception:
        svc.stop()
        raise
    return svc


# ----------------------------------------------------------------------------- Ray
def start_ray_head(log_dir: Path, num_cpus: int | None = None) -> Service:
    """``ray start --head --block`` on 127.0.0.1 (its own process group: stopping the
    group stops raylet, GCS and workers)."""
    port = free_port()
    cmd = [_bin("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=false", "--disable-usage-stats",
           f"--num-cpus={num_cpus or os.cpu_count()}"]
    log = log_dir / "ray.log"
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    svc = Service("ray", _spawn("ray", cmd, log, env), f"127.0.0.1:{port}", str(log), {"gcs": port})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if not svc.alive():
            raise RuntimeError(f"ray head exited during start; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return svc
        except OSError:
            time.sleep(0.3)
    svc.stop()
    raise TimeoutError(f"ray head did not listen on {port} within 90s; see {log}")


# ----------------------------------------------------------------------------- state
def save_state(path: Path, services: list[Service], extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"services": [asdict(s) for s in services], **extra}, indent=2) + "\n")


def load_state(path: Path) -> tuple[list[Service], dict]:
    if not path.exists():
        return [], {}
    raw = json.loads(path.read_text())
    return [Service(**s) for s in raw.pop("services", [])], raw

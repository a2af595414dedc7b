"""The local stack lets no one in without its credentials (issue #19 part 3): a real
`dinoalign infra up` (SeaweedFS, mlflow server, Ray head on 127.0.0.1), then every TCP
port its processes listen on is tried the way another user of the machine would:

- SeaweedFS: the S3 API without keys or with wrong ones is refused; the master, volume,
  filer and admin HTTP ports refuse to read, write or delete an object (no JWT), and the
  gRPC ports refuse a client without a certificate of the stack's own CA (`weed shell`
  can neither list nor remove); the object is intact afterwards;
- MLflow: the REST API, the artifact proxy and the UI answer 401 without the admin's
  credentials or with a wrong password, and work with them;
- Ray: a driver without the token is refused;
- every file that holds a secret is mode 600, and no secret is in a process command line,
  the state file, a log or MLflow params.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from dinoalign.ops import services as infra
from dinoalign.ops.stack import CREDENTIALS_FILE, ENV_FILE, STATE_FILE, read_env_file, stack_env
from dinoalign.storage import S3Settings, boto3_client

from ops_checkout import infra_cli, infra_up

pytestmark = pytest.mark.integration

BUCKET = "dinoalign"
KEY = "private/secret-object.bin"
BODY = b"only-with-the-keys:" + os.urandom(64).hex().encode() * 4000  # > 256 KB: stored in volume chunks



def _request(method: str, url: str, data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int | None, bytes]:
    """(status, body) of one plain HTTP request; status None when nothing answers in HTTP."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None, b""


def _listening_ports(pid: int) -> dict[int, int]:
    """port -> pid, for every TCP port the process ``pid`` and its descendants listen on."""
    root = psutil.Process(pid)
    found: dict[int, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            found.update({c.laddr.port: proc.pid for c in proc.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN})
        except psutil.NoSuchProcess:
            pass
    return found


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(900)
def test_every_port_of_the_stack_refuses_a_client_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    root, run, services = infra_up(tmp_path, env)
    try:
        stack = stack_env(root)
        creds = read_env_file(run / CREDENTIALS_FILE)
        secrets_ = {k: v for k, v in creds.items() if k in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")}
        assert set(secrets_) == {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}
        assert stack["MLFLOW_TRACKING_PASSWORD"] == creds["MLFLOW_TRACKING_PASSWORD"]  # stack.env sources it

        weed, mlflow_svc = services["seaweedfs"], services["mlflow"]
        listening = {port: name for name, svc in services.items() for port in _listening_ports(svc.pid)}
        # every port the stack opens is one this test tries (Ray's workers open ports of their own)
        assert {p for p, n in listening.items() if n == "seaweedfs"} == set(weed.ports.values()) - {0}
        assert {p for p, n in listening.items() if n == "mlflow"} == {mlflow_svc.ports["http"]}

        # ---- SeaweedFS: S3 with the keys is the way in
        s3 = boto3_client(settings=S3Settings(weed.url, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"],
                                              "us-east-1"))
        s3.put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
        assert s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY

        # S3 without keys, and with a wrong secret: read, write, delete refused
        for method, data in (("GET", None), ("PUT", b"overwritten"), ("DELETE", None)):
            status, _ = _request(method, f"{weed.url}/{BUCKET}/{KEY}", data)
            assert status == 403, (method, status)
        status, _ = _request("GET", f"{weed.url}/{BUCKET}?list-type=2")
        assert status == 403
        wrong = boto3_client(settings=S3Settings(weed.url, creds["AWS_ACCESS_KEY_ID"], "wrong-secret-key-0000",
                                                 "us-east-1", max_attempts=1))
        with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
            wrong.get_object(Bucket=BUCKET, Key=KEY)

        # the master, volume, filer and admin HTTP ports: no read, write or delete of data
        fid = _chunk_fid(weed, run / "seaweedfs")
        for name in ("master", "volume", "filer", "admin"):
            base = f"http://127.0.0.1:{weed.ports[name]}"
            paths = [f"/buckets/{BUCKET}/{KEY}", f"/buckets/{BUCKET}/", f"/{fid}", "/"]
            for path in paths:
                for method, data in (("GET", None), ("PUT", b"evil"), ("POST", b"evil"), ("DELETE", None)):
                    if (name, path) == ("master", "/"):
                        continue  # the master's status page, whatever the method (below)
                    status, body = _request(method, base + path, data)
                    assert status is None or not 200 <= status < 400, (name, method, path, status, body[:200])
            # mutations the master's HTTP API offers (collection delete, file id assignment, upload)
            for path in (f"/col/delete?collection={BUCKET}", "/dir/assign", "/submit", "/vol/grow?count=1",
                         "/vol/vacuum"):
                status, body = _request("GET", base + path)
                assert status is None or not 200 <= status < 400, (name, path, status, body[:200])
        # what still answers 200 without a JWT are status pages without data (the master's
        # topology page, volume /status, admin /health): none of them hands out object bytes
        for name, path in (("master", "/"), ("volume", "/status"), ("admin", "/health")):
            status, body = _request("GET", f"http://127.0.0.1:{weed.ports[name]}{path}")
            assert BODY[:40] not in body and KEY.encode() not in body, (name, path)

        # gRPC ports: mTLS with the stack's own CA; `weed shell` without the certificate
        # (run outside the data folder, so it does not find security.toml) gets nowhere
        shell = subprocess.run(
            ["timeout", "20", infra._bin("weed"), "shell",
             f"-master=127.0.0.1:{weed.ports['master']}.{weed.ports['master_grpc']}",
             f"-filer=127.0.0.1:{weed.ports['filer']}.{weed.ports['filer_grpc']}"],
            input=f"fs.ls -l /buckets/{BUCKET}/private\nfs.rm /buckets/{BUCKET}/{KEY}\nvolume.list\n",
            capture_output=True, text=True, cwd=tmp_path, env=env)
        assert "secret-object.bin" not in shell.stdout and "Collection:" not in shell.stdout, shell.stdout[-2000:]
        for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc", "admin_grpc"):
            assert _tls_refuses_without_certificate(weed.ports[name]), name
        assert s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY  # nothing changed it

        # ---- MLflow: basic auth on everything but /health and the UI's static files
        url = mlflow_svc.url
        user, password = creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"]
        good = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(f"{user}:wrong-password".encode()).decode()}
        create = ("POST", "/api/2.0/mlflow/experiments/create", b'{"name": "intruder"}')
        search = ("GET", "/api/2.0/mlflow/experiments/search?max_results=10", None)
        upload = ("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/intruder.txt", b"x")
        for method, path, data in (create, search, upload, ("GET", "/", None), ("GET", "/signup", None)):
            for headers in ({}, bad):
                status, _ = _request(method, url + path, data, {"Content-Type": "application/json", **headers})
                assert status == 401, (method, path, bool(headers), status)
        assert _request("GET", url + "/health")[0] == 200
        status, body = _request(search[0], url + search[1], search[2], good)
        assert status == 200 and b"intruder" not in body
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": url}
        with_creds = subprocess.run([sys.executable, "-c", _MLFLOW_CLIENT], capture_output=True, text=True,
                                    env={**mlflow_env, "MLFLOW_TRACKING_USERNAME": user,
                                         "MLFLOW_TRACKING_PASSWORD": password}, timeout=300)
        assert with_creds.returncode == 0, with_creds.stderr[-2000:]
        without = subprocess.run([sys.executable, "-c", _MLFLOW_CLIENT], capture_output=True, text=True,
                                 env=mlflow_env, timeout=300)
        assert without.returncode != 0 and "401" in without.stderr, without.stderr[-2000:]

        # ---- Ray: a driver without the token is refused
        if "ray" in services:
            ray_env = {**env, "RAY_ADDRESS": services["ray"].url, "RAY_USAGE_STATS_ENABLED": "0"}
            # refused: it exits with an error or keeps retrying (Ray 2.60 without the token
            # retries the GCS for minutes); either way it never reaches the cluster
            try:
                driver = subprocess.run([sys.executable, "-c",
                                         "import ray; ray.init(); print('IN', ray.cluster_resources())"],
                                        capture_output=True, text=True, env=ray_env, timeout=45)
                assert driver.returncode != 0 and "IN" not in driver.stdout, driver.stdout[-1000:]
            except subprocess.TimeoutExpired as e:
                assert b"IN" not in (e.stdout or b""), e.stdout

        # ---- secrets: files 600, nowhere else
        holders = [run / CREDENTIALS_FILE, run / ENV_FILE, run / "seaweedfs" / "s3.json",
                   run / "seaweedfs" / infra.SEAWEEDFS_SECURITY, run / "mlflow" / infra.MLFLOW_AUTH_INI,
                   run / "mlflow" / infra.MLFLOW_AUTH_DB, run / "ray" / "auth_token", root / ".dvc" / "config.local",
                   *(run / "seaweedfs" / infra.SEAWEEDFS_TLS).iterdir()]
        assert {str(p): _mode(p) for p in holders} == {str(p): 0o600 for p in holders}
        assert _mode(run / "seaweedfs") == _mode(run / "seaweedfs" / infra.SEAWEEDFS_TLS) == 0o700
        for name, svc in services.items():
            for proc in [psutil.Process(svc.pid), *psutil.Process(svc.pid).children(recursive=True)]:
                try:
                    argv = " ".join(proc.cmdline())
                except psutil.NoSuchProcess:
                    continue
                assert not any(s in argv for s in secrets_.values()), (name, proc.pid)
        logs = [Path(s.log) for s in services.values()] + list((run / "ray").glob("*.log"))
        for path in [run / STATE_FILE, run / ENV_FILE, *logs]:
            text = path.read_text(errors="replace")
            assert not any(s in text for s in secrets_.values()), path
        assert "intruder" not in with_creds.stdout
    finally:
        stopped = infra_cli(root, "down", env=env)
    assert stopped.returncode == 0, stopped.stderr[-2000:]


_MLFLOW_CLIENT = r"""
import mlflow
mlflow.set_experiment("with-credentials")
with mlflow.start_run() as run:
    mlflow.log_param("x", 1)
    mlflow.log_text("hello", "notes/hello.txt")
client = mlflow.MlflowClient()
assert client.get_run(run.info.run_id).data.params == {"x": "1"}
assert client.download_artifacts(run.info.run_id, "notes/hello.txt")
print("ok", run.info.run_id)
"""


def _chunk_fid(weed: infra.Service, data_dir: Path) -> str:
    """A file id of the object's chunks, as the stack's own (certified) `weed shell` in
    the data folder sees it: what an intruder would try on the volume server."""
    shell = subprocess.run(
        [infra._bin("weed"), "shell", f"-master=127.0.0.1:{weed.ports['master']}.{weed.ports['master_grpc']}",
         f"-filer=127.0.0.1:{weed.ports['filer']}.{weed.ports['filer_grpc']}"],
        input=f"fs.meta.cat /buckets/{BUCKET}/{KEY}\n", capture_output=True, text=True, cwd=data_dir, timeout=120)
    fids = [line.split('"')[3] for line in shell.stdout.splitlines() if '"fileId"' in line]
    assert fids, shell.stdout[-2000:] + shell.stderr[-2000:]
    return fids[0]


def _tls_refuses_without_certificate(port: int) -> bool:
    """A gRPC port that requires a client certificate: a TLS client without one gets no
    answer to an HTTP/2 request (the handshake or the first read fails); a plaintext
    gRPC server would not speak TLS at all (also a failure here, so check that first)."""
    import socket
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:  # the server speaks TLS ...
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                data = tls.recv(1024)  # ... and refuses a client without a certificate
                return data == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return _speaks_tls(port)


def _speaks_tls(port: int) -> bool:
    """True when the server at ``port`` starts a TLS handshake (asks for a certificate)."""
    import socket
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, do_handshake_on_connect=False) as tls:
                try:
                    tls.do_handshake()
                except ssl.SSLError as e:
                    return "CERTIFICATE_REQUIRED" in str(e) or "alert" in str(e).lower()
                return True
    except OSError:
        return False

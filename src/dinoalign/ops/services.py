"""Server processes of the local stack: a real SeaweedFS (S3 API), a real ``mlflow server``
(sqlite or a private PostgreSQL), and a Ray head, bound to 127.0.0.1 on free ports, each
started as its own process group and stopped by PID.

These are the building blocks; :mod:`dinoalign.ops.stack` assembles them into
``dinoalign infra up|down|status`` and the integration tests use them directly.

Stopping is by PID only (never by process name): a :class:`Service` records the PID and
the process start time of its leader, so a recycled PID is never signalled, and
:meth:`Service.stop` signals the leader's process group plus every descendant (Ray workers
run in process groups of their own). Credentials go only to SeaweedFS's identity file
(mode 600) and to the server processes' environments, never to params, logs or MLflow.
"""

from __future__ import annotations

import json
import os
import secrets
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
from typing import Any, Callable

import psutil

from dinoalign.errors import ConfigError, StackError
from dinoalign.storage import boto3_client, write_atomic


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found next to {sys.executable} or on PATH; run `make env`")
    return found


def _started_at(pid: int) -> float:
    return psutil.Process(pid).create_time()


@dataclass
class Service:
    """One started server process: its leader ``pid`` and that process's start time."""

    name: str
    pid: int
    url: str
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # psutil create_time of ``pid``: guards against a recycled PID
    grace: float = 15.0  # seconds between SIGTERM and SIGKILL

    def process(self) -> psutil.Process | None:
        """The leader process, or None when it is gone (or its PID now names another one)."""
        try:
            proc = psutil.Process(self.pid)
            if self.started and abs(proc.create_time() - self.started) > 0.01:
                return None
            return None if proc.status() == psutil.STATUS_ZOMBIE else proc
        except psutil.NoSuchProcess:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def stop(self) -> None:
        """SIGTERM the process group and every descendant, SIGKILL what is left after
        ``grace`` seconds, and reap the leader when it is our child."""
        leader = self.process()
        if leader is None:
            self._reap()
            return
        try:
            procs = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = [leader]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            self._reap()
            _, procs = psutil.wait_procs(procs, timeout=self.grace if sig == signal.SIGTERM else 10)
            self._reap()
            if not procs:
                return
        raise RuntimeError(f"{self.name}: processes {[p.pid for p in procs]} survived SIGKILL")

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (``infra down`` from another shell)
            pass


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
           umask: int = -1) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True, umask=umask)
    return proc.pid, _started_at(proc.pid)


def write_private(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to a file only its owner can read or write (created 600, never wider,
    whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


def wait_http(url: str, timeout: float, ok: tuple[int, ...] = (200,), service: Service | None = None) -> None:
    """Poll ``url`` until it answers with one of ``ok`` (any HTTP answer if ok is empty)."""
    deadline = time.monotonic() + timeout
    code: int | None = None
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise StackError(f"{service.name} exited during start; see {service.log}")
        code = http_status(url)
        if code is not None and (not ok or code in ok):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer with {ok or 'anything'} within {timeout:.0f}s (last status: {code})")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_port(svc: Service, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise StackError(f"{svc.name} exited during start; see {svc.log}")
        if port_open(port):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{svc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s; see {svc.log}")


def _started(svc: Service, wait: Callable[[], None]) -> Service:
    """Run the readiness check ``wait()``; stop the service if it fails."""
    try:
        wait()
    except BaseException:
        svc.stop()
        raise
    return svc


# ----------------------------------------------------------------------------- SeaweedFS
SEAWEEDFS_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
                   "admin", "admin_grpc")


SEAWEEDFS_SECURITY = "security.toml"
SEAWEEDFS_TLS = "tls"
# the gRPC servers of `weed mini` (and what its processes dial with): each gets the mTLS pair
SEAWEEDFS_GRPC_ROLES = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq",
                        "client")


def start_seaweedfs(data_dir: Path, access_key: str, secret_key: str, ports: dict[str, int] | None = None) -> Service:
    """``weed mini`` with every port free on 127.0.0.1 (or the given ``ports``, to restart
    on the same data and address), telemetry off, and an S3 identity that requires the
    given keys (without one the store is open to anyone).

    The S3 API with those keys is the only way in: ``security.toml`` (mode 600, in
    ``data_dir``, read from weed's working directory; fresh keys at every start) makes the
    filer's HTTP API refuse reads and writes without a JWT signed by the S3 gateway, the
    volume servers refuse reads and writes without one from the master or filer, and every
    gRPC port (and unix socket) refuse a client without a certificate of the stack's own CA
    (mTLS); the admin server needs a random password, volume and filer UIs are off. The
    master's HTTP API still answers status and file-id requests, which give no access
    to data. The process runs with umask 077 (its files and unix sockets owner-only)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    ident = data_dir / "s3.json"
    write_private(ident, json.dumps({"identities": [{
        "name": "dinoalign", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    write_seaweedfs_security(data_dir)
    ports = dict(ports) if ports else {k: free_port() for k in SEAWEEDFS_PORTS}
    cmd = [
        _bin("weed"), "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={ident}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-admin.ui=false", f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}",
        "-metricsPort=0", "-filer.disableDirListing", "-filer.exposeDirectoryData=false", "-disableHttp",
    ]
    log = data_dir / "weed.log"
    # weed reads ./security.toml first: its working directory is data_dir
    pid, started = _spawn(cmd, log, cwd=data_dir, umask=0o077)
    svc = Service("seaweedfs", pid, f"http://127.0.0.1:{ports['s3']}", str(log), ports, started)
    # an unauthenticated GET answers 403 once the S3 gateway is up
    return _started(svc, lambda: wait_http(svc.url + "/", timeout=60, ok=(), service=svc))


def write_seaweedfs_security(data_dir: Path) -> Path:
    """``data_dir/security.toml`` (mode 600) with fresh random JWT signing keys (volume
    writes and reads, filer writes and reads), an admin password, and the mTLS files of a
    fresh CA under ``data_dir/tls`` (the CA's key is not kept: no other certificate can be
    made for it)."""
    tls = data_dir / SEAWEEDFS_TLS
    ca, cert, key = write_tls_pair(tls)
    q = json.dumps  # a TOML basic string is a JSON string
    lines = ["# written by dinoalign (ops/services.py) at every start; keys are random per start", ""]
    for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
        lines += [f"[{section}]", f"key = {q(secrets.token_urlsafe(32))}", "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", "",
              "[admin]", 'user = "admin"', f"password = {q(secrets.token_urlsafe(24))}", "",
              "[grpc]", f"ca = {q(str(ca))}", ""]
    for role in SEAWEEDFS_GRPC_ROLES:
        lines += [f"[grpc.{role}]", f"cert = {q(str(cert))}", f"key = {q(str(key))}", ""]
    return write_private(data_dir / SEAWEEDFS_SECURITY, "\n".join(lines))


def write_tls_pair(folder: Path) -> tuple[Path, Path, Path]:
    """A fresh self-signed CA and one certificate it signs for 127.0.0.1 (server and
    client use), as ``ca.crt``, ``node.crt``, ``node.key`` (all mode 600) in ``folder``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dinoalign stack CA {secrets.token_hex(4)}")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    node_cert = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dinoalign-seaweedfs")]))
                 .issuer_name(ca_name).public_key(node_key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                 .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return (write_private(folder / "ca.crt", ca_cert.public_bytes(pem)),
            write_private(folder / "node.crt", node_cert.public_bytes(pem)),
            write_private(folder / "node.key", node_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))


def ensure_bucket(bucket: str, settings: Any = None) -> None:
    """Create ``bucket`` unless it exists (S3 bucket names need 3-63 characters)."""
    from botocore.exceptions import ClientError

    if not 3 <= len(bucket) <= 63:
        raise ConfigError(f"bucket name {bucket!r}: S3 needs 3 to 63 characters")
    s3 = boto3_client(settings=settings)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        s3.create_bucket(Bucket=bucket)


# ----------------------------------------------------------------------------- PostgreSQL
PG_PASSFILE = "pgpass"


def start_postgres(data_dir: Path, port: int | None = None, database: str = "mlflow") -> tuple[Service, str]:
    """A private PostgreSQL cluster (Debian's server binaries) in ``data_dir`` on
    127.0.0.1 with password (SCRAM-SHA-256) auth for every connection; returns the service
    and the ``postgresql://`` URI of ``database``. The password is generated at ``initdb``
    and kept in ``data_dir/pgpass`` (libpq's password file, mode 600); the URI names that
    file (``?passfile=``), never the password, so it can sit on a command line (the mlflow
    server's). PostgreSQL refuses to run as root: as root the cluster belongs to the
    ``postgres`` user and runs through ``runuser``."""
    pg_bin = Path(os.environ.get("DINOALIGN_PG_BIN", "/usr/lib/postgresql/15/bin"))
    if not (pg_bin / "postgres").exists():
        raise StackError(f"PostgreSQL server binaries not found in {pg_bin} (apt-get install postgresql, "
                                "or set DINOALIGN_PG_BIN)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    user = "postgres" if as_user else psutil.Process().username()
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster, sockets, passfile = data_dir / "cluster", data_dir / "sockets", data_dir / PG_PASSFILE
    sockets.mkdir(exist_ok=True)
    if as_user:
        shutil.chown(data_dir, "postgres")
        shutil.chown(sockets, "postgres")
    if not (cluster / "PG_VERSION").exists():
        password = secrets.token_urlsafe(32)
        pwfile = write_private(data_dir / "initdb.pw", password)  # initdb reads it; gone right after
        if as_user:
            shutil.chown(pwfile, "postgres")
        try:
            done = subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(cluster), "-U", user,
                                   "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"],
                                  capture_output=True, text=True)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"initdb of {cluster} as {user!r} failed (that user must be able to reach the "
                               f"folder): {done.stderr.strip()[-500:]}")
        write_private(passfile, f"127.0.0.1:*:*:{user}:{password}\n")
    elif not passfile.exists():
        raise StackError(f"{cluster} was created without a password by an earlier dinoalign (trust auth): "
                         f"dump what you need (pg_dump), then remove {data_dir} and run `infra up` again")
    port = port or free_port()
    log = data_dir / "postgres.log"
    pid, started = _spawn([*as_user, str(pg_bin / "postgres"), "-D", str(cluster), "-p", str(port),
                           "-h", "127.0.0.1", "-k", str(sockets)], log)
    svc = Service("postgres", pid, f"127.0.0.1:{port}", str(log), {"postgres": port}, started)
    uri = f"postgresql://{user}@127.0.0.1:{port}/{database}?passfile={passfile}"

    def ready() -> None:
        _wait_port(svc, port, 60)
        probe = [str(pg_bin / "psql"), uri.replace(f"/{database}?", "/postgres?"), "-tAc"]
        exists = subprocess.run([*probe, f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
                                check=True, capture_output=True, text=True).stdout.strip()
        if exists != "1":
            subprocess.run([*probe, f'CREATE DATABASE "{database}"'], check=True, capture_output=True, text=True)

    _started(svc, ready)
    return svc, uri


# ----------------------------------------------------------------------------- MLflow
MLFLOW_AUTH_INI = "basic_auth.ini"
MLFLOW_AUTH_DB = "basic_auth.db"


@dataclass(frozen=True)
class MlflowAuth:
    """The admin of an ``mlflow server --app-name basic-auth``: the only user; clients
    present it as ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``."""

    username: str
    password: str

    def __repr__(self) -> str:  # never the password in a log or a traceback
        return f"MlflowAuth(username={self.username!r}, password=***)"

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def start_mlflow(backend_uri: str, artifacts_destination: str, log_dir: Path, env: dict[str, str] | None = None,
                 port: int | None = None, auth: MlflowAuth | None = None) -> Service:
    """``mlflow server`` with proxied artifacts (clients need no S3 keys), jobs off.

    ``env`` reaches only the server: for an ``s3://`` destination it must hold
    ``MLFLOW_S3_ENDPOINT_URL`` and the keys (:func:`dinoalign.storage.mlflow_server_env`).
    ``auth``: MLflow's basic-auth app (:func:`mlflow_auth_env`): every request but
    ``/health``, the server-info route and the UI's static files needs the admin's
    credentials (401 without them)."""
    if backend_uri.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401  (mlflow's SQLAlchemy dialect for postgresql://)
        except ImportError:
            raise StackError("an mlflow server on PostgreSQL needs the psycopg[binary] package in this "
                               "environment") from None
    port = port or free_port()
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    server_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    if auth is not None:
        cmd += ["--app-name", "basic-auth"]
        server_env.update(mlflow_auth_env(log_dir, auth))
    log = log_dir / "mlflow.log"
    # umask 077: the user store (password hashes) and what else the server writes are owner-only
    pid, started = _spawn(cmd, log, server_env, umask=0o077 if auth is not None else -1)
    svc = Service("mlflow", pid, f"http://127.0.0.1:{port}", str(log), {"http": port}, started)
    return _started(svc, lambda: wait_http(svc.url + "/health", timeout=120, service=svc))


def mlflow_auth_env(folder: Path, auth: MlflowAuth) -> dict[str, str]:
    """The environment of an ``mlflow server --app-name basic-auth`` whose only user is
    ``auth`` (an admin): ``folder/basic_auth.ini`` (mode 600; no secret in it) with no
    permission for anyone else and the user store ``folder/basic_auth.db``, rebuilt at
    every start so that the credentials given are the ones that work; the admin's
    password and a random CSRF key only in the environment (never argv)."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / MLFLOW_AUTH_DB
    db.unlink(missing_ok=True)
    ini = write_private(folder / MLFLOW_AUTH_INI, "\n".join([
        "# written by dinoalign (ops/services.py) at every start of the stack's mlflow server",
        "[mlflow]", "default_permission = NO_PERMISSIONS", f"database_uri = sqlite:///{db}",
        f"admin_username = {auth.username}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false", ""]))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": auth.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": auth.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32)}


def start_model_server(model_uri: str, log_dir: Path, env: dict[str, str] | None = None,
                       port: int | None = None, timeout: float = 240) -> Service:
    """``mlflow models serve -m <model_uri> --env-manager local`` on 127.0.0.1 (one worker),
    ready once ``/ping`` answers 200. ``env`` reaches only the server: ``MLFLOW_TRACKING_URI``
    for a ``models:/`` URI, ``DINOALIGN_IMAGE_ROOTS`` to let requests name image files.
    mlflow looks uvicorn up on PATH: this interpreter's folder goes first."""
    port = port or free_port()
    cmd = [_bin("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = log_dir / "model-server.log"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    pid, started = _spawn(cmd, log, {"PATH": path, **(env or {})})
    svc = Service("model-server", pid, f"http://127.0.0.1:{port}", str(log), {"http": port}, started)
    return _started(svc, lambda: wait_http(svc.url + "/ping", timeout=timeout, service=svc))


# ----------------------------------------------------------------------------- Ray
RAY_PORTS = ("gcs", "node_manager", "object_manager", "dashboard", "dashboard_agent_listen",
             "dashboard_agent_grpc", "runtime_env_agent", "metrics_export")


def ray_client_env(token_path: Path) -> dict[str, str]:
    """What a process needs to join a token-authenticated Ray (Ray >= 2.60 turns token
    auth on by default), besides ``RAY_ADDRESS``."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def write_ray_token(path: Path) -> Path:
    """A fresh random Ray auth token in a mode-600 file (kept when it already exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def start_ray_head(log_dir: Path, token_path: Path, temp_dir: Path, num_cpus: int | None = None,
                   env: dict[str, str] | None = None, cluster: bool = False,
                   resources: dict[str, float] | None = None) -> Service:
    """``ray start --head --block`` on 127.0.0.1 with token auth, every port chosen free
    (defaults such as 52365 for the dashboard agent, or the worker ports from 10002 up,
    collide with any other Ray on the machine) and its own ``temp_dir`` (Ray's default
    /tmp/ray is shared with every other Ray of the machine). ``temp_dir`` must be a short
    path: Ray puts unix sockets under it. ``env`` adds to the head's environment (the S3
    settings that Ray Train and Ray Data workers inherit). ``cluster``: let worker nodes
    join (:func:`start_ray_worker`); Ray's multi-node mode listens on every interface (see
    :func:`loopback_only`). ``resources``: custom resources the head advertises."""
    return _start_ray_node("ray", log_dir, token_path, num_cpus, env, cluster, resources, head_temp_dir=temp_dir)


def start_ray_worker(name: str, head: Service, log_dir: Path, token_path: Path, num_cpus: int,
                     env: dict[str, str] | None = None, resources: dict[str, float] | None = None) -> Service:
    """A worker node: ``ray start --address=<head> --block`` on 127.0.0.1, its own raylet
    and object store, every port chosen free, token auth, ``resources`` advertised (a
    test forces placement with them). Logs to ``log_dir/<name>.log``."""
    return _start_ray_node(name, log_dir, token_path, num_cpus, env, True, resources, head_address=head.url)


def _start_ray_node(name: str, log_dir: Path, token_path: Path, num_cpus: int | None, env: dict[str, str] | None,
                    cluster: bool, resources: dict[str, float] | None, head_temp_dir: Path | None = None,
                    head_address: str | None = None) -> Service:
    log = log_dir / f"{name}.log"
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        offset = log.stat().st_size if log.exists() else 0  # this attempt's lines only
        svc = _start_ray_node_once(name, log, token_path, num_cpus, env, cluster, resources, head_temp_dir,
                                   head_address)
        try:
            return _started(svc, lambda: _wait_ray(svc, log, offset))
        except StackError:
            # `ray start` gives the raylet a fixed 30 s to register with the GCS (ray
            # _private/node.py); on an overloaded machine (two stacks starting beside a
            # training run) it misses that and exits: try again on fresh ports.
            missed = RAY_REGISTRATION_TIMEOUT in log.read_bytes()[offset:].decode(errors="replace")
            _kill_group(svc.pid)
            if attempt == RAY_START_ATTEMPTS or not missed:
                raise
    raise AssertionError("unreachable")


def loopback_only() -> bool:
    """True when this process's network namespace has no interface but ``lo`` (read from
    /proc/net/dev, which is per namespace): a server listening on every interface is
    then reachable from this machine's loopback only (``unshare -rn``)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [line.split(":", 1)[0].strip() for line in lines] == ["lo"]


RAY_START_ATTEMPTS = 3
RAY_REGISTRATION_TIMEOUT = "The current node timed out during startup"


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group whose leader has exited (Ray's GCS and
    raylet outlive a failed `ray start`)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _start_ray_node_once(name: str, log: Path, token_path: Path, num_cpus: int | None, env: dict[str, str] | None,
                         cluster: bool, resources: dict[str, float] | None, head_temp_dir: Path | None,
                         head_address: str | None) -> Service:
    ports = {k: free_port() for k in RAY_PORTS if head_address is None or k not in RAY_HEAD_ONLY_PORTS}
    if head_address is None:
        role = ["--head", f"--port={ports['gcs']}", "--include-dashboard=false", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={ports['dashboard']}", f"--temp-dir={head_temp_dir}"]
    else:  # a worker node: the head's temp dir (Ray takes it from the head), its own ports
        role = [f"--address={head_address}"]
    cmd = [_bin("ray"), "start", *role, "--block", "--node-ip-address=127.0.0.1",
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
           f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
           f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
           f"--runtime-env-agent-port={ports['runtime_env_agent']}",
           f"--metrics-export-port={ports['metrics_export']}",
           # each worker process on a port the OS picks: by default `ray start` hands out
           # ports from 10002-19999, the same range on every Ray node of the machine, and
           # two stacks starting at once race for them (Ray may then hang: ray-project/ray#28071)
           "--min-worker-port=0", "--max-worker-port=0",
           "--disable-usage-stats", f"--num-cpus={num_cpus or os.cpu_count()}"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    node_env = {**(env or {}), **ray_client_env(token_path)}
    # one node: Ray's local mode binds 127.0.0.1; more: its cluster mode (every interface)
    node_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1" if cluster else "0"
    pid, started = _spawn(cmd, log, node_env)
    url = f"127.0.0.1:{ports['gcs']}" if head_address is None else head_address
    # a SIGTERMed raylet drains for up to 30 s; a node here keeps nothing worth waiting for
    return Service(name, pid, url, str(log), ports, started, grace=3.0)


RAY_HEAD_ONLY_PORTS = ("gcs", "dashboard")


def _wait_ray(svc: Service, log: Path, offset: int = 0, timeout: float = 120) -> None:
    """The GCS port listens early; ``ray start --block`` logs "Ray runtime started" once the
    raylet is up too (a worker node: once it has joined)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise StackError(f"{_ray_role(svc)} exited during start; see {log}")
        started = "Ray runtime started" in log.read_bytes()[offset:].decode(errors="replace")
        if started and ("gcs" not in svc.ports or port_open(svc.ports["gcs"])):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{_ray_role(svc)} not ready within {timeout:.0f}s; see {log}")


def _ray_role(svc: Service) -> str:
    return "ray head" if "gcs" in svc.ports else f"ray worker node {svc.name}"


def raylet_pid(svc: Service) -> int | None:
    """The PID of the raylet a ``ray start --block`` service runs (its node's scheduler:
    killing it is losing the node), or None when there is none."""
    proc = svc.process()
    if proc is None:
        return None
    for child in proc.children(recursive=True):
        try:
            if child.name() == "raylet":
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


# ----------------------------------------------------------------------------- state
def save_state(path: Path, services: list[Service], extra: dict[str, Any]) -> None:
    """Write the stack state (services with PIDs, ports, URLs + ``extra``) atomically."""
    write_atomic(path, json.dumps({"services": [asdict(s) for s in services], **extra}, indent=2) + "\n")


def load_state(path: Path) -> tuple[list[Service], dict[str, Any]]:
    if not path.exists():
        return [], {}
    raw = json.loads(path.read_text())
    return [Service(**s) for s in raw.pop("services", [])], raw

"""The local stack: ``dinoalign infra up|down|status``.

``up`` starts, on free 127.0.0.1 ports, a SeaweedFS (S3 API, credentials required, data
under ``infra/run/seaweedfs``), an ``mlflow server`` (sqlite under ``infra/run/mlflow`` or
a private PostgreSQL; artifacts proxied to ``s3://<bucket>/mlflow``; jobs off) and a Ray
head (token auth), and with ``--workers N`` N Ray worker nodes, each a ``ray start
--address`` process with its own raylet and object store, advertising
``dinoalign_worker`` and ``dinoalign_worker_<i>`` (the head: ``dinoalign_head``). Ray's
multi-node mode listens on every interface, so ``up --workers`` refuses to start outside a
network namespace that has only loopback (``unshare -rn``) unless told otherwise. It records the PIDs in ``infra/run/stack.json``, writes
``infra/run/stack.env`` for ``source`` (AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS,
the retry policy, Ray's token path) and points this checkout's DVC at
``s3://<bucket>/dvc`` (remote ``stack``, made the default in ``.dvc/config.local``).
``down`` stops exactly the recorded processes and restores the committed default remote.

Keys: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from the environment when both are
set, else generated once into ``infra/run/credentials.env`` (mode 600, git-ignored),
which ``stack.env`` sources. Nothing under ``infra/run/`` is committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dinoalign.ops import services as infra
from dinoalign.errors import StackError
from dinoalign.storage import (
    S3Settings,
    client_env,
    configure_dvc_remote,
    mlflow_server_env,
    s3_settings,
    unset_default_dvc_remote,
)

RUN_DIR = Path("infra") / "run"
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
CREDENTIALS_FILE = "credentials.env"
DVC_REMOTE = "stack"
BACKENDS = ("sqlite", "postgresql")


@dataclasses.dataclass(frozen=True)
class StackOptions:
    """What ``infra up`` starts. ``bucket`` holds MLflow artifacts (``mlflow/``), the DVC
    remote (``dvc/``) and whatever the pipeline puts on S3 (checkpoints)."""

    bucket: str = "dinoalign"
    backend: str = "sqlite"  # sqlite | postgresql
    ray: bool = True
    ray_cpus: int | None = None
    ray_workers: int = 0  # worker nodes beside the head (each its own raylet and object store)
    worker_cpus: int = 1
    ray_listen_all: bool = False  # allow a multi-node Ray outside a private network namespace
    dvc_remote: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose one of {BACKENDS}")
        if self.ray_workers < 0 or self.worker_cpus < 1:
            raise StackError(f"--workers {self.ray_workers} --worker-cpus {self.worker_cpus}: need workers >= 0 "
                             "and at least 1 CPU per worker")
        if self.ray_workers and not self.ray:
            raise StackError("--workers needs the Ray head: drop --no-ray")


# The custom resources of the nodes `up` starts: a test or a job forces placement with them
# (embed.actor_resources={dinoalign_worker: 0.5} keeps the model actors off the head).
HEAD_RESOURCE = "dinoalign_head"
WORKER_RESOURCE = "dinoalign_worker"


def worker_resources(index: int) -> dict[str, float]:
    """Worker node ``index`` (1-based): every worker's resource and its own."""
    return {WORKER_RESOURCE: 1.0, f"{WORKER_RESOURCE}_{index}": 1.0}


def run_dir(root: Path) -> Path:
    return Path(root) / RUN_DIR


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created 600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export K=V`` lines of an env file written here, following ``. file`` lines."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
        elif len(words) == 2 and words[0] == ".":
            env.update(read_env_file(Path(words[1])))
    return env


def _env_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def stack_credentials(run: Path) -> tuple[str, str, Path | None]:
    """(access key, secret key, file they live in or None when from the environment)."""
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if access and secret:
        return access, secret, None
    path = run / CREDENTIALS_FILE
    if not path.exists():
        _write_private(path, "# generated by `dinoalign infra up`; never commit\n" + _env_lines({
            "AWS_ACCESS_KEY_ID": "dinoalign-" + secrets.token_hex(6),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}))
    saved = read_env_file(path)
    return saved["AWS_ACCESS_KEY_ID"], saved["AWS_SECRET_ACCESS_KEY"], path


def up(root: Path, opts: StackOptions = StackOptions()) -> dict[str, Any]:
    """Start the stack for the checkout at ``root``; return its state (no secrets)."""
    root = Path(root).resolve()
    run = run_dir(root)
    running = [s for s in infra.load_state(run / STATE_FILE)[0] if s.alive()]
    if running:
        pids = ", ".join(f"{s.name} pid {s.pid}" for s in running)
        raise StackError(f"the stack is already up ({pids}): see `dinoalign infra status`, or run "
                         "`dinoalign infra down` first")
    if opts.ray_workers and not opts.ray_listen_all and not infra.loopback_only():
        raise StackError(
            "a multi-node Ray listens on every interface of this machine (Ray has no bind address; "
            "token auth stays on): start it in a private network namespace, e.g. "
            "`unshare -rn sh -c 'ip link set lo up && exec bash'`, and run `dinoalign infra up "
            f"--workers {opts.ray_workers}` and the pipeline in that shell (docs/operations.md), "
            "or pass --ray-listen-all to accept it"
        )
    access, secret, key_file = stack_credentials(run)
    started: list[infra.Service] = []
    ray_temp: Path | None = None
    try:
        s3 = infra.start_seaweedfs(run / "seaweedfs", access, secret)
        started.append(s3)
        base = s3_settings()
        settings = S3Settings(s3.url, access, secret, base.region, base.max_attempts, base.retry_mode)
        infra.ensure_bucket(opts.bucket, settings)
        if opts.backend == "postgresql":
            pg, backend_uri = infra.start_postgres(run / "postgres")
            started.append(pg)
        else:
            (run / "mlflow").mkdir(parents=True, exist_ok=True)
            backend_uri = f"sqlite:///{run / 'mlflow' / 'mlflow.db'}"
        started.append(infra.start_mlflow(backend_uri, f"s3://{opts.bucket}/mlflow", run / "mlflow",
                                          env=mlflow_server_env(settings)))
        if opts.ray:
            token = infra.write_ray_token(run / "ray" / "auth_token")
            ray_temp = Path(tempfile.mkdtemp(prefix="dinoalign-ray-"))
            cluster = opts.ray_workers > 0
            head = infra.start_ray_head(run / "ray", token, ray_temp, opts.ray_cpus, env=client_env(settings),
                                        cluster=cluster, resources={HEAD_RESOURCE: 1.0})
            started.append(head)
            for index in range(1, opts.ray_workers + 1):
                started.append(infra.start_ray_worker(f"ray-worker-{index}", head, run / "ray", token,
                                                      opts.worker_cpus, env=client_env(settings),
                                                      resources=worker_resources(index)))
    except BaseException:
        for svc in reversed(started):
            svc.stop()
        if ray_temp is not None:
            shutil.rmtree(ray_temp, ignore_errors=True)
        raise
    services = {s.name: s for s in started}
    env = {**client_env(settings, with_keys=False), "MLFLOW_TRACKING_URI": services["mlflow"].url,
           "DINOALIGN_STACK_BUCKET": opts.bucket}
    if "ray" in services:
        env["RAY_ADDRESS"] = services["ray"].url
        env.update(infra.ray_client_env(run / "ray" / "auth_token"))
    header = (f"# dinoalign local stack, written by `dinoalign infra up` at {dt.datetime.now():%Y-%m-%d %H:%M}\n"
              f"# use it with: source {run / ENV_FILE}\n")
    keys = f". {shlex.quote(str(key_file))}\n" if key_file else "# S3 keys: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of your environment\n"
    _write_private(run / ENV_FILE, header + _env_lines(env) + keys)
    extra = {"root": str(root), "bucket": opts.bucket, "backend": opts.backend,
             "backend_uri": backend_uri, "env_file": str(run / ENV_FILE),
             "keys_from": str(key_file) if key_file else "environment",
             "ray_temp_dir": str(ray_temp) if ray_temp else None, "ray_workers": opts.ray_workers,
             "dvc_remote": None,
             "started_at": dt.datetime.now().isoformat(timespec="seconds")}
    if opts.dvc_remote and (root / ".dvc").is_dir():
        configure_dvc_remote(root, DVC_REMOTE, f"s3://{opts.bucket}/dvc", default=True, settings=settings)
        extra["dvc_remote"] = DVC_REMOTE
    infra.save_state(run / STATE_FILE, started, extra)
    return {"services": [dataclasses.asdict(s) for s in started], **extra}


def down(root: Path) -> list[str]:
    """Stop the recorded processes (by PID), forget the state; return what was stopped.
    Data (bucket contents, MLflow store) and generated keys stay for the next ``up``."""
    root = Path(root).resolve()
    run = run_dir(root)
    services, extra = infra.load_state(run / STATE_FILE)
    stopped = []
    for svc in reversed(services):
        if svc.alive():
            svc.stop()
            stopped.append(svc.name)
    if extra.get("ray_temp_dir"):
        shutil.rmtree(extra["ray_temp_dir"], ignore_errors=True)
    if extra.get("dvc_remote") and (root / ".dvc").is_dir():
        unset_default_dvc_remote(root, extra["dvc_remote"])
    for name in (STATE_FILE, ENV_FILE):
        (run / name).unlink(missing_ok=True)
    return stopped


def _healthy(svc: infra.Service) -> bool:
    if not svc.alive():
        return False
    if svc.name == "mlflow":
        return infra.http_status(svc.url + "/health") == 200
    if svc.name == "seaweedfs":
        return infra.http_status(svc.url + "/") is not None
    if svc.name.startswith("ray-worker"):  # no port of its own that says more than alive
        return infra.raylet_pid(svc) is not None
    return infra.port_open(next(iter(svc.ports.values())))


def status(root: Path) -> dict[str, Any]:
    """The recorded services with ``alive`` and ``healthy`` flags, plus the state's extras."""
    services, extra = infra.load_state(run_dir(Path(root).resolve()) / STATE_FILE)
    rows = [{"name": s.name, "pid": s.pid, "url": s.url, "log": s.log, "alive": s.alive(), "healthy": _healthy(s)}
            for s in services]
    return {"services": rows, **extra}


def stack_env(root: Path) -> dict[str, str]:
    """The environment ``source infra/run/stack.env`` gives (keys included when they were
    generated), for running pipeline commands against the stack from Python."""
    path = run_dir(Path(root).resolve()) / ENV_FILE
    if not path.exists():
        raise StackError(f"{path} does not exist: the stack is not up (`dinoalign infra up`)")
    return read_env_file(path)

"""``dinoalign infra up|status|down``: real SeaweedFS, mlflow server and Ray head on free
127.0.0.1 ports, used for real, then stopped by PID with nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from dinoalign.ops import services as infra
from dinoalign.ops.stack import (
    CREDENTIALS_FILE,
    ENV_FILE,
    STATE_FILE,
    StackError,
    StackOptions,
    read_env_file,
    run_dir,
    stack_credentials,
    stack_env,
    up,
)
from ops_checkout import empty_checkout, infra_cli, infra_up


def _env_without_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _listening(pid: int) -> set[str]:
    """Addresses the process ``pid`` and its descendants listen on (TCP)."""
    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= {c.laddr.ip.removeprefix("::ffff:") for c in proc.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:  # a short-lived worker
            pass
    return found


def test_credentials_generated_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    access, secret, path = stack_credentials(tmp_path)
    assert path == tmp_path / CREDENTIALS_FILE and _mode(path) == 0o600
    assert len(secret) >= 32 and read_env_file(path) == {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    assert stack_credentials(tmp_path) == (access, secret, path)  # the bucket's keys survive a restart
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    assert stack_credentials(tmp_path) == ("from-env", "secret-from-env", None)


def test_mlflow_admin_generated_beside_the_s3_keys_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinoalign.ops.stack import mlflow_credentials

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    access, secret, _ = stack_credentials(tmp_path)
    auth, path = mlflow_credentials(tmp_path)
    assert path == tmp_path / CREDENTIALS_FILE and _mode(path) == 0o600 and len(auth.password) >= 32
    assert read_env_file(path) == {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                                   "MLFLOW_TRACKING_USERNAME": auth.username, "MLFLOW_TRACKING_PASSWORD": auth.password}
    assert mlflow_credentials(tmp_path) == (auth, path) and stack_credentials(tmp_path) == (access, secret, path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "password-from-env")
    assert mlflow_credentials(tmp_path)[1] is None and mlflow_credentials(tmp_path)[0].password == "password-from-env"


def test_stop_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    """A state file whose PID now names another process (same PID, other start time)."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        stale = infra.Service("seaweedfs", other.pid, "http://127.0.0.1:1", "log", {},
                              started=psutil.Process(other.pid).create_time() - 100)
        assert not stale.alive()
        stale.stop()
        assert other.poll() is None  # still running: not ours to stop
    finally:
        other.kill()
        other.wait()


@pytest.mark.integration
def test_worker_nodes_outside_a_private_network_are_refused_before_anything_starts(tmp_path: Path) -> None:
    """Ray's multi-node mode listens on every interface: `up --workers` refuses outside a
    loopback-only network namespace (tests/cluster runs it inside one)."""
    if infra.loopback_only():
        pytest.skip("this process is in a loopback-only network namespace already")
    with pytest.raises(StackError, match=r"listens on every interface.*unshare -rn.*--ray-listen-all"):
        up(tmp_path, StackOptions(ray_workers=2, dvc_remote=False))
    assert not (run_dir(tmp_path) / STATE_FILE).exists() and not (run_dir(tmp_path) / "seaweedfs").exists()
    with pytest.raises(StackError, match="--workers needs the Ray head"):
        StackOptions(ray=False, ray_workers=1)


def test_failed_up_stops_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = empty_checkout(tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    before = {p.pid for p in psutil.process_iter()}
    with pytest.raises(ValueError, match="3 to 63 characters"):  # fails after SeaweedFS is up
        up(root, StackOptions(bucket="ab", ray=False))
    time.sleep(0.5)
    # this checkout's SeaweedFS only (its data folder is under root): another test on the
    # other xdist worker may start its own weed meanwhile (seen in CI)
    new = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in before
           and "weed" in " ".join(p.info["cmdline"] or []) and str(root) in " ".join(p.info["cmdline"] or [])]
    assert new == [] and not (run_dir(root) / STATE_FILE).exists()


@pytest.mark.integration
def test_infra_up_status_use_down(tmp_path: Path) -> None:
    env = _env_without_keys()
    root, run, services = infra_up(tmp_path, env)
    state = json.loads((run / STATE_FILE).read_text())
    try:
        assert set(services) == {"seaweedfs", "mlflow", "ray"}
        # every listening socket of every process of the stack is on loopback
        assert set().union(*(_listening(s.pid) for s in services.values())) == {"127.0.0.1"}

        # keys: generated, private, only in the 600 files and .dvc/config.local
        creds = read_env_file(run / CREDENTIALS_FILE)
        secret = creds["AWS_SECRET_ACCESS_KEY"]
        assert _mode(run / CREDENTIALS_FILE) == _mode(run / ENV_FILE) == 0o600
        assert secret not in (run / STATE_FILE).read_text() and secret not in (run / ENV_FILE).read_text()
        assert secret not in (root / ".dvc" / "config").read_text()
        assert secret in (root / ".dvc" / "config.local").read_text()

        shown = infra_cli(root, "status", env=env)
        assert shown.returncode == 0 and shown.stdout.count("healthy") == 3, shown.stdout
        again = infra_cli(root, "up", env=env)
        # a StackError is a UserError like any other: one line, exit 2 (it was exit 1)
        assert again.returncode == 2 and "already up" in again.stderr
        assert again.stderr.strip().splitlines() == [again.stderr.strip()], again.stderr

        # the env file is all a shell needs: Ray (token auth), MLflow (artifacts in the bucket), S3, DVC
        stack = stack_env(root)
        assert stack["MLFLOW_TRACKING_URI"] == services["mlflow"].url
        assert stack["RAY_ADDRESS"] == services["ray"].url and stack["AWS_ACCESS_KEY_ID"] == creds["AWS_ACCESS_KEY_ID"]
        client = subprocess.run([sys.executable, "-c", _USE_STACK], env={**env, **stack}, capture_output=True,
                                text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        report = json.loads(client.stdout.strip().splitlines()[-1])
        assert report["ray"] == 42 and report["cpus"] == 1.0 and report["worker_logged"] == 1
        # a worker's port is the OS's pick, not `ray start`'s default range 10002-19999 that
        # every Ray node of the machine hands out in the same order (two stacks racing for it)
        assert report["worker_ports"] and not any(10002 <= p <= 19999 for p in report["worker_ports"]), report
        assert report["artifact_keys"] == [f"mlflow/{report['experiment']}/{report['run']}/artifacts/notes/hello.txt"]
        assert report["anonymous_status"] == 403 and report["wrong_key_error"] in ("InvalidAccessKeyId", "AccessDenied")
        (root / "data.txt").write_text("tracked\n")
        subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data.txt"], cwd=root, check=True, env={**env, **stack})
        pushed = subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=root, env={**env, **stack},
                                capture_output=True, text=True, timeout=300)
        assert pushed.returncode == 0 and "1 file pushed" in pushed.stdout, pushed.stdout + pushed.stderr
    finally:
        tree = [p for s in services.values() if s.alive()
                for p in [psutil.Process(s.pid), *psutil.Process(s.pid).children(True)]]
        stopped = infra_cli(root, "down", env=env)
    assert stopped.returncode == 0 and "stopped ray, mlflow, seaweedfs" in stopped.stdout
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [], [p.pid for p in alive]
    assert not (run / STATE_FILE).exists() and not (run / ENV_FILE).exists()
    assert not Path(state["ray_temp_dir"]).exists()
    assert "remote = stack" not in (root / ".dvc" / "config.local").read_text()  # `dvc push` -> committed default
    assert infra_cli(root, "status", env=env).returncode == 3
    with pytest.raises(StackError, match="not up"):
        stack_env(root)


_USE_STACK = r"""
import json, os, urllib.error, urllib.request
import boto3, mlflow, ray
from botocore.exceptions import ClientError
from dinoalign.storage import boto3_client

ray.init()
out = {"ray": ray.get(ray.remote(lambda: 41 + 1).remote()), "cpus": ray.cluster_resources()["CPU"]}
mlflow.set_experiment("smoke")
with mlflow.start_run() as run:
    mlflow.log_text("hello", "notes/hello.txt")
out.update(experiment=run.info.experiment_id, run=run.info.run_id)

@ray.remote
def log_from_a_worker(uri, run_id):  # as align's Ray Train workers do: the head's env has the MLflow admin
    mlflow.MlflowClient(uri).log_metric(run_id, "from_worker", 1.0)
    return 1

out["worker_logged"] = ray.get(log_from_a_worker.remote(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id))

@ray.remote
def worker_ports():  # what this worker process listens on
    import psutil
    return sorted(c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN)

out["worker_ports"] = ray.get(worker_ports.remote())
listing = boto3_client().list_objects_v2(Bucket=os.environ["DINOALIGN_STACK_BUCKET"], Prefix="mlflow/")
out["artifact_keys"] = [o["Key"] for o in listing.get("Contents", [])]
try:
    urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/" + os.environ["DINOALIGN_STACK_BUCKET"] + "/")
    out["anonymous_status"] = 200
except urllib.error.HTTPError as e:
    out["anonymous_status"] = e.code
wrong = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], aws_access_key_id="nobody",
                     aws_secret_access_key="wrong-secret-key", region_name="us-east-1")
try:
    wrong.list_objects_v2(Bucket=os.environ["DINOALIGN_STACK_BUCKET"])
    out["wrong_key_error"] = None
except ClientError as e:
    out["wrong_key_error"] = e.response["Error"]["Code"]
print(json.dumps(out))
"""


def stack_profile(repo_root: Path) -> list[str]:
    """The ``key=value`` lines of params/stack.txt (the profile docs/operations.md applies)."""
    lines = (repo_root / "params" / "stack.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_stack_profile_resolves(repo_root: Path) -> None:
    from dinoalign.config import load_params

    params = load_params(repo_root / "params.yaml", stack_profile(repo_root))
    assert params.profile == "stack" and params.tracking.uri is None  # MLflow from MLFLOW_TRACKING_URI
    assert params.paths.checkpoints == "s3://dinoalign/checkpoints"


@pytest.mark.integration
def test_postgresql_backend(tmp_path: Path) -> None:
    """A private PostgreSQL from Debian's binaries for the MLflow backend store; mlflow
    on it when psycopg is installed, else a clear error before anything starts."""
    import importlib.util

    if not Path("/usr/lib/postgresql/15/bin/postgres").exists():
        pytest.skip("Debian's postgresql-15 is not installed")
    # PostgreSQL runs as the postgres user when we are root: it must reach its folder,
    # which pytest's private (0700) tmp dirs do not allow
    base = Path(tempfile.mkdtemp(prefix="dinoalign-pg-"))
    base.chmod(0o755)
    pg, uri = infra.start_postgres(base / "postgres")
    try:
        tree = [psutil.Process(pg.pid), *psutil.Process(pg.pid).children(recursive=True)]
        assert _listening(pg.pid) == {"127.0.0.1"}
        psql = "/usr/lib/postgresql/15/bin/psql"
        answer = subprocess.run([psql, uri, "-tAc", "select current_database()"],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert answer == "mlflow"
        # password auth (#19): the URI names the 600 password file, never the password; without
        # it, or with a wrong password, another local user is refused
        passfile = base / "postgres" / infra.PG_PASSFILE
        assert _mode(passfile) == 0o600 and f"passfile={passfile}" in uri
        password = passfile.read_text().strip().rsplit(":", 1)[1]
        assert len(password) >= 32 and password not in uri
        bare = uri.split("?", 1)[0]
        for env in ({"PGPASSFILE": "/dev/null"}, {"PGPASSFILE": "/dev/null", "PGPASSWORD": "wrong-password"}):
            refused = subprocess.run([psql, bare, "-tAc", "select 1"], capture_output=True, text=True,
                                     env={**os.environ, **env})
            assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
        assert password not in (base / "postgres" / "postgres.log").read_text()
        assert not any(password in " ".join(p.cmdline()) for p in tree if p.is_running())
        if importlib.util.find_spec("psycopg") is None:
            with pytest.raises(RuntimeError, match=r"psycopg\[binary\]"):
                infra.start_mlflow(uri, str(tmp_path / "artifacts"), tmp_path)
        else:
            server = infra.start_mlflow(uri, str(tmp_path / "artifacts"), tmp_path)
            try:
                from mlflow import MlflowClient

                client = MlflowClient(server.url)
                run = client.create_run(client.create_experiment("on-postgres"))
                client.log_metric(run.info.run_id, "x", 1.0)
                assert client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
            finally:
                server.stop()
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)

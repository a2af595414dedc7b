"""``dinoalign infra``'s parts: credentials, stopping by PID, refusals before anything
starts, cleanup after a failed ``up``, the stack profile, the PostgreSQL backend. The full
``up|status|down`` on a real stack is in test_ops_stack_security.py (one stack for both
of its tests)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from dinoalign.ops import services as infra
from dinoalign.ops.stack import (
    CREDENTIALS_FILE,
    STATE_FILE,
    StackError,
    StackOptions,
    read_env_file,
    run_dir,
    stack_credentials,
    up,
)
from ops_checkout import empty_checkout, listening


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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
    new = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in before
           and "weed" in " ".join(p.info["cmdline"] or [])]
    assert new == [] and not (run_dir(root) / STATE_FILE).exists()


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
        assert {ip for ip, _ in listening(pg.pid)} == {"127.0.0.1"}
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

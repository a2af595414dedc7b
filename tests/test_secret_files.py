"""Every file dinoalign writes a secret into is owner-only, mode 600 (issue #19 part 3),
whatever the umask, and already while the secret is written. The stack's own files
(``credentials.env``, ``stack.env``) are checked in tests/ops/test_ops_stack.py.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dinoalign.storage import S3Settings, configure_dvc_remote

SECRET = "s3cr3t-never-for-others"
SETTINGS = S3Settings(endpoint_url="http://127.0.0.1:9", access_key="dinoalign", secret_key=SECRET,
                      region="us-east-1")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: a file gets exactly the mode its writer asks for, so nothing is left to
    the user's umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("existing_mode", [None, 0o644])
def test_dvc_config_local_with_the_s3_secret_is_mode_600(
    tmp_path: Path, open_umask: None, shared: bool, existing_mode: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dvc.config import Config

    dvc_dir = tmp_path / ".dvc"
    dvc_dir.mkdir()
    (dvc_dir / "config").write_text("")
    local = dvc_dir / "config.local"
    if existing_mode is not None:  # an earlier config.local that others could read
        local.write_text("[core]\n    autostage = true\n")
        local.chmod(existing_mode)
    modes_while_written: list[int] = []
    save = Config._save_config

    def watched(self, level, conf_dict):  # the mode each time DVC writes config.local
        save(self, level, conf_dict)
        if level == "local":
            modes_while_written.append(_mode(local))

    monkeypatch.setattr(Config, "_save_config", watched)
    configure_dvc_remote(tmp_path, "stack", "s3://bucket/dvc", default=True, shared=shared, settings=SETTINGS)
    assert _mode(local) == 0o600 and SECRET in local.read_text()
    assert modes_while_written and set(modes_while_written) == {0o600}
    assert SECRET not in (dvc_dir / "config").read_text()  # the committed config never holds it
    if existing_mode is not None:
        assert "autostage" in local.read_text()  # what was there is kept


def test_the_ray_token_and_the_seaweedfs_identity_are_mode_600(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written by ops/services.py; SeaweedFS is not started (only its identity file is
    looked at)."""
    from dinoalign.ops import services

    token = services.write_ray_token(tmp_path / "ray" / "token")
    assert _mode(token) == 0o600 and len(token.read_text()) == 64

    monkeypatch.setattr(services, "_bin", lambda name: name)
    monkeypatch.setattr(services, "_spawn", lambda cmd, log, *a, **k: (os.getpid(), 0.0))
    monkeypatch.setattr(services, "_started", lambda svc, wait: svc)
    services.start_seaweedfs(tmp_path / "weed", "dinoalign", SECRET)
    identity = tmp_path / "weed" / "s3.json"
    assert _mode(identity) == 0o600 and SECRET in identity.read_text()
    # the JWT signing keys and the mTLS key (issue #19: no way in but S3 with the keys)
    security = tmp_path / "weed" / services.SEAWEEDFS_SECURITY
    assert _mode(security) == 0o600 and "[jwt.filer_signing.read]" in security.read_text()
    tls = tmp_path / "weed" / services.SEAWEEDFS_TLS
    assert _mode(tls) == _mode(tmp_path / "weed") == 0o700
    assert {p.name: _mode(p) for p in tls.iterdir()} == {"ca.crt": 0o600, "node.crt": 0o600, "node.key": 0o600}


def test_the_mlflow_auth_files_are_mode_600(tmp_path: Path, open_umask: None) -> None:
    """The basic-auth config of the stack's mlflow server: 600, and the password only in
    the server's environment."""
    from dinoalign.ops import services

    auth = services.MlflowAuth("admin-user", SECRET)
    env = services.mlflow_auth_env(tmp_path / "mlflow", auth)
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert _mode(ini) == 0o600 and SECRET not in ini.read_text() and "NO_PERMISSIONS" in ini.read_text()
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == SECRET and len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32
    assert SECRET not in repr(auth)

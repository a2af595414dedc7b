"""Fixtures of the operations tests: a real SeaweedFS + mlflow server pair (headless
Chromium: the session-wide ``chromium`` fixture of tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Iterator

import pytest

from dinoalign.ops import services as infra
from dinoalign.storage import S3Settings, mlflow_server_env



@dataclasses.dataclass
class TrackingStack:
    """SeaweedFS (S3, keys required) + an mlflow server whose artifacts go to ``bucket``."""

    s3: infra.Service
    mlflow: infra.Service
    settings: S3Settings
    bucket: str
    auth: infra.MlflowAuth  # the mlflow server's basic-auth admin (the stack's)

    @property
    def env(self) -> dict[str, str]:
        """Client environment: the server proxies artifacts, S3 keys only for checks."""
        s = self.settings
        return {"MLFLOW_TRACKING_URI": self.mlflow.url, "AWS_ENDPOINT_URL": s.endpoint_url or "",
                "AWS_ACCESS_KEY_ID": s.access_key or "", "AWS_SECRET_ACCESS_KEY": s.secret_key or "",
                **self.auth.client_env()}

    def stop(self) -> None:
        self.mlflow.stop()
        self.s3.stop()


def start_tracking_stack(workdir: Path, bucket: str = "tracking") -> TrackingStack:
    access, secret = "test-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    s3 = infra.start_seaweedfs(workdir / "seaweedfs", access, secret)
    try:
        settings = S3Settings(s3.url, access, secret, "us-east-1")
        infra.ensure_bucket(bucket, settings)
        auth = infra.MlflowAuth("test-admin", secrets.token_urlsafe(24))
        server = infra.start_mlflow(f"sqlite:///{workdir / 'mlflow.db'}", f"s3://{bucket}/mlflow", workdir,
                                    env=mlflow_server_env(settings), auth=auth)
    except BaseException:
        s3.stop()
        raise
    return TrackingStack(s3, server, settings, bucket, auth)


@pytest.fixture(scope="module")
def tracking_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingStack]:
    """The stack, with this process's MLflow clients given its credentials for the module
    (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD from the environment at each request)."""
    stack = start_tracking_stack(tmp_path_factory.mktemp("tracking"))
    saved = {k: os.environ.get(k) for k in stack.auth.client_env()}
    os.environ.update(stack.auth.client_env())
    try:
        yield stack
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stack.stop()

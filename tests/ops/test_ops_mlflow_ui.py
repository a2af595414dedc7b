"""The MLflow UI of a real ``mlflow server`` (artifacts in SeaweedFS), opened in headless
Chromium: it lists the runs a pipeline stage logged and the registered models with their
aliases."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from ops_mlflow_ui import check_mlflow_ui

from dinoalign.storage import boto3_client

pytestmark = pytest.mark.integration


def test_mlflow_server_refuses_requests_without_credentials(tracking_stack: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Basic auth on every route but /health: no credentials or wrong ones get 401 (API,
    UI, artifact proxy, MLflow's client); the admin's are accepted."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    url = tracking_stack.mlflow.url
    user, password = tracking_stack.mlflow_auth

    def status(path: str, auth: str | None = None, body: bytes | None = None) -> int:
        request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    create = ("/api/2.0/mlflow/experiments/create", b'{"name": "intruder"}')
    assert status("/health") == 200  # the liveness probe only
    for path, body in (create, ("/api/2.0/mlflow/experiments/search?max_results=5", None), ("/", None),
                       ("/ajax-api/2.0/mlflow/experiments/search?max_results=5", None),
                       ("/api/2.0/mlflow-artifacts/artifacts/intruder.txt", None)):
        assert status(path, body=body) == 401, path
        assert status(path, f"{user}:wrong-password", body) == 401, path
        assert status(path, f"intruder:{password}", body) == 401, path
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
        MlflowClient(url).search_experiments()
    assert status(create[0], f"{user}:{password}", create[1]) == 200
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    assert "intruder" in [e.name for e in MlflowClient(url).search_experiments()]


def test_mlflow_ui_shows_pipeline_runs_and_registered_models(tracking_stack: Any, chromium: Any,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    url = tracking_stack.mlflow.url
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", tracking_stack.mlflow_auth[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", tracking_stack.mlflow_auth[1])
    env = {**os.environ, **tracking_stack.env}
    for run_name, n_train in (("prepare", 12), ("prepare", 16)):  # the real stage, twice
        done = subprocess.run(
            [sys.executable, "-m", "dinoalign.cli", "prepare", "-p", str(tmp_path / "none.yaml"),
             f"tracking.uri={url}", "tracking.experiment=ui-check", f"prepare.out_dir={tmp_path / 'pairs'}",
             f"data.synthetic.n_train={n_train}", "data.synthetic.n_val=2", "data.synthetic.n_test=4"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("ui-check")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["dinoalign.stage"] for r in runs] == ["prepare", "prepare"]
    # the stage's artifact went through the server into the bucket
    key = f"mlflow/{experiment.experiment_id}/{runs[0].info.run_id}/artifacts/summary.json"
    s3 = boto3_client(settings=tracking_stack.settings)
    assert b"n_pairs" in s3.get_object(Bucket=tracking_stack.bucket, Key=key)["Body"].read()

    for name, alias, run in (("dinoalign-projector", "champion", runs[0]), ("dinoalign-talk2dino", "candidate", runs[1])):
        client.create_registered_model(name)
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}", run_id=run.info.run_id)
        client.set_registered_model_alias(name, alias, version.version)

    page = chromium.new_page()  # a browser without credentials gets nothing
    try:
        assert page.goto(url + "/").status == 401
    finally:
        page.close()
    check_mlflow_ui(chromium, url, experiment.experiment_id, ["prepare"],
                    {"dinoalign-projector": "champion", "dinoalign-talk2dino": "candidate"}, tmp_path / "shots",
                    credentials=tracking_stack.mlflow_auth)
    assert (tmp_path / "shots" / "runs.png").stat().st_size > 10_000

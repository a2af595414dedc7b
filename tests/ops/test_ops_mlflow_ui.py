"""The MLflow UI of a real ``mlflow server`` (artifacts in SeaweedFS), opened in headless
Chromium: it lists the runs a pipeline stage logged and the registered models with their
aliases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ops_mlflow_ui import check_mlflow_ui

from dinoalign.storage import boto3_client

pytestmark = pytest.mark.integration


def test_mlflow_ui_shows_pipeline_runs_and_registered_models(tracking_stack: Any, chromium: Any,
                                                             tmp_path: Path) -> None:
    from mlflow import MlflowClient

    url = tracking_stack.mlflow.url
    env = {**os.environ, **tracking_stack.env}
    for run_name, n_train in (("prepare", 12), ("prepare", 16)):  # the real stage, twice
        done = subprocess.run(
            [sys.executable, "-m", "dinoalign.cli", "prepare", "-p", str(tmp_path / "none.yaml"),
             f"tracking.uri={url}", "tracking.experiment=ui-check", f"paths.pairs={tmp_path / 'pairs'}",
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

    check_mlflow_ui(chromium, url, experiment.experiment_id, ["prepare"],
                    {"dinoalign-projector": "champion", "dinoalign-talk2dino": "candidate"}, tmp_path / "shots")
    assert (tmp_path / "shots" / "runs.png").stat().st_size > 10_000

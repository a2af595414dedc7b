"""The MLflow UI of a real ``mlflow server`` (artifacts in SeaweedFS), opened in headless
Chromium: it lists the runs a pipeline stage logged, nested under their pipeline's parent
run with their datasets, and the registered models with their aliases."""

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
    env = {**os.environ, **tracking_stack.env, "DINOALIGN_PIPELINE_RUN_ID": "ui-check"}  # one pipeline execution
    for n_train in (12, 16):  # the real stage, twice
        done = subprocess.run(
            [sys.executable, "-m", "dinoalign.cli", "prepare", "-p", str(tmp_path / "none.yaml"),
             f"tracking.uri={url}", "tracking.experiment=ui-check", f"paths.pairs={tmp_path / 'pairs'}",
             f"data.synthetic.n_train={n_train}", "data.synthetic.n_val=2", "data.synthetic.n_test=4"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("ui-check")
    parent, *runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert parent.info.run_name == "pipeline ui-check" and [r.data.tags["dinoalign.stage"] for r in runs] == [
        "prepare", "prepare"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    # the stage's artifact went through the server into the bucket
    key = f"mlflow/{experiment.experiment_id}/{runs[0].info.run_id}/artifacts/summary.json"
    s3 = boto3_client(settings=tracking_stack.settings)
    assert b"n_pairs" in s3.get_object(Bucket=tracking_stack.bucket, Key=key)["Body"].read()

    for name, alias, run in (("dinoalign-projector", "champion", runs[0]), ("dinoalign-talk2dino", "candidate", runs[1])):
        client.create_registered_model(name)
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}", run_id=run.info.run_id)
        client.set_registered_model_alias(name, alias, version.version)

    # a real model version as align registers it: a pyfunc with a signature (dinotxt: its own
    # text tower, so no CLIP is needed; a tiny untrained one)
    version = _register_pyfunc(url, experiment.experiment_id, tmp_path)

    check_mlflow_ui(chromium, url, experiment.experiment_id, ["prepare"],
                    {"dinoalign-projector": "champion", "dinoalign-talk2dino": "candidate",
                     "dinoalign-dinotxt": "candidate"}, tmp_path / "shots",
                    pipelines=1, datasets={"prepare": "pairs"},
                    signatures={("dinoalign-dinotxt", version): ["image_b64", "classes", "mask_png_b64"]},
                    credentials=(tracking_stack.auth.username, tracking_stack.auth.password))
    assert (tmp_path / "shots" / "runs.png").stat().st_size > 10_000


def _register_pyfunc(url: str, experiment_id: str, tmp_path: Path) -> str:
    import mlflow
    from pipeline_testing import TINY_BACKBONE, TINY_VIT

    from dinoalign.config import load_params
    from dinoalign.recipes import build
    from dinoalign.serve import log_model
    from dinoalign.tracking import MODEL_ARTIFACT, register_model

    params = load_params(tmp_path / "none.yaml", [f"paths.pairs={tmp_path / 'pairs'}", "backbone.img_size=56",
                                                  f"backbone.model_kwargs={TINY_BACKBONE}", "embed.img_size=56"])
    build("dinotxt", {"vision_dim": TINY_VIT["embed_dim"], "vision_heads": TINY_VIT["num_heads"],
                      "text_width": 32, "text_heads": 2}).save(str(tmp_path / "dinotxt"))
    mlflow.set_tracking_uri(url)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name="dinotxt model"):
            logged = log_model(tmp_path / "dinotxt", params, tmp_path, MODEL_ARTIFACT)
        return register_model("dinotxt", "dinoalign", logged.model_uri)
    finally:
        mlflow.set_tracking_uri(None)

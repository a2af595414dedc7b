"""MLflow in one place: where runs go, how a stage run is opened and tagged.

Default (embedded): a sqlite store at ``mlruns/mlflow.db`` under the repo with artifacts
in ``mlruns/artifacts``. ``tracking.uri`` in params or ``$MLFLOW_TRACKING_URI`` point at a
real ``mlflow server`` instead. Every stage run is tagged with the git commit, the DVC
stage name and a pipeline run id shared by all stages of one ``dvc repro``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

from dinoalign.config import Params, flatten, to_dict

EMBEDDED_DIR = "mlruns"

# The model registry: align registers ``<MODEL_PREFIX><recipe>`` and points @candidate at
# the new version; ``retrain`` promotes a better candidate to @champion.
MODEL_PREFIX = "dinoalign-"
CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_ARTIFACT = "model"  # the run's artifact folder a model version points at


def repo_root() -> Path:
    """The dinoalign checkout (where params.yaml lives): ``$DINOALIGN_ROOT`` or the cwd."""
    return Path(os.environ.get("DINOALIGN_ROOT", os.getcwd())).resolve()


def tracking_uri(params: Params) -> str:
    if params.tracking.uri:
        return params.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = repo_root() / EMBEDDED_DIR / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or repo_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_run_id(params: Params) -> str:
    """``$DINOALIGN_PIPELINE_RUN_ID`` when the caller set one (``make demo``, ``retrain``);
    otherwise a hash of the commit and the resolved params, which every stage of one
    ``dvc repro`` shares."""
    env = os.environ.get("DINOALIGN_PIPELINE_RUN_ID")
    if env:
        return env
    h = hashlib.blake2b(digest_size=8)
    h.update(git_commit().encode())
    h.update(repr(sorted(flatten(to_dict(params)).items())).encode())
    return h.hexdigest()


def _loggable(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."


@contextlib.contextmanager
def stage_run(
    stage: str, params: Params, run_name: str | None = None, resume_run_id: str | None = None
) -> Iterator[Any]:
    """Open one MLflow run for a pipeline stage, log the resolved params, tag it.

    Yields the ``mlflow`` module's active run. Failures mark the run FAILED (MLflow's
    context manager does that) and re-raise. ``resume_run_id``: continue that run of
    the experiment instead (a resumed training); its params were logged when it began.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    exp = mlflow.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        kwargs = {}
        if tracking_uri(params).startswith("sqlite:"):
            art = repo_root() / EMBEDDED_DIR / "artifacts"
            art.mkdir(parents=True, exist_ok=True)
            kwargs["artifact_location"] = art.as_uri()
        mlflow.create_experiment(params.tracking.experiment, **kwargs)
    mlflow.set_experiment(params.tracking.experiment)
    tags = {
        "dinoalign.stage": stage,
        "dinoalign.profile": params.profile,
        "dinoalign.pipeline_run_id": pipeline_run_id(params),
        "mlflow.source.git.commit": git_commit(),
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
    }
    if resume_run_id is not None:
        with mlflow.start_run(run_id=resume_run_id, tags=tags) as run:
            yield run
        return
    with mlflow.start_run(run_name=run_name or stage, tags=tags) as run:
        flat = {k: _loggable(v) for k, v in flatten(to_dict(params)).items()}
        mlflow.log_params(flat)
        yield run


def run_url(run: Any) -> str:
    """Where a person finds the run: the server UI URL or the embedded store path."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"{uri} (run {run.info.run_id}; browse with `make mlflow-ui`)"


def without_credentials(uri: str) -> str:
    """``uri`` with any ``user:password@`` removed (tracking URIs end up in reports)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def registered_model_name(recipe: str) -> str:
    """The MLflow registry name of a recipe's models: ``dinoalign-<recipe>``."""
    return f"{MODEL_PREFIX}{recipe}"


def register_model(recipe: str, run_id: str, run_name: str) -> str:
    """Register the active run's ``model`` artifact folder as a new version of
    ``dinoalign-<recipe>`` and point the ``candidate`` alias at it; returns the version."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name = registered_model_name(recipe)
    try:
        client.create_registered_model(
            name, description=f"dinoalign {recipe} models (safetensors + config.json; load_recipe)"
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=mlflow.get_artifact_uri(MODEL_ARTIFACT),
        run_id=run_id,
        tags={"dinoalign.align_run": run_name},
    )
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return str(version.version)

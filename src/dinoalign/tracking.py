"""MLflow in one place: where runs go, how a stage run is opened and tagged.

Default (embedded): a sqlite store at ``mlruns/mlflow.db`` under the repo with artifacts
in ``mlruns/artifacts``. ``tracking.uri`` in params or ``$MLFLOW_TRACKING_URI`` point at a
real ``mlflow server`` instead (probed first: an unreachable one fails in seconds).

One pipeline execution (``dvc repro``, ``dvc exp run``, ``make demo``, ``dinoalign
retrain``) is one parent run tagged with the git commit and the DVC experiment name; each
stage's run is nested under it and logs only the params its dvc.yaml entry declares, its
inputs as MLflow datasets (:func:`log_dataset`) and the process that opened it, so that a
run a killed process left RUNNING is marked FAILED by the next one. The experiment opens
in the UI's model-training view.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from dinoalign.config import Params, flatten, to_dict
from dinoalign.errors import ConfigError

EMBEDDED_DIR = "mlruns"

# The model registry: align registers ``<tracking.experiment>-<recipe>``
# (:func:`registered_model_name`, tagged with EXPERIMENT_TAG) and points @candidate at the
# new version; ``retrain`` promotes a better candidate to @champion.
EXPERIMENT_TAG = "dinoalign.experiment"
CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_ARTIFACT = "model"  # the name of the pyfunc model align logs in its run

# Run tags. A pipeline execution is one parent run (STAGE_TAG = PIPELINE_STAGE) with each
# stage's run nested under it (PARENT_TAG), all tagged with PIPELINE_TAG.
STAGE_TAG, PIPELINE_TAG, PARENT_TAG = "dinoalign.stage", "dinoalign.pipeline_run_id", "mlflow.parentRunId"
PIPELINE_STAGE = "pipeline"
PIPELINE_ENV = "DINOALIGN_PIPELINE_RUN_ID"  # set by a caller that runs a pipeline (retrain)
PROCESS_TAG = "dinoalign.process"  # host:pid:start time of the process that opened the run
ABANDONED_TAG = "dinoalign.abandoned"
# The experiment tag by which MLflow 3's UI opens the model-training view, not the GenAI one
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PROBE_TIMEOUT_S = 5.0


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


def pipeline_run_id() -> str | None:
    """Which pipeline execution this process is part of, or None (a stage run by hand).

    ``$DINOALIGN_PIPELINE_RUN_ID`` when the caller set one (``dinoalign retrain``: the batch
    id). Otherwise, in a command DVC runs (``$DVC_STAGE`` set), the ``dvc repro`` / ``dvc
    exp run`` process that runs it: its host, pid and start time (and ``$DVC_EXP_NAME``, as
    a queue worker runs several experiments). Every stage of one execution is a child of
    that one process, and no other execution has the same, so ``make demo`` and a plain
    ``dvc repro`` need no set-up; a second ``dvc repro`` is a new execution even when
    nothing changed."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    if "DVC_STAGE" not in os.environ:
        return None
    dvc = _dvc_process()
    if dvc is None:
        return None
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{socket.gethostname()}:{dvc.pid}:{dvc.create_time()}:{os.environ.get('DVC_EXP_NAME', '')}".encode())
    return f"dvc-{h.hexdigest()}"


def _dvc_process() -> Any:
    """The nearest ancestor process that is DVC (``dvc ...``, ``python .../dvc ...`` or
    ``python -m dvc ...``; shells in between are skipped), as a ``psutil.Process``."""
    import psutil

    for proc in psutil.Process().parents():
        try:
            argv = proc.cmdline()
        except psutil.Error:
            continue
        if any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
            return proc
    return None


def _loggable(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."


def declared_params(stage: str) -> list[str] | None:
    """The params keys dvc.yaml declares for ``stage`` (``align@talk2dino``: the foreach
    entry, ``${item}`` resolved), from the first dvc.yaml that has the stage: the repo
    root's, else the one beside this package's source; None when neither has it (an
    installed package: then every param is logged)."""
    import yaml

    name, _, item = stage.partition("@")
    for folder in (repo_root(), Path(__file__).resolve().parents[2]):
        stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"] if (folder / "dvc.yaml").is_file() else {}
        if name in stages:
            declared = stages[name].get("do", stages[name]).get("params", [])
            return [k.replace("${item}", item) for k in declared if isinstance(k, str)]
    return None


def stage_params(stage: str, params: Params, keys: Sequence[str] | None = None) -> dict[str, str]:
    """The params ``stage`` reads, flattened (``align.talk2dino.lr``) for ``mlflow.log_params``:
    its dvc.yaml ``params:`` (``keys`` for a command that is no DVC stage), so a run shows
    its inputs and not all of params.yaml. ``tracking`` is where the run goes, not an input
    (and its uri may hold credentials)."""
    keys = declared_params(stage) if keys is None else keys
    flat = flatten(to_dict(params))
    return {
        k: _loggable(v) for k, v in flat.items()
        if not k.startswith("tracking.") and (keys is None or any(k == d or k.startswith(f"{d}.") for d in keys))
    }


def check_reachable(uri: str, setting: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, in one line that names the address and ``setting``,
    when the http(s) tracking server at ``uri`` does not answer (MLflow's own client
    retries for minutes, with a traceback per try). Any HTTP answer counts as reachable."""
    if not uri.startswith(("http://", "https://")):
        return
    address = without_credentials(uri).rstrip("/")
    try:
        urllib.request.urlopen(f"{address}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy in front may refuse /health)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return  # it answered; certificates are MLflow's concern (MLFLOW_TRACKING_INSECURE_TLS)
        raise ConfigError(
            f"the MLflow tracking server {address} ({setting}) does not answer within {timeout:g} s "
            f"({reason}): start it (`dinoalign infra up` or `mlflow server`) or point {setting} at one"
        ) from None


def _uri_setting(params: Params) -> str:
    """Which setting chose the tracking URI, for error messages."""
    if params.tracking.uri:
        return "tracking.uri in params.yaml or an override"
    return "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the embedded store"


def _experiment_id(client: Any, params: Params) -> str:
    """The experiment ``tracking.experiment``, created when missing (embedded store:
    artifacts under ``mlruns/artifacts``) and tagged to open in the UI's model-training view."""
    exp = client.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        kwargs: dict[str, Any] = {}
        if tracking_uri(params).startswith("sqlite:"):
            art = repo_root() / EMBEDDED_DIR / "artifacts"
            art.mkdir(parents=True, exist_ok=True)
            kwargs["artifact_location"] = art.as_uri()
        return client.create_experiment(params.tracking.experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
                                        **kwargs)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made before this tag (or by hand)
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def process_tag() -> str:
    """``host:pid:start time`` of this process: what tells a later run whether the process
    that opened a run is still there (a pid alone may have been reused)."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _process_alive(tag: str) -> bool:
    """Whether the process of a :func:`process_tag` still runs; True when it cannot be
    told (another host, no permission)."""
    import psutil

    host, pid, started = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(pid))
        return abs(proc.create_time() - float(started)) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def fail_abandoned_runs(client: Any, experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark FAILED every RUNNING run of the experiment whose process on this host has
    ended (a killed stage never closes its run) and settle its parent; returns their ids.
    ``keep``: a run about to be resumed. Runs opened on other hosts are left alone: their
    processes cannot be seen from here."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` LIKE '{host}:%'")
    failed = []
    for run in runs:
        tag = run.data.tags[PROCESS_TAG]
        if run.info.run_id == keep or _process_alive(tag):
            continue
        client.set_tag(run.info.run_id, ABANDONED_TAG,
                       f"process {tag} ended without closing this run (killed?); marked FAILED by a later run")
        client.set_terminated(run.info.run_id, "FAILED")
        failed.append(run.info.run_id)
        if PARENT_TAG in run.data.tags:
            _settle_parent(client, experiment_id, run.data.tags[PARENT_TAG])
    return failed


def pipeline_parent(client: Any, experiment_id: str, params: Params) -> str | None:
    """The id of this pipeline execution's parent run (:func:`pipeline_run_id`), found in
    the tracking store by its tags or created; None outside a pipeline. Stages are separate
    processes, so the store is where they meet: the first stage creates the parent, the
    others find it (two that race both keep the older one)."""
    execution = pipeline_run_id()
    if execution is None:
        return None
    query = f"tags.`{STAGE_TAG}` = '{PIPELINE_STAGE}' and tags.`{PIPELINE_TAG}` = '{execution}'"
    order = ["attributes.start_time ASC"]
    found = client.search_runs([experiment_id], query, order_by=order)
    if not found:
        exp_name = os.environ.get("DVC_EXP_NAME")
        tags = {STAGE_TAG: PIPELINE_STAGE, PIPELINE_TAG: execution, "dinoalign.profile": params.profile,
                "mlflow.source.git.commit": git_commit(), **({"dvc.exp_name": exp_name} if exp_name else {})}
        label = exp_name or (execution if os.environ.get(PIPELINE_ENV) else time.strftime("%Y-%m-%d %H:%M:%S"))
        mine = client.create_run(experiment_id, run_name=f"pipeline {label}", tags=tags).info.run_id
        found = client.search_runs([experiment_id], query, order_by=order)
        if found[0].info.run_id != mine:
            client.delete_run(mine)
    return found[0].info.run_id


def _settle_parent(client: Any, experiment_id: str, parent_id: str) -> None:
    """A parent run's status follows its children: RUNNING while one runs, otherwise the
    status of the child that ended last (DVC stops at a failed stage), ending then."""
    children = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'")
    if not children or any(c.info.status == "RUNNING" for c in children):
        return
    last = max(children, key=lambda c: c.info.end_time or 0)
    client.set_terminated(parent_id, last.info.status, end_time=last.info.end_time)


@contextlib.contextmanager
def stage_run(
    stage: str, params: Params, run_name: str | None = None, resume_run_id: str | None = None,
    param_keys: Sequence[str] | None = None,
) -> Iterator[Any]:
    """Open one MLflow run for a pipeline stage, log the params it reads, tag it.

    ``stage``: the DVC stage (``align@talk2dino`` for a foreach entry), also the run's
    name unless ``run_name``; ``param_keys``: the params a command that is no DVC stage
    reads (:func:`stage_params`). Within a pipeline execution the run is nested under its
    parent (:func:`pipeline_parent`). Runs that killed processes left RUNNING are marked
    FAILED first (:func:`fail_abandoned_runs`); an http(s) server that does not answer
    fails in seconds (:func:`check_reachable`). Yields the ``mlflow`` module's active run.
    Failures mark the run FAILED (MLflow's context manager does that) and re-raise.
    ``resume_run_id``: continue that run of the experiment instead (a resumed training,
    moved under this execution's parent); its params were logged when it began.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    check_reachable(uri, _uri_setting(params))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, params)
    mlflow.set_experiment(experiment_id=experiment_id)
    fail_abandoned_runs(client, experiment_id, keep=resume_run_id)
    parent = pipeline_parent(client, experiment_id, params)
    tags = {
        STAGE_TAG: stage.partition("@")[0],
        "dinoalign.profile": params.profile,
        PROCESS_TAG: process_tag(),
        "mlflow.source.git.commit": git_commit(),
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
    }
    if parent is not None:
        tags[PIPELINE_TAG] = pipeline_run_id()
        client.update_run(parent, status="RUNNING")
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    system_metrics = params.tracking.system_metrics or None  # None: $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING decides
    try:
        if resume_run_id is not None:
            if parent is not None:
                tags[PARENT_TAG] = parent
            with mlflow.start_run(run_id=resume_run_id, tags=tags, log_system_metrics=system_metrics) as run:
                yield run
        else:
            with mlflow.start_run(run_name=run_name or stage, tags=tags, parent_run_id=parent,
                                  log_system_metrics=system_metrics) as run:
                mlflow.log_params(stage_params(stage, params, param_keys))
                yield run
    finally:
        if parent is not None:
            _settle_parent(client, experiment_id, parent)


def log_dataset(name: str, source: str, digest: str, context: str, **tags: Any) -> Any:
    """Record an input of the active run as an MLflow dataset (the runs table's Dataset
    column) and return it: ``source`` a path or URI, ``digest`` a content hash of it (at
    most 36 characters), ``context`` its role (``training``, ``evaluation``...), ``tags``
    e.g. rows."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it picked one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        resolved = resolve_dataset_source(source)
    dataset = MetaDataset(resolved, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in tags.items()} or None)
    return dataset


def run_url(run: Any) -> str:
    """Where a person finds the run: the server UI URL (in the model-training view: MLflow
    3.17 picks the view from the URL or the browser's last choice, GenAI by default) or
    the embedded store path."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return (f"{without_credentials(uri).rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/"
                f"{run.info.run_id}?workflowType=machine_learning")
    return f"{uri} (run {run.info.run_id}; browse with `make mlflow-ui`)"


def without_credentials(uri: str) -> str:
    """``uri`` with any ``user:password@`` removed (tracking URIs end up in reports)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def registered_model_name(recipe: str, experiment: str) -> str:
    """The MLflow registry name of a recipe's models: ``<experiment>-<recipe>``
    (``tracking.experiment``; the default experiment ``dinoalign`` gives
    ``dinoalign-talk2dino``). Scoped by experiment so that two pipelines sharing one MLflow
    store never move each other's ``@candidate`` / ``@champion``."""
    return f"{experiment}-{recipe}"


def register_model(recipe: str, experiment: str, model_uri: str, tags: dict[str, str] | None = None) -> str:
    """Register the logged model ``model_uri`` (``models:/m-...``, an MLflow pyfunc model:
    :func:`dinoalign.serve.log_model`) as a new version of ``<experiment>-<recipe>`` with
    ``tags``, and point the ``candidate`` alias at it; returns the version. A registered
    model of that name tagged with another experiment (``dinoalign.experiment``: created by
    hand or another tool) is a ConfigError, not a version slipped under another pipeline's
    aliases."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name = registered_model_name(recipe, experiment)
    try:
        client.create_registered_model(
            name, tags={EXPERIMENT_TAG: experiment, "dinoalign.recipe": recipe},
            description=f"dinoalign {recipe} models of the MLflow experiment {experiment!r}: MLflow pyfunc "
            "models (segment / classify / embed; docs/serving.md), each holding the recipe weights and the "
            "frozen towers it needs",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        owner = client.get_registered_model(name).tags.get(EXPERIMENT_TAG)
        if owner is not None and owner != experiment:
            raise ConfigError(
                f"the registered model {name!r} belongs to the MLflow experiment {owner!r}, not "
                f"{experiment!r}: choose another tracking.experiment") from None
    version = mlflow.register_model(model_uri, name, tags=tags or {})
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return str(version.version)


# The registered versions (and logged models) of a recipe carry the sha256 of their
# model.safetensors: how an evaluation of a model folder finds the version it measured.
WEIGHTS_TAG = "dinoalign.weights_sha256"
EVAL_TAG_PREFIX = "dinoalign.eval."


def record_evaluation(recipe: str, experiment: str, weights_sha256: str, metrics: dict[str, float],
                      dataset: Any = None) -> list[str]:
    """Attach the active (evaluate) run's headline ``metrics`` to every registered version
    of ``<experiment>-<recipe>`` tagged with these weights: as metrics of its logged model (on
    ``dataset``; the version page lists them) and as ``dinoalign.eval.<metric>`` version
    tags with ``dinoalign.eval.run_id``. Returns those versions (none: weights that were
    never registered)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_model_name(recipe, experiment)
    versions = client.search_model_versions(f"name = '{name}' and tags.`{WEIGHTS_TAG}` = '{weights_sha256}'")
    run_id = mlflow.active_run().info.run_id
    for version in versions:
        model_id = version.model_id or logged_model_id(version.source)
        if model_id:
            mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
        tags = {f"{EVAL_TAG_PREFIX}{k}": f"{v:.6f}" for k, v in metrics.items()}
        for key, value in {**tags, f"{EVAL_TAG_PREFIX}run_id": run_id}.items():
            client.set_model_version_tag(name, version.version, key, value)
    return sorted((str(v.version) for v in versions), key=int)


def logged_model_id(source: str | None) -> str | None:
    """The logged model a version was registered from (source ``models:/m-<hex>``; the
    registry stores the source, not always the id), else None."""
    found = re.fullmatch(r"models:/(m-[0-9a-f]+)", source or "")
    return found.group(1) if found else None

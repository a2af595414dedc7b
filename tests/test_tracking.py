"""MLflow runs the way their users expect (issue #16 "Runs", #20): one parent run per
pipeline execution with each stage nested under it, only the params a stage reads, runs a
killed process left RUNNING marked FAILED, an unreachable server refused in seconds, the
experiment in the UI's model-training view, registered models scoped by experiment. Real
DVC, real processes, the embedded store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dinoalign.cli import main
from dinoalign.config import flatten, load_params, to_dict
from dinoalign.errors import ConfigError
from dinoalign.tracking import (
    ABANDONED_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    EXPERIMENT_TAG,
    check_reachable,
    register_model,
    registered_model_name,
    stage_params,
    stage_run,
)

REPO = Path(__file__).resolve().parents[1]

# A stage of the test pipeline: one stage run, as every stage module opens it
STAGE_SCRIPT = """\
import sys
from dinoalign.config import load_params
from dinoalign.tracking import stage_run
with stage_run(sys.argv[1], load_params("params.yaml")):
    pass
"""


def test_a_stage_logs_the_params_its_dvc_yaml_entry_declares() -> None:
    params = load_params(REPO / "params.yaml")
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["align"]["do"]["params"]
    logged = stage_params("align@talk2dino", params)
    assert "align.talk2dino.lr" in logged and "seed" in logged and "paths.features" in logged
    assert not any(k.startswith(("align.dinotxt.", "embed.", "evaluate.", "tracking.")) for k in logged)
    assert all(any(k == d.replace("${item}", "talk2dino") or k.startswith(d.replace("${item}", "talk2dino") + ".")
                   for d in declared) for k in logged)
    assert len(logged) < len(flatten(to_dict(params))) / 3  # not the whole params.yaml
    assert set(stage_params("retrain", params, ["retrain.tolerance"])) == {"retrain.tolerance"}


def _dvc(repo: Path, env: dict[str, str], *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_each_dvc_execution_is_one_parent_run_with_its_stages_nested(tmp_path: Path) -> None:
    """`dvc exp run` of a two-stage pipeline, then `dvc repro` of one stage: two parents
    (tagged with the experiment name and the commit), each with its stage runs, each stage
    logging its declared params only. Nothing is set up beyond what DVC itself sets."""
    from mlflow import MlflowClient

    repo, db = tmp_path / "repo", f"sqlite:///{tmp_path / 'mlflow.db'}"
    repo.mkdir()
    (repo / "params.yaml").write_text(f"tracking: {{uri: '{db}', experiment: nested}}\nseed: 7\n"
                                      "data: {synthetic: {n_train: 5}}\n")
    (repo / "stage.py").write_text(STAGE_SCRIPT)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare": {"cmd": "python stage.py prepare", "params": ["data.synthetic"]},
        "teacher": {"cmd": "python stage.py teacher", "deps": ["stage.py"], "params": ["seed"]},
    }}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DINOALIGN_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
        subprocess.run(["git", *cmd], cwd=repo, env=env, check=True, capture_output=True)
    _dvc(repo, env, "init", "-q")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    _dvc(repo, env, "exp", "run", "-n", "nested-check")
    _dvc(repo, env, "repro", "-f", "-s", "teacher")  # the same commit and params: still a new execution

    client = MlflowClient(db)
    experiment = client.get_experiment_by_name("nested")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags["dinoalign.stage"] == "pipeline"]
    assert len(parents) == 2 and len(runs) == 5
    assert parents[0].data.tags["dvc.exp_name"] == "nested-check" and "dvc.exp_name" not in parents[1].data.tags
    for parent, stages in zip(parents, (["prepare", "teacher"], ["teacher"])):
        assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.source.git.commit"] == commit
        children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert sorted(children) == stages
        pipeline = parent.data.tags["dinoalign.pipeline_run_id"]
        assert {c.data.tags["dinoalign.pipeline_run_id"] for c in children.values()} == {pipeline}
        assert parent.info.end_time == max(c.info.end_time for c in children.values())
        assert children["teacher"].data.params == {"seed": "7"}
    prepare = next(r for r in runs if r.info.run_name == "prepare")
    assert prepare.data.params["data.synthetic.n_train"] == "5"
    assert all(k.startswith("data.synthetic.") for k in prepare.data.params)
    assert prepare.data.tags["dvc.exp_name"] == "nested-check"


def test_a_run_left_running_by_a_killed_stage_is_marked_failed_by_the_next(tmp_path: Path) -> None:
    """Issue #20: a SIGKILLed stage cannot close its run; the next stage run on this host
    sees that its process is gone and marks it (and its pipeline's parent) FAILED."""
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"tracking.uri={db}", "tracking.experiment=killed"]
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal\nfrom dinoalign.config import load_params\n"
         "from dinoalign.tracking import stage_run\n"
         f"with stage_run('prepare', load_params('none.yaml', {overrides!r})):\n"
         "    os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=tmp_path, env={**os.environ, "DINOALIGN_PIPELINE_RUN_ID": "killed-execution"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient(db)
    experiment = client.get_experiment_by_name("killed")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`dinoalign.stage` = 'pipeline'")
    (abandoned,) = client.search_runs([experiment.experiment_id], "tags.`dinoalign.stage` = 'prepare'")
    assert parent.info.status == abandoned.info.status == "RUNNING"

    with stage_run("prepare", load_params(tmp_path / "none.yaml", overrides)) as run:
        pass
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    abandoned = client.get_run(abandoned.info.run_id)
    assert abandoned.info.status == "FAILED" and "ended without closing this run" in abandoned.data.tags[ABANDONED_TAG]
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_system_metrics_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("DINOALIGN_ROOT", str(tmp_path))  # the embedded store's artifacts under tmp_path
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {}
    for asked in ("false", "true"):
        with stage_run("report", load_params(tmp_path / "none.yaml", [f"tracking.uri={db}",
                                                                      f"tracking.system_metrics={asked}"])) as run:
            time.sleep(1.5)
        runs[asked] = MlflowClient(db).get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in runs["true"]
    assert not any(k.startswith("system/") for k in runs["false"])


def test_an_unreachable_tracking_server_fails_in_seconds_in_one_line(tmp_path: Path, capsys) -> None:
    """Issue #20: a tracking server that is not there took 262 s and five tracebacks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    started = time.monotonic()
    assert main(["prepare", "-p", str(tmp_path / "none.yaml"), f"tracking.uri=http://user:pw@127.0.0.1:{port}"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"http://127.0.0.1:{port}" in err and "tracking.uri" in err, err
    assert "pw" not in err and not (tmp_path / "artifacts").exists()

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ConfigError, match=r"\$MLFLOW_TRACKING_URI\) does not answer within 0.5 s"):
            check_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", "$MLFLOW_TRACKING_URI", timeout=0.5)


def test_two_experiments_sharing_one_store_keep_their_own_candidates(tmp_path: Path) -> None:
    """Issue #20: two pipelines (tracking.experiment a and b) on one MLflow store register
    under <experiment>-<recipe>, so neither moves the other's @candidate; a model of that
    name that another experiment owns is refused, not joined."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'shared.db'}")
    try:
        client = MlflowClient()
        versions = {}
        for experiment in ("a", "b", "a"):
            mlflow.set_experiment(experiment)
            with mlflow.start_run():
                logged = mlflow.initialize_logged_model(name="model")
                versions[experiment] = register_model("talk2dino", experiment, f"models:/{logged.model_id}")
        assert registered_model_name("talk2dino", "a") == "a-talk2dino"
        assert registered_model_name("talk2dino", "dinoalign") == "dinoalign-talk2dino"  # the demo's
        assert versions == {"a": "2", "b": "1"}  # a's second version did not touch b's
        for experiment, version in versions.items():
            name = f"{experiment}-talk2dino"
            assert str(client.get_model_version_by_alias(name, "candidate").version) == version
            assert client.get_registered_model(name).tags[EXPERIMENT_TAG] == experiment

        client.create_registered_model("c-talk2dino", tags={EXPERIMENT_TAG: "someone-else"})
        mlflow.set_experiment("c")
        with mlflow.start_run():
            logged = mlflow.initialize_logged_model(name="model")
            with pytest.raises(ConfigError, match="belongs to the MLflow experiment 'someone-else'"):
                register_model("talk2dino", "c", f"models:/{logged.model_id}")
        assert client.search_model_versions("name = 'c-talk2dino'") == []
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("name", ["' '", "a/b", "team:x"])
def test_an_experiment_that_cannot_name_a_model_is_refused_when_params_load(name: str) -> None:
    with pytest.raises(ConfigError, match="tracking.experiment must be a non-empty name"):
        load_params(REPO / "params.yaml", [f"tracking.experiment={name}"])

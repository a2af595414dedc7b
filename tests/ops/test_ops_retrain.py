"""Retraining pieces without the full pipeline: the promotion rule, champion/candidate
decisions in a real MLflow registry, the incoming-pairs folder, the lock, the
no-new-data exit and a failed run that leaves the champion untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinoalign.config import load_params
from dinoalign.data import incoming
from dinoalign.data.prepare import prepare_pairs, read_pairs
from dinoalign.ops import promotion
from dinoalign.ops.retrain import EXIT_LOCKED, LEDGER_FILE, RetrainError, exclusive_lock, load_ledger, retrain


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("candidate, champion, tolerance, action", [
    (0.50, None, 0.02, "promote"),   # first model: nothing to beat
    (0.60, 0.55, 0.02, "promote"),   # better
    (0.54, 0.55, 0.02, "promote"),   # worse, within tolerance
    (0.53, 0.55, 0.02, "promote"),   # exactly at the tolerance
    (0.52, 0.55, 0.02, "keep"),      # worse by more than the tolerance
    (0.55, 0.55, 0.0, "promote"),
    (0.549, 0.55, 0.0, "keep"),
])
def test_promotion_rule(candidate: float, champion: float | None, tolerance: float, action: str) -> None:
    assert promotion.rule(candidate, champion, tolerance)[0] == action


def test_metric_value_reads_dotted_keys_and_refuses_non_numbers() -> None:
    metrics = {"retrieval": {"t2i": {"r1": 0.25}}, "segmentation": {"miou": None}}
    assert promotion.metric_value(metrics, "retrieval.t2i.r1") == 0.25
    with pytest.raises(KeyError, match="retrieval.t2i.r5"):
        promotion.metric_value(metrics, "retrieval.t2i.r5")
    with pytest.raises(ValueError, match="not a number"):
        promotion.metric_value(metrics, "segmentation.miou")


# ----------------------------------------------------------------------------- decisions
def _register(client: Any, model: str, pipeline_run: str, alias: str | None) -> str:
    """A real registry entry: a run tagged like a pipeline stage, a version from it."""
    import mlflow

    exp = client.get_experiment_by_name("registry") or client.get_experiment(client.create_experiment("registry"))
    run = client.create_run(exp.experiment_id, tags={"dinoalign.pipeline_run_id": pipeline_run})
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    version = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    if alias:
        client.set_registered_model_alias(model, alias, version.version)
    assert mlflow.__version__  # the registry is mlflow's own
    return str(version.version)


def _scores(table: Mapping[str, float], metric: str = "zeroshot.top1") -> promotion.Evaluate:
    """Evaluation results per model version, in the evaluate stage's layout."""
    section, key = metric.split(".")
    return lambda uri: {section: {key: table[uri.rsplit("/", 1)[1]]}}


def test_decide_and_apply_move_the_champion_only_by_the_rule(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")
    params = load_params(tmp_path / "none.yaml", ["retrain.recipes=[dinotxt]", "retrain.tolerance=0.05"])
    model = "dinoalign-dinotxt"

    # 1. no champion yet: the candidate of this run becomes champion
    v1 = _register(client, model, "run-1", "candidate")
    first = promotion.decide(client, "dinotxt", params, "run-1", "evalset", _scores({v1: 0.40}))
    assert (first.action, first.champion_version, first.candidate_value) == ("promote", None, 0.40)
    promotion.apply(client, first, "retrain-1")
    assert str(client.get_model_version_by_alias(model, "champion").version) == v1

    # 2. slightly worse, within the tolerance: promoted
    v2 = _register(client, model, "run-2", "candidate")
    second = promotion.decide(client, "dinotxt", params, "run-2", "evalset", _scores({v1: 0.40, v2: 0.37}))
    assert (second.action, second.champion_value, second.candidate_value) == ("promote", 0.40, 0.37)
    promotion.apply(client, second, "retrain-2")
    assert str(client.get_model_version_by_alias(model, "champion").version) == v2

    # 3. made worse on purpose: the champion stays, the candidate is tagged with why
    v3 = _register(client, model, "run-3", "candidate")
    third = promotion.decide(client, "dinotxt", params, "run-3", "evalset", _scores({v2: 0.37, v3: 0.10}))
    assert third.action == "keep" and "worse than champion 0.3700" in third.reason
    promotion.apply(client, third, "retrain-3")
    assert str(client.get_model_version_by_alias(model, "champion").version) == v2
    tags = client.get_model_version(model, v3).tags
    assert tags["dinoalign.retrain.decision"] == "keep" and tags["dinoalign.eval.zeroshot.top1"] == "0.100000"
    assert tags["dinoalign.retrain.compared_with"] == f"version {v2} (@champion)"  # what the version page shows
    assert (tags["dinoalign.retrain.champion_value"], tags["dinoalign.retrain.metric"]) == ("0.370000", "zeroshot.top1")

    # 4. a candidate from another pipeline run is not this retrain's model: nothing moves
    stale = promotion.decide(client, "dinotxt", params, "run-4", "evalset", _scores({}))
    assert stale.action == "keep" and "not this one" in stale.reason


# ----------------------------------------------------------------------------- incoming
def _images(folder: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_new_data_outside_its_folder_is_rejected_never_read(tmp_path: Path) -> None:
    """New caption data is untrusted: `../` paths, absolute paths and file:// URIs that
    leave the table's folder (here to a real image and to a system file) are rejects
    ``outside_allowed_roots``; ``data.allowed_roots`` widens the confinement on purpose."""
    drop = tmp_path / "drop"
    (name,) = _images(drop / "imgs", 1, seed=3)
    (outside,) = _images(tmp_path / "elsewhere", 1, seed=4)  # a valid image: only the root rejects it
    rows = {"imgs/" + name: "inside", "imgs/../imgs/" + name: "inside too", "../elsewhere/" + outside: "up",
            "imgs/../../elsewhere/" + outside: "down and up", str(tmp_path / "elsewhere" / outside): "absolute",
            (tmp_path / "elsewhere" / outside).as_uri(): "file uri", "file:///etc/passwd": "system file",
            "../../../../../../../../etc/passwd": "traversal"}
    pd.DataFrame({"image": list(rows), "caption": list(rows.values())}).to_csv(drop / "pairs.csv", index=False)
    (drop / "imgs" / "link.png").symlink_to(tmp_path / "elsewhere" / outside)
    pd.DataFrame({"image": ["imgs/link.png"], "caption": ["a symlink out"]}).to_csv(drop / "link.csv", index=False)

    folder = tmp_path / "repo" / "incoming" / "pairs"
    counts = incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path), "b1")
    assert counts["appended"] == 2 and counts["rejected"] == 6  # imgs/../imgs/x stays inside
    rejects = pq.read_table(folder / incoming.REJECTS).to_pylist()
    assert [r["reason"] for r in rejects] == ["outside_allowed_roots"] * 6
    assert all("allowed roots" in r["detail"] for r in rejects)
    linked = incoming.append_batch(folder, incoming.new_data_items(str(drop / "link.csv"), tmp_path), "b2")
    assert linked["appended"] == 0 and linked["rejected"] == 1  # symlinks are followed
    widened = incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path,
                                                                    allowed_roots=[str(tmp_path)]), "b3")
    assert widened["appended"] == 4 and widened["rejected"] == 2  # /etc/passwd is still outside


def test_incoming_pairs_append_once_and_reach_the_manifest(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    names = _images(drop / "imgs", 4, seed=1)
    pd.DataFrame({"image": [f"imgs/{n}" for n in names] + ["imgs/missing.png", ""],
                  "caption": ["a red circle", "a blue square", "a green star", "two shapes", "gone", "no image"]}
                 ).to_csv(drop / "pairs.csv", index=False)
    folder = tmp_path / "repo" / "incoming" / "pairs"
    with pytest.MonkeyPatch.context():
        counts = incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path), "b1")
    assert counts == {"records": 5, "appended": 4, "updated": 0, "already_present": 0, "rejected": 2}
    rejects = pq.read_table(folder / incoming.REJECTS).to_pylist()
    assert sorted(r["reason"] for r in rejects) == ["missing", "missing_image"]
    again = incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path), "b2")
    assert again["appended"] == 0 and again["already_present"] == 4

    root = tmp_path / "repo"
    params = load_params(root / "none.yaml", ["data.synthetic.n_train=6", "data.synthetic.n_val=2",
                                               "data.synthetic.n_test=2", f"paths.pairs={root / 'pairs'}"])
    summary = prepare_pairs(params.data, params.prepare.shard_size, params.prepare.validate_images,
                            root / params.paths.pairs, root, incoming=root / params.paths.incoming)
    manifest = read_pairs(root / "pairs").to_pylist()
    appended = [r for r in manifest if r["source"] == incoming.SOURCE]
    assert len(appended) == 4 and {r["split"] for r in appended} == {"train"}
    assert {r["image_uri"].split("/images/")[0] for r in appended} == {"incoming/pairs"}  # repo-relative
    assert summary["splits"] == {"test": 2, "train": 10, "val": 2}


def test_incoming_pointer_without_data_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "pairs.dvc").write_text("outs:\n- path: pairs\n")
    with pytest.raises(FileNotFoundError, match="dvc pull"):
        incoming.read_incoming(tmp_path / "pairs")


# ----------------------------------------------------------------------------- the run
def test_lock_refuses_a_second_run(tmp_path: Path) -> None:
    lock = tmp_path / "retrain.lock"
    with exclusive_lock(lock):
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(RetrainError, match=f"pid {os.getpid()}") as err:
            with exclusive_lock(lock):
                pass
        assert err.value.exit_code == EXIT_LOCKED
    with exclusive_lock(lock):  # released
        pass


PREPARE = f"{sys.executable} -m dinoalign.cli prepare"


def _pipeline(root: Path, cmd: str) -> None:
    """A one-stage pipeline: the real prepare stage over incoming/ (or a failing ``cmd``)."""
    (root / "dvc.yaml").write_text(f"stages:\n  prepare:\n    cmd: {cmd}\n    deps: [incoming]\n"
                                   "    params: [data]\n    outs: [artifacts/pairs]\n")


def _checkout(tmp_path: Path, cmd: str) -> Path:
    """A git + DVC checkout with a tiny params.yaml and a one-stage pipeline."""
    root = tmp_path / "repo"
    (root / "incoming").mkdir(parents=True)
    (root / "incoming" / "README.md").write_text("appended pairs\n")
    (root / "params.yaml").write_text(
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
        "data: {synthetic: {n_train: 6, n_val: 2, n_test: 4, image_size: 56}}\n")
    _pipeline(root, cmd)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if ".dvc/tmp" not in str(p)}


def test_no_new_data_exits_and_changes_nothing(tmp_path: Path) -> None:
    root = _checkout(tmp_path, PREPARE)
    drop = tmp_path / "drop"
    names = _images(drop, 2, seed=3)
    pd.DataFrame({"image": names, "caption": ["x", "y"]}).to_csv(drop / "pairs.csv", index=False)
    params = load_params(root / "params.yaml")
    # these pairs were appended before: no new pair, nothing written, no pipeline run
    incoming.append_batch(root / "incoming" / "pairs", incoming.new_data_items(str(drop / "pairs.csv"), tmp_path), "b0")
    before = _snapshot(root)
    assert retrain(params, root, str(drop / "pairs.csv"))["status"] == "no_new_data"
    after = _snapshot(root)
    lock = root / params.paths.retrain_lock
    assert {k for k in after if before.get(k) != after[k]} <= {str(lock), str(lock.parent), str(lock.parent.parent)}
    assert not (root / params.paths.decisions).exists() and not (root / "artifacts").exists()


def test_failed_run_leaves_the_champion_untouched_and_resumes(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    root = _checkout(tmp_path, "exit 3")  # the pipeline fails
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    champion = _register(client, "dinoalign-projector", "older-run", "champion")
    drop = tmp_path / "drop"
    names = _images(drop, 3, seed=5)
    pd.DataFrame({"image": names, "caption": ["a", "b", "c"]}).to_parquet(drop / "new.parquet")
    params = load_params(root / "params.yaml", ["retrain.recipes=[projector]", "retrain.push=false"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOALIGN_ROOT", str(root))
        with pytest.raises(RetrainError, match="untouched") as err:
            retrain(params, root, str(drop / "new.parquet"))
    assert "`dvc repro` failed (exit" in str(err.value)
    assert str(client.get_model_version_by_alias("dinoalign-projector", "champion").version) == champion
    decision = json.loads((root / "retrain" / "decision.json").read_text())
    assert decision["status"] == "failed" and decision["appended"] == 3
    ledger = load_ledger(root / "retrain" / LEDGER_FILE)
    assert [b["status"] for b in ledger] == ["pending"]
    assert (root / "incoming" / "pairs.dvc").exists()  # the data is versioned before the repro
    failed = client.search_runs([client.get_experiment_by_name("dinoalign").experiment_id])
    assert failed[0].info.status == "FAILED" and failed[0].data.tags["dinoalign.retrain.status"] == "failed"

    # the next run resumes the pending batch (it does not append again); fixed pipeline,
    # but no new @candidate was made by this batch's run: the champion still stays
    _pipeline(root, PREPARE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOALIGN_ROOT", str(root))
        record = retrain(params, root, str(drop / "new.parquet"))
    assert record["status"] == "done" and record["batch"] == ledger[0]["id"]
    assert [d["action"] for d in record["decisions"]] == ["keep"]
    assert "has no @candidate" in record["decisions"][0]["reason"]
    assert str(client.get_model_version_by_alias("dinoalign-projector", "champion").version) == champion
    assert [b["status"] for b in load_ledger(root / "retrain" / LEDGER_FILE)] == ["decided"]
    manifest = read_pairs(root / "artifacts" / "pairs")
    assert sum(s == incoming.SOURCE for s in manifest.column("source").to_pylist()) == 3
    assert len(record["eval_set"]) == 16


def test_cli_stdout_is_only_the_json_record(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`dinoalign retrain` prints one JSON record on stdout (cron jobs parse it) even when a
    library writes to stdout meanwhile, as MLflow does ("View run ... at: URL") when it
    talks to a tracking server; that text goes to stderr."""
    import dinoalign.ops.retrain as retrain_module
    from dinoalign.cli import main

    (tmp_path / "params.yaml").write_text(f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n")

    def chatty_retrain(params: Any, root: Path, new: str) -> dict[str, Any]:
        sys.stdout.write("🏃 View run retrain at: http://127.0.0.1:5000/#/experiments/1/runs/abc\n")
        print("more chatter")
        return {"status": "done", "batch": "b1", "source": new}

    monkeypatch.setattr(retrain_module, "retrain", chatty_retrain)
    monkeypatch.setenv("DINOALIGN_ROOT", str(tmp_path))
    assert main(["retrain", "--new", "drop.csv", "-p", str(tmp_path / "params.yaml")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"status": "done", "batch": "b1", "source": "drop.csv"}
    assert "View run retrain" in err and "more chatter" in err

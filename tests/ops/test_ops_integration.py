"""The whole story on the real stack (`dinoalign infra up`: SeaweedFS, mlflow server, Ray
head on free 127.0.0.1 ports), in a throw-away checkout with a small demo world:

1. the stack profile (params/stack.txt) through `dvc exp run` of the pipeline of one
   recipe (prepare, pretrain, teacher, embed, curate, align, evaluate; training on the Ray head):
   runs on the MLflow server with artifacts in the bucket, checkpoints in the bucket;
   `dvc push`, then a fresh clone `dvc pull`s every output with the hashes of dvc.lock;
   the MLflow UI in headless Chromium shows the runs and the registered models;
2. `dinoalign retrain` with new caption data: only the new uids are embedded, a new
   version is `@candidate`, the decision follows the rule (no champion yet: promoted), and
   the promoted model beats chance on the held-out test split by a wide margin;
3. the same data again: no new data, nothing changes.

The rule's other outcomes (a candidate worse by more than the tolerance: the champion
stays; within it: promoted) and a failed run that leaves the champion untouched are
tests/ops/test_ops_retrain.py's, on a real MLflow registry: a second retraining here
would cost another Ray Train run and evaluation (about 2 of this test's 14 minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from ops_checkout import copy_checkout, git
from ops_mlflow_ui import check_mlflow_ui
from pipeline_testing import DEMO_BACKBONE, DEMO_WORLD
from PIL import Image

from dinoalign.ops.stack import stack_env
from dinoalign.storage import S3Settings, boto3_client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = "talk2dino"  # the recipe these runs train, compare and promote (the cheapest to train)
TARGET = f"evaluate@{RECIPE}"  # dvc repro target: prepare, pretrain, teacher, embed, curate, align, evaluate
STAGES = ("prepare", "pretrain", "teacher", "embed", "curate", f"align@{RECIPE}", TARGET)
WORLD = DEMO_WORLD  # the test split must be large enough for the promotion metric to tell models apart
SMALL = {
    **{f"data.synthetic.{k}": v for k, v in WORLD.items()},
    "backbone.model_kwargs": DEMO_BACKBONE,
    # a tiny DINO pretraining: the stage runs on the stack, its weights feed embed
    "pretrain.pool_size": 64, "pretrain.epochs": 2, "pretrain.batch_size": 32, "pretrain.out_dim": 64,
    "pretrain.head_hidden_dim": 64, "pretrain.head_bottleneck_dim": 32, "pretrain.probe_images": 60,
    # a tiny CLIP teacher trained long enough that its text tower carries the demo world (the
    # R@5 below after 15 align epochs, on the earlier 3×3 world without pretraining: 0.27 with
    # 8 teacher epochs, 0.26 with 15; more adds little)
    "teacher.embed_dim": 64, "teacher.image_size": 32, "teacher.patch_size": 8, "teacher.vision_width": 96,
    "teacher.vision_layers": 2, "teacher.text_width": 64, "teacher.text_layers": 2, "teacher.text_heads": 2,
    "teacher.epochs": 10, "teacher.batch_size": 64, "teacher.warmup_steps": 20,
    # embed in-process (Ray Data's fixed costs dominate 300 images); align uses the Ray head
    "embed.engine": "local", "embed.batch_size": 64, "embed.decode_batch_size": 64, "embed.shard_rows": 128,
    "curate.levels": "[8, 2]", "curate.resample_steps": "[1, 1]", "curate.resample_points": "[8, 2]",
    "curate.target_size": 460, "curate.text_threshold": 1000,
    "align.cpus_per_worker": 1,
    f"align.{RECIPE}.epochs": 15, f"align.{RECIPE}.lr": 0.003, f"align.{RECIPE}.batch_size": 64,
    f"align.{RECIPE}.log_every": 50, f"align.{RECIPE}.checkpoint_every": 1000,
    "evaluate.zeroshot_templates": "talk2dino", "evaluate.num_examples": 1,
    # retraining: the candidate and the champion on text->image R@5 of the fixed test split
    # (270 caption queries over 90 images, chance 0.056; measured: the retrained model 0.29,
    # an untrained one (lr 1e-9) 0.07 on the earlier 3×3 world). Zero-shot top-1 over the split's ~50
    # single-object images is too noisy to tell a trained model from an untrained one
    # (0.02-0.10 vs 0.04).
    "retrain.recipes": f"[{RECIPE}]", "retrain.metrics": f"{{{RECIPE}: retrieval.t2i.r5}}",
    "retrain.tolerance": 0.02, "retrain.targets": f"[{TARGET}]",
}


def _md5s(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path.parent).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def _outs(root: Path) -> list[str]:
    """Every cached output path dvc.lock records."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return sorted({o["path"] for s in lock["stages"].values() for o in s.get("outs", [])})


def _new_captions(folder: Path, start: int, count: int) -> Path:
    """Unseen train images of the same demo world (indices past n_train) with their
    captions, as a pairs csv (one caption per row, rows of an image merge)."""
    from dinoalign.config import load_params
    from dinoalign.data.synthetic import render

    world = load_params(REPO / "params.yaml", [f"data.synthetic.{k}={v}" for k, v in WORLD.items()]).data.synthetic
    folder.mkdir(parents=True)
    rows = []
    for index in range(start, start + count):
        sample = render(world, "train", index)
        Image.fromarray(sample.image).save(folder / f"new-{index}.png")
        rows += [{"image": f"new-{index}.png", "caption": c} for c in sample.captions]
    pd.DataFrame(rows).to_csv(folder / "pairs.csv", index=False)
    return folder / "pairs.csv"


def _run(cmd: list[str], root: Path, env: dict[str, str], timeout: float = 1800) -> str:
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def _embed_run(client: Any, experiment: str, pipeline_run: str) -> Any:
    runs = client.search_runs([experiment], f"tags.`dinoalign.stage` = 'embed' and "
                                            f"tags.`dinoalign.pipeline_run_id` = '{pipeline_run}'")
    assert len(runs) == 1, [r.data.tags for r in runs]
    return runs[0]


@pytest.mark.timeout(1800)  # ~16 min alone on 2 busy cores: the pipeline and one retraining
def test_pipeline_on_the_stack_then_scheduled_retraining(tmp_path: Path, chromium: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    root = copy_checkout(REPO, tmp_path / "repo", SMALL)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "DINOALIGN_"))}
    base["PATH"] = f"{Path(sys.executable).parent}:{base['PATH']}"  # `python` of the stages = this venv
    base.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost", GIT_COMMITTER_NAME="test",
                GIT_COMMITTER_EMAIL="test@localhost")
    dinoalign = [sys.executable, "-m", "dinoalign.cli"]
    _run([*dinoalign, "infra", "up", "--ray-cpus", "2"], root, base)
    try:
        env = {**base, **stack_env(root)}
        settings = S3Settings(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                              "us-east-1")
        s3 = boto3_client(settings=settings)
        bucket = env["DINOALIGN_STACK_BUCKET"]
        # the mlflow server takes its admin's basic auth only (stack.env has it for the stages);
        # MLflow's client reads it from this process's environment at each request
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, env[key])
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])

        # ---- 1. the pipeline on the stack, with the stack profile
        profile = [ln.strip() for ln in (root / "params" / "stack.txt").read_text().splitlines()
                   if ln.strip() and not ln.startswith("#")]
        started = time.monotonic()
        _run([sys.executable, "-m", "dvc", "exp", "run", *[f"-S{p}" for p in profile], TARGET], root, env)
        print(f"pipeline on the stack: {time.monotonic() - started:.0f} s")
        assert yaml.safe_load((root / "params.yaml").read_text())["paths"]["checkpoints"] == "s3://dinoalign/checkpoints"

        def keys(prefix: str) -> list[str]:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        assert any("checkpoint" in k for k in keys("checkpoints/"))  # Ray Train wrote to the bucket
        experiment = client.get_experiment_by_name("dinoalign")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags["dinoalign.stage"] == "pipeline"]  # one dvc exp run
        runs = [r for r in runs if r is not parent]
        assert sorted(r.data.tags["mlflow.runName"] for r in runs) == sorted(STAGES)
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
        assert parent.data.tags["dvc.exp_name"] and parent.info.status == "FINISHED"
        assert all(r.data.tags["dinoalign.profile"] == "stack" for r in [parent, *runs])
        secrets_ = (env["MLFLOW_TRACKING_PASSWORD"], env["AWS_SECRET_ACCESS_KEY"])
        assert not any(s in json.dumps([r.data.params, r.data.tags]) for r in [parent, *runs] for s in secrets_)
        assert keys(f"mlflow/{experiment.experiment_id}/")  # run artifacts went through the server
        model = f"dinoalign-{RECIPE}"
        assert str(client.get_model_version_by_alias(model, "candidate").version) == "1"

        # dvc push to the bucket, then a fresh clone pulls every output with the same hashes
        _run([sys.executable, "-m", "dvc", "push"], root, env)
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "pipeline on the stack")
        (features,) = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["embed"]["outs"]
        assert keys(f"dvc/files/md5/{features['md5'][:2]}/{features['md5'][2:]}")  # the features are in the bucket
        clone = tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
        _run([*dinoalign, "infra", "dvc-remote", "stack", f"s3://{bucket}/dvc", "--default"], clone, env)
        # the target and what it depends on: the other recipes' stages did not run here
        _run([sys.executable, "-m", "dvc", "pull", "--with-deps", TARGET], clone, env)
        for out in _outs(root):
            assert _md5s(clone / out) == _md5s(root / out), out
        assert "up to date" in _run([sys.executable, "-m", "dvc", "status", TARGET], clone, env)

        check_mlflow_ui(chromium, env["MLFLOW_TRACKING_URI"], experiment.experiment_id, STAGES,
                        {model: "candidate"}, tmp_path / "shots", pipelines=1, datasets={TARGET: "pairs:test"},
                        credentials=(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]))

        # ---- 2. new caption data lands: retrain
        _run([sys.executable, "-m", "dvc", "freeze", "teacher"], root, env)  # the stand-in CLIP stays put
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "freeze the stand-in teacher")
        first_drop = _new_captions(tmp_path / "drop1", WORLD["n_train"], 24)
        record = json.loads(_run([*dinoalign, "retrain", "--new", str(first_drop)], root, env))
        assert record["status"] == "done" and record["appended"] == 24
        embed = _embed_run(client, experiment.experiment_id, record["batch"])
        assert embed.data.metrics["images_embedded"] == 24  # only the new uids
        assert embed.data.metrics["images_skipped"] == sum(WORLD.values())  # the others were embedded before
        (decision,) = record["decisions"]
        assert decision["candidate_version"] == "2"
        assert decision["champion_version"] is None and decision["action"] == "promote"  # nothing to beat yet
        assert str(client.get_model_version_by_alias(model, "champion").version) == decision["candidate_version"]
        assert json.loads((root / "retrain" / "decision.json").read_text())["batch"] == record["batch"]
        assert "in sync" in _run([sys.executable, "-m", "dvc", "status", "-c"], root, env)  # pushed
        # what it promoted learned: R@5 on the held-out test split, as retrain measured the
        # registered version and as the evaluate stage measured the trained folder, far above chance
        details = json.loads((root / "metrics" / f"{RECIPE}.details.json").read_text())["retrieval"]["t2i"]
        assert decision["candidate_value"] == pytest.approx(details["r5"], abs=1e-9), (decision, details)
        assert decision["candidate_value"] > 2 * details["chance_r5"], (decision, details)

        # ---- 3. the same data again: no new data, quickly, nothing changes
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "a retraining")
        n_runs = len(client.search_runs([experiment.experiment_id]))
        record = json.loads(_run([*dinoalign, "retrain", "--new", str(first_drop)], root, env))
        assert record["status"] == "no_new_data"
        assert len(client.search_runs([experiment.experiment_id])) == n_runs  # no stage ran
        assert git(root, "status", "--porcelain") == ""
    finally:
        _run([*dinoalign, "infra", "down"], root, base)

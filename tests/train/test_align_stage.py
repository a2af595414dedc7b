"""The align stage for real: Ray Train on the demo world's features, MLflow tracking and
registration, resume from S3 checkpoints after a stop and a worker crash, 2-worker DDP,
and each trained recipe beating chance by a wide margin on the held-out test split."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_testing import DemoFeatures, binomial_tail

from dinoalign.backbones.text import build_text_encoder
from dinoalign.cli import main
from dinoalign.data.images import image_limits
from dinoalign.data.prepare import read_pairs
from dinoalign.embed.store import load_image_features
from dinoalign.recipes import Recipe, load_recipe
from dinoalign.stages.align import run as run_align
from dinoalign.tracking import registered_model_name
from dinoalign.train.plan import plan_align

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Short demo schedules: each run trains in seconds on the small demo world. Held-out R@5 as
# the tests print it (chance 0.028; asserted: above twice that, p < 1e-4 at chance), measured
# on 2026-12-07: 2-worker dinotxt 0.28 after 16 epochs (0.55 after 24), projector 0.24 after
# 15 epochs (0.29 after 30); halving them took both tests from ~4.5 to ~2 min in make test.
FAST = {
    "talk2dino": ["align.talk2dino.epochs=25", "align.talk2dino.lr=0.003", "align.talk2dino.batch_size=64",
                  "align.talk2dino.model={projection: mlp, temperature: 0.07, learnable_temperature: true}",
                  "align.talk2dino.log_every=10", "align.talk2dino.checkpoint_every=100"],
    "dinotxt": ["align.dinotxt.epochs=16", "align.dinotxt.batch_size=64", "align.dinotxt.lr=0.002",
                "align.dinotxt.warmup_steps=10", "align.dinotxt.log_every=10",
                "align.dinotxt.checkpoint_every=50", "align.dinotxt.hflip=false",
                "align.dinotxt.model={text_width: 64, text_layers: 1, text_heads: 2, drop_path: 0.0}"],
    "projector": ["align.projector.epochs=15", "align.projector.batch_size=32", "align.projector.lr=0.003",
                  "align.projector.log_every=10", "align.projector.checkpoint_every=70",
                  "align.projector.model={hidden_dim: 128, depth: 1, bottleneck_dim: 64}"],
}


def _test_inputs(recipe: str, features: DemoFeatures, uids: list[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """The recipe's image batch for ``uids`` (rows in that order) and its text encoder:
    raw strings for dinotxt, the frozen teacher CLIP's text features otherwise."""
    columns = {"talk2dino": ["head_embeddings"], "projector": ["token_mean"],
               "dinotxt": ["cls", "registers", "patches"]}[recipe]
    feats = load_image_features(str(features.features_dir), columns, uids)
    order = {u: i for i, u in enumerate(feats["uid"])}
    rows = np.array([order[u] for u in uids])
    if recipe == "dinotxt":
        parts = [feats["cls"][:, None], feats["registers"], feats["patches"]]
        tokens = np.concatenate([p.astype(np.float32) for p in parts], 1)[rows]
        return {"tokens_vision": torch.from_numpy(tokens)}, lambda texts: texts
    encoder = build_text_encoder("open_clip", f"local-dir:{features.clip_dir}")
    return {c: torch.from_numpy(feats[c][rows]) for c in columns}, encoder.encode


def scores_on_test_split(model: Recipe, recipe: str, features: DemoFeatures) -> dict[str, float]:
    """What the trained model does on the unseen test split, each with its chance level and
    the probability that a chance-level model does as well (binomial tail):

    - text→image R@5: each test image's first caption retrieves among all test images
      (captions are what the recipes train on; chance 5/N);
    - zero-shot top-1 over the 30 classes on the single-object test images ("a photo of a
      red circle", a prompt unlike the training captions), also on held-out compositions.
    """
    world = features.world
    classes, heldout = world["classes"], set(world["heldout_compositions"])
    test = sorted((r["uid"], r["label"], r["captions"][0]) for r in read_pairs(features.pairs_dir).to_pylist()
                  if r["split"] == "test")
    uids = [u for u, _, _ in test]
    batch, encode = _test_inputs(recipe, features, uids)
    labelled = [i for i, (_, label, _) in enumerate(test) if label]
    with torch.no_grad():
        by_caption = model.similarity(model.encode_text(encode([c for _, _, c in test])), batch)  # N × N
        by_class = model.similarity(model.encode_text(encode([f"a photo of a {c}" for c in classes])),
                                    {k: v[labelled] for k, v in batch.items()})  # classes × labelled
    n = len(test)
    ranks = (by_caption > by_caption.diagonal()[:, None]).sum(dim=1)  # images scored above the right one
    r5_hits = int((ranks < 5).sum())
    labels = [test[i][1] for i in labelled]
    hits = np.array([classes[j] == label for j, label in zip(by_class.argmax(dim=0).tolist(), labels, strict=True)])
    is_heldout = np.array([label in heldout for label in labels])
    chance = 1.0 / len(classes)
    return {"t2i_r5": r5_hits / n, "chance_r5": 5 / n, "images": n,
            "r5_p_at_chance": binomial_tail(r5_hits, n, 5 / n),
            "top1": hits.mean(), "heldout_top1": hits[is_heldout].mean(), "seen_top1": hits[~is_heldout].mean(),
            "chance_top1": chance, "labelled_images": len(labels),
            "top1_p_at_chance": binomial_tail(int(hits.sum()), len(labels), chance)}


def assert_beats_chance(scores: dict[str, float]) -> None:
    """Far above chance on the unseen test images: text→image R@5 at least twice chance,
    a score a chance-level model reaches with p < 1e-4. (Zero-shot top-1 on the ~90
    labelled test images is printed, not asserted: with prompts unlike the training
    captions it is too noisy on this small world; the demo's report shows it per split.)"""
    assert scores["t2i_r5"] > 2 * scores["chance_r5"] and scores["r5_p_at_chance"] < 1e-4, scores


def assert_loss_below_chance(curve: list[dict[str, float]], batch_size: int, margin: float) -> None:
    """InfoNCE over a batch of B starts near ln B (no better than guessing the pair);
    training must end ``margin`` nats below it."""
    assert curve[-1]["loss"] < math.log(batch_size) - margin, (curve[0]["loss"], curve[-1]["loss"])


def _align_overrides(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    """Overrides (on top of the demo features') that train ``recipe`` fast into tmp_path."""
    return [f"align.recipe={recipe}", *FAST[recipe], f"paths.models={tmp_path / 'models'}",
            f"paths.curves={tmp_path / 'align'}", f"paths.checkpoints={tmp_path / 'checkpoints'}", *extra]


def _curve(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_talk2dino_stage_trains_logs_registers_and_beats_chance(
    demo_features: DemoFeatures, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    argv = [*demo_features.overrides, *_align_overrides("talk2dino", tmp_path)]
    assert main(["align", "-p", str(demo_features.params_file), *argv]) == 0
    # the local Ray has no State API: Ray Train's placement-group cleaner would log a
    # failed query every second of the run (dinoalign.ray_runtime.quiet_worker_logs), and its
    # preemption watcher (off on one node) an error about its constructor arguments
    console = capfd.readouterr()
    assert "Failed to query Ray Train Controller actor state" not in console.out + console.err
    assert "PreemptionWatcher" not in console.out + console.err
    # quiet Ray (dinoalign.ray_runtime): no worker prefixes, colour codes or Ray tracebacks;
    # the worker's progress lines once each, as the driver's own
    assert "pid=" not in console.out + console.err and "\x1b[" not in console.out + console.err
    assert "Traceback" not in console.out + console.err
    progress = [line for line in console.out.splitlines() if line.startswith("align@talk2dino: step ")]
    assert 2 <= len(progress) <= 13 and len(set(progress)) == len(progress), progress

    model_dir = tmp_path / "models" / "talk2dino"
    assert sorted(os.listdir(model_dir)) == ["config.json", "model.safetensors"]
    summary = json.loads((tmp_path / "align" / "talk2dino" / "metrics.json").read_text())
    curve = _curve(tmp_path / "align" / "talk2dino" / "curve.csv")
    steps = summary["steps"]
    assert [r["step"] for r in curve] == sorted({*range(10, steps + 1, 10), steps})
    assert progress[-1].startswith(f"align@talk2dino: step {steps}/{steps} (100%) epoch 25.0/25 loss ")
    assert " lr " in progress[-1] and " logit scale " in progress[-1] and " samples/s" in progress[-1]
    assert_loss_below_chance(curve, 64, margin=0.2)
    world = demo_features.world
    assert summary["train_uids"] == world["splits"]["train"]["count"]  # no curated file: every train uid
    assert summary["train_samples"] == 3 * summary["train_uids"]  # one sample per caption

    client = MlflowClient(demo_features.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dinoalign.recipe"] == "talk2dino"
    assert run.data.params["align.talk2dino.lr"] == "0.003"  # the resolved params, flattened
    spec = json.loads((demo_features.features_dir / "manifest.json").read_text())["spec"]
    assert run.data.params["model.vision_dim"] == str(spec["columns"]["head_embeddings"][1])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [int(r["step"]) for r in curve]  # every log_every, not every step
    assert {"samples_per_s", "lr", "t2i_accuracy"} <= set(run.data.metrics)

    version = client.get_model_version_by_alias(registered_model_name("talk2dino", "dinoalign"), "candidate")
    assert version.run_id == run.info.run_id and str(version.version) == str(summary["model_version"])
    downloaded = download_artifacts("models:/dinoalign-talk2dino@candidate", dst_path=str(tmp_path / "dl"),
                                    tracking_uri=demo_features.tracking_uri)
    # an MLflow pyfunc model (dinoalign.serve) whose bundle holds the trained recipe
    assert "python_function" in (Path(downloaded) / "MLmodel").read_text()
    assert version.tags["dinoalign.weights_sha256"] == summary["weights_sha256"]
    registered = load_recipe(str(Path(downloaded) / "artifacts" / "bundle" / "recipe"))
    exported = load_recipe(str(model_dir))
    for (name, a), b in zip(registered.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    accuracy = scores_on_test_split(exported, "talk2dino", demo_features)
    print("talk2dino on the test split:", accuracy)
    assert_beats_chance(accuracy)


def test_dinotxt_two_worker_ddp_beats_chance(demo_features: DemoFeatures, tmp_path: Path) -> None:
    params = demo_features.params(*_align_overrides("dinotxt", tmp_path, "align.num_workers=2",
                                                     "align.cpus_per_worker=1"))
    summary = run_align(params, demo_features.root)
    assert summary["workers"] == 2
    curve = _curve(tmp_path / "align" / "dinotxt" / "curve.csv")
    assert_loss_below_chance(curve, 64, margin=0.2)
    accuracy = scores_on_test_split(load_recipe(str(tmp_path / "models" / "dinotxt")), "dinotxt", demo_features)
    print("dinotxt on the test split:", accuracy)
    assert_beats_chance(accuracy)


def _stop_and_crash_callbacks() -> tuple[Any, Any]:
    """Ray Train callbacks (they run in the Ray Train controller process): one ends the
    run at its first checkpoint, one SIGKILLs a training worker at its first checkpoint."""
    import psutil
    from ray import cloudpickle
    from ray.train import UserCallback

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller cannot import tests

    class StopAtFirstCheckpoint(UserCallback):
        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if checkpoint is not None:
                raise RuntimeError("stopped after the first checkpoint")

    class KillAWorkerAtFirstCheckpoint(UserCallback):
        def __init__(self) -> None:
            self.killed = False

        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if checkpoint is None or self.killed:
                return
            siblings = psutil.Process(os.getppid()).children()  # the raylet's workers
            workers = [p for p in siblings if "RayTrainWorker" in " ".join(p.cmdline())]
            os.kill(workers[0].pid, signal.SIGKILL)
            self.killed = True

    return StopAtFirstCheckpoint(), KillAWorkerAtFirstCheckpoint()


def test_projector_resumes_from_s3_checkpoints_after_a_stop_and_a_worker_crash(
    demo_features: DemoFeatures, s3_server: Any, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from dinoalign.storage import boto3_client
    from dinoalign.train.loop import Trainer, TrainJob

    boto3_client().create_bucket(Bucket="align-checkpoints")
    params = demo_features.params(*_align_overrides("projector", tmp_path, "align.max_failures=1",
                                                     "paths.checkpoints=s3://align-checkpoints/runs",
                                                     "align.cpus_per_worker=2", "align.torch_threads=1"))
    stop, crash = _stop_and_crash_callbacks()
    with pytest.raises(Exception, match="stopped after the first checkpoint"):
        run_align(params, demo_features.root, callbacks=[stop])
    root = demo_features.root
    plan = plan_align(params.align, params.seed, image_limits(params.data), features=str(root / params.paths.features),
                      pairs_dir=str(root / params.paths.pairs), curated=None,
                      checkpoints="s3://align-checkpoints/runs", root=root)
    listed = boto3_client().list_objects_v2(Bucket="align-checkpoints", Prefix=f"runs/{plan.run_name}/")
    assert any(o["Key"].endswith("/trainer_state.pt") for o in listed.get("Contents", []))

    summary = run_align(params, demo_features.root, callbacks=[crash])
    checkpoint_every = params.align.projector.checkpoint_every
    assert summary["resumed"] and summary["torch_threads"] == 1  # align.torch_threads, not cpus_per_worker
    # the crash restarted the worker group from a checkpoint after the first one
    assert summary["resumed_from_step"] >= 2 * checkpoint_every
    client = MlflowClient(demo_features.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("dinoalign").experiment_id],
        f"tags.`dinoalign.align_run` = '{plan.run_name}'",
    )
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # one MLflow run, continued

    # The loss curve equals an uninterrupted run of the same job in one process, with the
    # worker's single torch thread.
    job = TrainJob(plan.recipe, plan.model_config, plan.training, params.seed, plan.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = Trainer(job, plan.data)
        reference.run(on_log=lambda row: None, on_checkpoint=lambda trainer: None)
    finally:
        torch.set_num_threads(threads)
    resumed = _curve(tmp_path / "align" / "projector" / "curve.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference.curve]
    for got, want in zip(resumed, reference.curve, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    # issue #19 part 4: the final weights too (the Ray Train worker's gloo all-reduce of one
    # rank and the in-process run round differently, hence a tolerance, as for the losses)
    model = load_recipe(str(tmp_path / "models" / "projector"))
    want = reference.model.state_dict()
    assert list(model.state_dict()) == list(want)
    for name, got in model.state_dict().items():
        torch.testing.assert_close(got, want[name], rtol=1e-3, atol=1e-5, msg=name)

    accuracy = scores_on_test_split(model, "projector", demo_features)
    print("projector on the test split:", accuracy)
    assert_beats_chance(accuracy)

"""The pretrain stage (demo profile) in the pipeline: ``dinoalign pretrain`` in a temporary
checkout whose params.yaml is the repository's (relative ``paths.pretrained`` and
``backbone.weights``) with a tiny pretraining; the checkpoint it writes loaded by the
embed stage, dinotxt's online backbone and a served model bundle from outside the
checkout; the disabled and refused cases; the params section; naming the backbone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from dinoalign.cli import main
from dinoalign.config import (
    RANDOM_INIT,
    BackboneConfig,
    apply_overrides,
    describe_backbone,
    load_params,
)
from dinoalign.errors import ConfigError
from dinoalign.pretrain.config import DESCRIPTION, PretrainConfig

REPO = Path(__file__).resolve().parents[2]
TINY_VIT = "{embed_dim: 48, depth: 2, num_heads: 3, init_values: 1.0, weight_init: jax}"
# pool 64, 2 epochs of 2 steps of 32, a small head; 56-px images, 4×4 / 2×2-patch crops
TINY = {
    "pretrain.pool_size": 64, "pretrain.epochs": 2, "pretrain.batch_size": 32, "pretrain.out_dim": 64,
    "pretrain.head_hidden_dim": 64, "pretrain.head_bottleneck_dim": 32, "pretrain.global_crop_size": 56,
    "pretrain.local_crop_size": 28, "pretrain.probe_images": 60,
    # DINOv2's iBOT term on (whatever params.yaml says): its columns and monitors are checked
    "pretrain.ibot_loss_weight": 1.0,
    "backbone.model_kwargs": TINY_VIT, "backbone.img_size": 56,
    "data.synthetic.image_size": 56, "data.synthetic.n_train": 24, "data.synthetic.n_val": 4,
    "data.synthetic.n_test": 12,
    # the embed stage on the pretrained backbone alone: no CLIP, no text tower
    "clip.image_features": "false", "embed.text_encoders": "[]", "embed.engine": "local",
    "embed.img_size": 56, "embed.batch_size": 8, "embed.decode_batch_size": 8, "embed.shard_rows": 16,
    "embed.loader_workers": 0, "embed.keep_patches": "true",
}
PROBE_KEYS = {
    "attention": {"images", "split", "head_selection", "area_share", "pretrained", "random_init",
                  "selected_head", "mean_of_heads"},
    "knn": {"k", "temperature", "references", "queries", "class", "colour", "background"},
}


@dataclasses.dataclass(frozen=True)
class Checkout:
    root: Path
    out: str  # what `dinoalign pretrain` printed

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def pretrained(self) -> Path:
        return self.root / "artifacts" / "pretrain"

    def params(self, *overrides: str) -> Any:
        return load_params(self.params_file, overrides)


def _checkout(root: Path, **extra: Any) -> Path:
    """``root``/params.yaml: the repository's with the tiny settings and an MLflow store
    under ``root``; every path in it stays relative to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = {**TINY, "tracking.uri": f"sqlite:///{root / 'mlruns.db'}", **extra}
    raw = apply_overrides(raw, [f"{k}={v}" for k, v in overrides.items()])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    """``dinoalign pretrain`` run from another working directory than the checkout."""
    import contextlib
    import io

    base = tmp_path_factory.mktemp("pretrain_stage")
    params_file = _checkout(base / "repo")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(elsewhere)
        mp.setenv("DINOALIGN_ROOT", str(base / "repo"))  # MLflow artifacts under the checkout
        assert main(["pretrain", "-p", str(params_file)]) == 0
    return Checkout(base / "repo", printed.getvalue())


def test_the_stage_writes_checkpoint_curve_and_probe_metrics(checkout: Checkout) -> None:
    import safetensors

    out = checkout.pretrained
    assert sorted(p.name for p in out.iterdir()) == ["curve.csv", "metrics.json", "model.safetensors"]
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["description"] == DESCRIPTION
    lines = (out / "curve.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:5] == ["epoch", "step", "loss", "teacher_entropy", "teacher_marginal_entropy"]
    assert header[-4:] == ["dino_loss", "ibot_loss", "teacher_patch_entropy", "patch_center_norm"]
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1"]  # one row per epoch

    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"]["description"] == DESCRIPTION and m["checkpoint"] == "model.safetensors"
    assert m["pool"] == {"split": "train", "images": 64, "image_size": 56} and m["steps"] == 4
    final = m["final"]
    assert final["log_k"] == pytest.approx(math.log(64))
    assert final["teacher_entropy_over_log_k"] == pytest.approx(final["teacher_entropy"] / final["log_k"])
    assert 0 < final["teacher_entropy_over_log_k"] < 1 and final["crops_per_s"] > 0
    assert final["loss"] == pytest.approx(final["dino_loss"] + final["ibot_loss"], rel=1e-5)
    assert 0 < final["teacher_patch_entropy"] < final["log_k"]
    assert {"render", "pretrain", "probe", "total"} <= set(m["seconds"])
    probe = m["probe"]
    for block, keys in PROBE_KEYS.items():
        assert keys <= set(probe[block]), (block, sorted(probe[block]))
    attention = probe["attention"]
    assert attention["images"] == 60 and attention["split"] == "test"
    assert attention["head_selection"]["split"] == "val"
    for name in ("pretrained", "random_init"):
        assert {"best_head", "best", "mean_heads", "best_above_area", "selected_head", "selected"} <= set(attention[name])
        assert 0 <= attention[name]["mean_heads"] <= attention[name]["best"] <= 1
        assert attention[name]["selected"] <= attention[name]["best"]  # best on test is the upper bound
    for comparison in ("selected_head", "mean_of_heads"):
        paired = attention[comparison]
        assert paired["n"] == 60 and 0 <= paired["wins"] <= 60
        assert 0 < paired["sign_test_p"] <= 1 and 0 < paired["permutation_p"] <= 1
        assert paired["difference"] == pytest.approx(paired["pretrained"] - paired["random_init"], abs=1e-6)
    assert attention["mean_of_heads"]["pretrained"] == pytest.approx(attention["pretrained"]["mean_heads"], abs=1e-6)
    assert probe["knn"]["references"]["split"] == "val" and probe["knn"]["queries"]["split"] == "test"
    for attribute in ("class", "colour", "background"):
        block = probe["knn"][attribute]
        assert {"pretrained", "random_init", "chance", "majority"} <= set(block)
        assert 0 < block["chance"] <= block["majority"] <= 1

    printed = checkout.out.splitlines()
    epochs = [line for line in printed if line.startswith("pretrain: epoch ")]
    assert len(epochs) == 2 and all("teacher entropy" in e and "log K" in e and "crops/s" in e for e in epochs)
    assert all(" (DINO " in e and " + iBOT " in e and ", patches " in e for e in epochs)
    assert any(line.startswith("pretrain: DINO + iBOT on 64 unlabelled demo images") for line in printed)
    summary = next(line for line in printed if line.startswith("pretrain: final loss"))
    assert "paired permutation p" in summary and "k-NN top-1 class" in summary and DESCRIPTION in summary
    assert printed[-1].startswith("pretrain: MLflow run ")


def test_the_mlflow_run_has_per_epoch_metrics_and_the_probe(checkout: Checkout) -> None:
    from mlflow import MlflowClient

    params = checkout.params()
    client = MlflowClient(params.tracking.uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], "tags.`dinoalign.stage` = 'pretrain'")
    assert run.data.tags["dinoalign.backbone"] == DESCRIPTION
    for key in ("loss", "teacher_entropy", "teacher_marginal_entropy", "center_norm", "teacher_temp", "lr",
                "crops_per_s", "dino_loss", "ibot_loss", "teacher_patch_entropy", "patch_center_norm"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    metrics = run.data.metrics
    for key in ("final.loss", "final.ibot_loss", "final.teacher_patch_entropy", "final.teacher_entropy_over_log_k", "probe.attention.pretrained.best",
                "probe.attention.random_init.mean_heads", "probe.attention.area_share",
                "probe.attention.selected_head.permutation_p", "probe.knn.class.pretrained", "probe.knn.class.majority"):
        assert key in metrics, key
    assert run.data.params["pretrain.epochs"] == "2" and "backbone.weights" not in run.data.params
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curve.csv", "metrics.json"} <= artifacts


@pytest.fixture(scope="module")
def embedded(checkout: Checkout) -> str:
    """prepare + embed (local engine) in the checkout, run in it as ``dvc repro`` runs them
    (the manifest's image paths are checkout-relative); returns the features location."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(checkout.root)
        mp.setenv("DINOALIGN_ROOT", str(checkout.root))
        for stage in ("prepare", "embed"):
            assert main([stage, "-p", str(checkout.params_file)]) == 0, stage
    return str(checkout.root / "artifacts" / "features")


def test_embed_stores_features_of_the_pretrained_checkpoint(
    checkout: Checkout, embedded: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The features are the pretrained file's (its weights hash, its CLS), not the random
    init's; the spec names the weights as params do and the backbone in words; from
    outside the checkout (Ray actors, Ray Train workers) the embed job and dinotxt's
    online backbone resolve the relative file against the checkout."""
    import numpy as np
    import torch

    from dinoalign.backbones.dinov2 import build_backbone_from, state_hash
    from dinoalign.data.images import image_limits
    from dinoalign.data.prepare import read_pairs
    from dinoalign.embed.engine import decode_batch, feature_spec
    from dinoalign.embed.store import load_image_features
    from dinoalign.errors import DataFileMissing
    from dinoalign.stages.embed import embed_job
    from dinoalign.train.data import check_backbone, features_backbone, read_spec

    monkeypatch.chdir(tmp_path)
    params, root = checkout.params(), checkout.root
    assert params.backbone.weights == "artifacts/pretrain/model.safetensors"
    with pytest.raises(DataFileMissing, match="not found"):  # relative to this cwd: not there
        build_backbone_from(params.backbone, params.seed)
    pretrained = build_backbone_from(params.backbone.at_root(root), params.seed)
    random_init = build_backbone_from(dataclasses.replace(params.backbone, weights=None), params.seed)

    spec = read_spec(embedded)
    recorded = spec["backbone"]
    assert recorded["weights"] == "artifacts/pretrain/model.safetensors"  # as params give it
    assert recorded["description"] == DESCRIPTION and not recorded["random_init"]
    assert recorded["weights_sha"] == state_hash(pretrained) != state_hash(random_init)

    row = read_pairs(root / "artifacts" / "pairs").to_pylist()[0]
    stored = torch.from_numpy(load_image_features(embedded, ["cls"], [row["uid"]])["cls"].astype(np.float32))
    pre = spec["preprocessing"]["backbone"]
    pixels = decode_batch({"uid": [row["uid"]], "image_uri": [str(root / row["image_uri"])]}, img_size=56,
                          interpolation=pre["interpolation"], crop_pct=pre["crop_pct"], crop_mode=pre["crop_mode"],
                          **image_limits(params.data))["image"]
    x = pretrained.normalize(torch.from_numpy(pixels))
    torch.testing.assert_close(stored, pretrained(x).cls, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stored, random_init(x).cls, atol=1e-2)

    job = embed_job(params, embedded, root)
    assert job.backbone_at_root.weights == str(root / "artifacts/pretrain/model.safetensors")
    assert feature_spec(job)["spec_hash"] == spec["spec_hash"]  # the same spec from anywhere
    # dinotxt's online images: the Ray Train workers rebuild it from the spec + the checkout
    assert features_backbone(spec, root).weights == str(root / "artifacts/pretrain/model.safetensors")
    check_backbone(spec, params.seed, embedded, root)


def test_a_served_bundle_carries_the_pretrained_backbone(
    checkout: Checkout, embedded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve.write_bundle copies the relative weights file into the bundle (bundle.json
    names it in words), and the loaded bundle rebuilds exactly those weights."""
    import torch

    from dinoalign.backbones.dinov2 import build_backbone_from, state_hash
    from dinoalign.recipes import build
    from dinoalign.serve import load_bundle, write_bundle
    from dinoalign.train.data import model_config, read_spec

    monkeypatch.chdir(tmp_path)
    params = checkout.params()
    spec = read_spec(embedded)
    torch.manual_seed(0)
    model_dir = tmp_path / "dinotxt"
    build("dinotxt", model_config("dinotxt", params.align.dinotxt, spec)).save(str(model_dir))
    bundle = write_bundle(model_dir, params, checkout.root, tmp_path / "bundle")
    info = json.loads((bundle / "bundle.json").read_text())["towers"]["backbone"]
    assert info["bundled"] and info["description"] == DESCRIPTION
    assert info["from"]["weights"] == "artifacts/pretrain/model.safetensors"
    predictor = load_bundle(bundle, "cpu")
    expected = build_backbone_from(params.backbone.at_root(checkout.root), params.seed)
    assert state_hash(predictor.model.backbone) == state_hash(expected)
    assert predictor.model.backbone_description == DESCRIPTION


def test_disabled_it_writes_only_the_skip_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params_file = _checkout(tmp_path, **{"pretrain.enabled": "false", "backbone.weights": "null"})
    assert main(["pretrain", "-p", str(params_file)]) == 0
    out = tmp_path / "artifacts" / "pretrain"
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    note = json.loads((out / "metrics.json").read_text())
    assert note["skipped"] is True and "pretrain.enabled=false" in note["reason"]
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("pretrain: skipped (pretrain.enabled=false")


def test_a_real_data_source_with_pretrain_enabled_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params_file = _checkout(tmp_path, **{"data.source": "coco"})
    assert main(["pretrain", "-p", str(params_file)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dinoalign pretrain: pretrain is demo-only; set pretrain.enabled=false and point "
                           "backbone.weights at DINOv2 weights"), line
    assert not (tmp_path / "artifacts" / "pretrain").exists()


def test_help_lists_pretrain_between_prepare_and_teacher(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "prepare -> pretrain -> teacher -> embed" in text
    assert text.index("prepare stage: ") < text.index("pretrain stage: ") < text.index("teacher stage: ")


# ----------------------------------------------------------------------------- params


def test_the_pretrain_section_is_params_with_config_errors(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    assert params.pretrain == PretrainConfig()  # params.yaml writes out the library's defaults
    assert params.pretrain.enabled and params.paths.pretrained == "artifacts/pretrain"
    assert params.backbone.weights == "artifacts/pretrain/model.safetensors"
    for override, key in [("pretrain.batch_size=4096", "pretrain.batch_size"), ("pretrain.lr=0", "pretrain.lr"),
                          ("pretrain.local_crops_scale=[0.5, 0.1]", "pretrain.local_crops_scale"),
                          ("pretrain.epochs=two", "pretrain.epochs"), ("pretrain.crops=3", "'crops'")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_params(REPO / "params.yaml", [override])
    with pytest.raises(ConfigError, match="backbone.weights=null"):
        load_params(REPO / "params.yaml", ["backbone.pretrained=true"])  # timm's weights or the file
    assert load_params(REPO / "params.yaml", ["backbone.pretrained=true", "backbone.weights=null"]).backbone.pretrained


def test_at_root_resolves_only_a_relative_file(tmp_path: Path) -> None:
    cfg = BackboneConfig(weights="artifacts/pretrain/model.safetensors")
    assert cfg.at_root(tmp_path).weights == str(tmp_path / "artifacts/pretrain/model.safetensors")
    assert cfg.at_root(None) is cfg
    for kept in ("hf-hub:facebook/dinov2-small", "timm/vit_small_patch14_dinov2.lvd142m",
                 "s3://bucket/dinov2.safetensors", "/abs/dinov2.pth", None):
        assert BackboneConfig(weights=kept).at_root(tmp_path).weights == kept


def test_describe_backbone_names_each_kind(checkout: Checkout, tmp_path: Path) -> None:
    relative = BackboneConfig(weights="artifacts/pretrain/model.safetensors")
    assert describe_backbone(relative, checkout.root) == DESCRIPTION
    assert describe_backbone(relative, tmp_path) == "weights artifacts/pretrain/model.safetensors"  # no file there
    assert describe_backbone(BackboneConfig()) == RANDOM_INIT
    assert describe_backbone(BackboneConfig(pretrained=True)) == "pretrained (timm's default weights)"
    assert describe_backbone(BackboneConfig(weights="hf-hub:org/repo")) == "pretrained (hf-hub:org/repo)"
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(other))  # a file without a description
    assert describe_backbone(BackboneConfig(weights=str(other))) == f"weights {other}"


def test_the_report_names_the_pretrained_backbone(checkout: Checkout) -> None:
    from dinoalign.report import render_report
    from dinoalign.stages.report import report_inputs

    html = render_report(report_inputs(checkout.params(), checkout.root))
    assert f"{DESCRIPTION} (artifacts/pretrain/model.safetensors)" in html  # the versions table
    assert "DINO-pretrained by the pretrain stage" in html  # the demo warning
    assert "RANDOM INIT" not in html and "random-init" not in html

"""Shared test settings: offline, no analytics, small threads; paths to real test data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline_testing import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DEMO_BACKBONE,
    DEMO_WORLD,
    REPO,
    SHARED_ASSETS,
    DemoFeatures,
    DemoModels,
    tiny_overrides,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The real COCO subset beside the repo; tests that need it skip when it is absent."""
    path = SHARED_ASSETS / "coco-mini"
    if not (path / "annotations").is_dir():
        pytest.skip(f"real COCO test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny open_clip CLIP saved as a ``local-dir:`` checkpoint (the layout
    the teacher stage writes), so tests load CLIP exactly as the pipeline does."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from dinoalign.config import TeacherConfig
    from dinoalign.teacher import model_cfg, save_teacher

    cfg = TeacherConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                        text_width=32, text_layers=1, text_heads=2)
    torch.manual_seed(0)
    mc = model_cfg(cfg)
    model = CLIP(mc["embed_dim"], CLIPVisionCfg(**mc["vision_cfg"]), CLIPTextCfg(**mc["text_cfg"]))
    return save_teacher(model, cfg, tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS (S3 API) on a free 127.0.0.1 port with required credentials; the
    AWS_* variables point every client at it for the session. Stopped by PID."""
    import secrets

    from dinoalign.ops import services as infra

    keys = {"AWS_ACCESS_KEY_ID": "dinoalign-test", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    svc = infra.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), keys["AWS_ACCESS_KEY_ID"],
                                keys["AWS_SECRET_ACCESS_KEY"])
    env = {**keys, "AWS_ENDPOINT_URL": svc.url, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield svc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        svc.stop()
        assert not svc.alive(), "SeaweedFS survived its stop"


@pytest.fixture(scope="session")
def demo_features(tmp_path_factory: pytest.TempPathFactory) -> DemoFeatures:
    """Prepare (synthetic world at 112 px), teacher (a tiny CLIP, a few epochs) and embed
    (a small random-init DINOv2-shaped ViT at 112 px, 8×8 patches, with cached patch
    tokens), through ``dinoalign.cli.main`` as ``dvc repro`` runs them."""
    from dinoalign.cli import main

    root = tmp_path_factory.mktemp("demo_features")
    clip_dir = root / "teacher" / "model"
    overrides = tiny_overrides(
        root,
        clip_dir,
        **{f"data.synthetic.{k}": str(v) for k, v in DEMO_WORLD.items()},
        **{
            "backbone.model_kwargs": DEMO_BACKBONE,
            "backbone.img_size": "112",
            "embed.img_size": "112",
            "embed.engine": "local",
            "embed.batch_size": "64",
            "embed.decode_batch_size": "64",
            "embed.shard_rows": "256",
            "paths.teacher": str(root / "teacher"),
            "teacher.embed_dim": "64",
            "teacher.image_size": "32",
            "teacher.patch_size": "8",
            "teacher.vision_width": "96",
            "teacher.vision_layers": "2",
            "teacher.text_width": "64",
            "teacher.text_layers": "2",
            "teacher.text_heads": "2",
            "teacher.epochs": "20",
            "teacher.batch_size": "64",
            "teacher.warmup_steps": "20",
            "paths.models": str(root / "models"),
            "paths.curves": str(root / "align"),
            "paths.checkpoints": str(root / "checkpoints"),
            "paths.curated": str(root / "curated"),
        },
    )
    features = DemoFeatures(root, tuple(overrides), root / "no-params" / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOALIGN_ROOT", str(root))  # the MLflow experiment's artifacts go under root
        for stage in ("prepare", "teacher", "embed"):
            assert main([stage, "-p", str(features.params_file), *overrides]) == 0, stage
    return features


@pytest.fixture(scope="session")
def demo_models(demo_features: DemoFeatures, tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    import torch

    from dinoalign.recipes import build
    from dinoalign.train.data import model_config, read_spec

    root = tmp_path_factory.mktemp("demo_models")
    overrides = (
        *demo_features.overrides,
        f"tracking.uri=sqlite:///{root / 'mlruns.db'}",
        f"paths.models={root / 'models'}",
        f"paths.metrics={root / 'metrics'}",
        f"paths.plots={root / 'plots'}",
        f"paths.report={root / 'report'}",
        "evaluate.zeroshot_templates=talk2dino",
        "evaluate.max_images=24",
        "evaluate.num_examples=2",
        "evaluate.save_predictions=true",
        # 112-px images resized to 140: 2×2 overlapping 112-px windows, 140 not a multiple of 56
        "evaluate.segmentation={short_side: 140, crop: 112, stride: 56, bg_threshold: 0.5}",
    )
    models = DemoModels(demo_features, root, overrides)
    params = models.params()
    spec = read_spec(str(demo_features.features_dir))
    for seed, recipe in enumerate(DemoModels.RECIPES):
        torch.manual_seed(seed)
        build(recipe, model_config(recipe, getattr(params.align, recipe), spec)).save(str(models.model_dir(recipe)))
    return models


@pytest.fixture(scope="session")
def evaluated_demo(demo_models: DemoModels) -> DemoModels:
    """``demo_models`` after ``dinoalign evaluate`` (all three recipes); dinotxt's weights
    registered first, as the align stage registers them (a logged model, a version of
    dinoalign-dinotxt tagged with the weights' sha256), so its evaluation finds the version."""
    import hashlib

    import mlflow

    from dinoalign.tracking import WEIGHTS_TAG, registered_model_name

    sha = hashlib.sha256((demo_models.model_dir("dinotxt") / "model.safetensors").read_bytes()).hexdigest()
    mlflow.set_tracking_uri(f"sqlite:///{demo_models.root / 'mlruns.db'}")
    hand = mlflow.create_experiment("registered-by-hand", artifact_location=(demo_models.root / "hand").as_uri())
    mlflow.set_experiment(experiment_id=hand)
    with mlflow.start_run(run_name="align@dinotxt"):
        logged = mlflow.initialize_logged_model(name="model", tags={WEIGHTS_TAG: sha})
        name = registered_model_name("dinotxt", demo_models.params().tracking.experiment)
        mlflow.register_model(f"models:/{logged.model_id}", name, tags={WEIGHTS_TAG: sha})
    assert demo_models.main("evaluate") == 0
    return demo_models


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Debian's headless chromium driven by Playwright (Playwright's own browser download
    fails here); `make test` installs chromium first (`make chromium`). One Playwright
    instance for the whole session: its sync API refuses to start a second one while the
    first one's event loop runs."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: run `make chromium` (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that declare a longer timeout than the default (the stack test: ~12 min) run
    first. `make test` runs the files on two xdist workers (``--dist loadfile``) that take
    files in collection order: starting the longest file first lets the other worker get
    through the rest meanwhile instead of leaving it alone at the end."""
    default = float(config.getini("timeout") or 0)

    def declared(item: pytest.Item) -> float:
        mark = item.get_closest_marker("timeout")
        return float(mark.args[0]) if mark and mark.args else default

    items.sort(key=lambda item: -declared(item))  # stable: the rest keep their order

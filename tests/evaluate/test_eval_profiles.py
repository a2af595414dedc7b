"""The reproduction profiles (params/profiles/*.txt) and docs/reproduce.md stay in step
with the code: every profile resolves against params.yaml, its recipe configs build, and
every dataset the commands name is a registered adapter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dinoalign.config import from_dict, load_params
from dinoalign.evaluate.datasets import EVAL_DATASETS
from dinoalign.recipes import RECIPES

PROFILES = sorted((Path(__file__).resolve().parents[2] / "params" / "profiles").glob("*.txt"))


def _overrides(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_there_is_a_profile_per_recipe() -> None:
    assert {p.stem for p in PROFILES} == {
        "talk2dino-vitb",
        "talk2dino-vitl",
        "dinotxt-vitl",
        "projector-vitb",
    }


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_resolves_and_its_recipe_config_builds(repo_root: Path, profile: Path) -> None:
    params = load_params(repo_root / "params.yaml", _overrides(profile))
    assert params.profile == profile.stem
    assert (
        params.backbone.pretrained and params.backbone.weights is None
        and not params.teacher.enabled and not params.pretrain.enabled
    )  # real weights, no demo teacher, no demo pretraining
    (recipe,) = params.evaluate.recipes
    training = getattr(params.align, recipe)
    # the widths come from the features at train time: stand-ins of the real towers' sizes
    widths = {
        "talk2dino": {"text_dim": 512, "vision_dim": 1024 if "large" in params.backbone.name else 768},
        "dinotxt": {
            "backbone": params.backbone.name,
            "vision_dim": 1024,
            "vision_heads": 16,
            "num_registers": 4,
        },
        "projector": {"vision_dim": 768, "embed_dim": 512},
    }[recipe]
    from_dict(RECIPES.get(recipe).config_class, {**training.model, **widths})


def test_reproduce_doc_names_every_profile_and_only_registered_datasets(repo_root: Path) -> None:
    doc = (repo_root / "docs" / "reproduce.md").read_text()
    for profile in PROFILES:
        assert f"params/profiles/{profile.name}" in doc and f"load_profile {profile.stem}" in doc
    named = set(re.findall(r'"[A-Za-z0-9]+ ([a-z0-9_]+) data/', doc)) | set(
        re.findall(r"evaluate_on ([a-z_0-9]+) ", doc)
    )
    assert {
        "voc20",
        "voc21",
        "context59",
        "context60",
        "cocostuff164k",
        "coco_object",
        "cityscapes",
        "ade20k",
        "imagenet_folder",
        "karpathy",
    } == named
    assert all(name in EVAL_DATASETS for name in named)
    for published in ("87.1", "46.3", "81.4", "20.6", "89.3 / 89.9", "82.9 / 77.6"):
        assert published in doc


@pytest.mark.parametrize(("profile", "threshold"), [("talk2dino-vitb", 0.55), ("talk2dino-vitl", 0.54)])
def test_talk2dino_profiles_use_the_official_dense_settings(
    repo_root: Path, profile: str, threshold: float
) -> None:
    """As the official evaluation (lorebianchi98/Talk2DINO, src/open_vocabulary_segmentation:
    ``DINOText.generate_masks`` upsamples with align_corners=True, mmseg resizes back with
    False; configs/<dataset>/dinotext_*_vit{b,l}_mlp_infonce.yml set ``with_bg_clean`` on
    voc_bg and coco_object only; threshold 0.55 for ViT-B, 0.54 for ViT-L)."""
    params = load_params(
        repo_root / "params.yaml", _overrides(repo_root / "params" / "profiles" / f"{profile}.txt")
    )
    seg = params.evaluate.segmentation
    assert (seg.window_align_corners, seg.output_align_corners) == (True, False)
    assert seg.bg_threshold == threshold and params.evaluate.dense_templates == "talk2dino"
    cleans = {
        name: params.evaluate.cleans_background(has_background, name)
        for name, has_background in [
            ("voc21", True),
            ("coco_object", True),
            ("context60", True),
            ("voc20", False),
            ("ade20k", False),
        ]
    }
    assert cleans == {
        "voc21": True,
        "coco_object": True,
        "context60": False,
        "voc20": False,
        "ade20k": False,
    }


def test_background_cleaning_setting_overrides_the_per_dataset_default(repo_root: Path) -> None:
    on = load_params(repo_root / "params.yaml", ["evaluate.background_cleaning=true"]).evaluate
    off = load_params(repo_root / "params.yaml", ["evaluate.background_cleaning=false"]).evaluate
    assert on.cleans_background(True, "context60") and not on.cleans_background(False, "voc20")
    assert not off.cleans_background(True, "voc21")
    demo = load_params(repo_root / "params.yaml").evaluate
    assert demo.background_cleaning == "auto" and demo.cleans_background(True)  # the demo world

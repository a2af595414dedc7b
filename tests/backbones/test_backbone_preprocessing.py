"""Preprocessing from each model's own config: the backbone's mean/std, interpolation and
crop from timm's data config, CLIP's from open_clip's preprocess config; recorded in the
features' manifest, and features made with other preprocessing refused where mixed."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from pipeline_testing import tiny_backbone, tiny_overrides
from dinoalign.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, load_open_clip
from dinoalign.config import ConfigError, TeacherConfig, load_params
from dinoalign.data.images import resize_crop
from dinoalign.errors import InferenceError, PreprocessingMismatch
from dinoalign.backbones.text import to_clip_input
from dinoalign.teacher import OPENAI_MEAN, OPENAI_STD, model_cfg, preprocess_cfg, save_teacher

MISSING = "/nonexistent-dinoalign/params.yaml"
SAT493M = "vit_large_patch16_dinov3.sat493m"
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)
TINY_CLIP = TeacherConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                          text_width=32, text_layers=1, text_heads=2)


def _image(height: int, width: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _siglip_preprocess() -> dict[str, Any]:
    """open_clip's own preprocessing of ViT-B-16-SigLIP's webli weights (its metadata only)."""
    tag = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    return {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode")}


def _tiny_clip(root: Path, preprocess: dict[str, Any] | None = None) -> Path:
    """The conftest's tiny untrained CLIP (same config and seed: same weights) saved as a
    ``local-dir:`` checkpoint, its ``preprocess_cfg`` replaced by ``preprocess``."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    mc = model_cfg(TINY_CLIP)
    model = CLIP(mc["embed_dim"], CLIPVisionCfg(**mc["vision_cfg"]), CLIPTextCfg(**mc["text_cfg"]))
    directory = save_teacher(model, TINY_CLIP, root)
    if preprocess is not None:
        config_file = directory / "open_clip_config.json"
        config = json.loads(config_file.read_text())
        config["preprocess_cfg"] = {"size": TINY_CLIP.image_size, **preprocess}
        config_file.write_text(json.dumps(config))
    return directory


# ----------------------------------------------------------------------------- backbone


def test_dinov3_sat493m_normalises_with_its_own_mean_and_std() -> None:
    backbone = build_backbone(SAT493M, img_size=32, model_kwargs=dict(embed_dim=64, depth=1, num_heads=2))
    torch.testing.assert_close(backbone.mean, torch.tensor(SAT493M_MEAN))
    torch.testing.assert_close(backbone.std, torch.tensor(SAT493M_STD))
    images = torch.from_numpy(_image(32, 48))
    x = backbone.normalize(images)
    for b, row, col in [(0, 0, 0), (1, 17, 40), (1, 31, 47)]:
        pixel = images[b, row, col].tolist()
        expected = [(pixel[c] / 255 - SAT493M_MEAN[c]) / SAT493M_STD[c] for c in range(3)]
        torch.testing.assert_close(x[b, :, row, col], torch.tensor(expected))
    assert backbone(x).grid == (2, 3)
    assert backbone.preprocessing(32) == {
        "mean": list(SAT493M_MEAN), "std": list(SAT493M_STD), "interpolation": "bicubic",
        "crop_pct": 1.0, "crop_mode": "center", "input_size": [3, 32, 32],
        "config_input_size": [3, 256, 256],
    }


def test_dinov2_keeps_imagenet_normalisation_and_an_interpolation_override() -> None:
    """The demo's backbones resolve to exactly the constants used before (same numbers)."""
    backbone = tiny_backbone(depth=1)
    assert torch.equal(backbone.mean, torch.tensor(IMAGENET_MEAN))
    assert torch.equal(backbone.std, torch.tensor(IMAGENET_STD))
    default = backbone.preprocessing(56)
    assert (default["interpolation"], default["crop_pct"], default["crop_mode"]) == ("bicubic", 1.0, "center")
    assert backbone.preprocessing(56, "bilinear")["interpolation"] == "bilinear"


def test_embed_interpolation_is_null_or_a_filter_name(repo_root: Path) -> None:
    assert load_params(repo_root / "params.yaml").embed.interpolation is None
    assert load_params(MISSING, ["embed.interpolation=bilinear"]).embed.interpolation == "bilinear"
    with pytest.raises(ConfigError, match=r"embed.interpolation='cubic': use one of .*or null"):
        load_params(MISSING, ["embed.interpolation=cubic"])


def test_resize_crop_follows_timms_crop_pct_and_mode() -> None:
    import torchvision.transforms as T

    image = _image(50, 70, batch=1)[0]
    pil = Image.fromarray(image)
    center = T.Compose([T.Resize(math.floor(32 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(32)])
    np.testing.assert_array_equal(resize_crop(image, 32, "bicubic", 0.875), np.array(center(pil)))
    squash = T.Compose([T.Resize((36, 36), interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32)])
    np.testing.assert_array_equal(resize_crop(image, 32, "bilinear", 32 / 36.5, "squash"), np.array(squash(pil)))
    np.testing.assert_array_equal(resize_crop(image, 32), resize_crop(image, 32, "bicubic", 1.0, "center"))
    with pytest.raises(ValueError, match="unknown crop_mode 'border'"):
        resize_crop(image, 32, crop_mode="border")


# ----------------------------------------------------------------------------- CLIP


def test_teacher_clip_input_is_unchanged() -> None:
    """The demo teacher's config (OpenAI mean/std, bicubic) gives the numbers of the former
    hard-coded path: bicubic antialiased resize, clamp, OpenAI normalisation."""
    images = _image(40, 40)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    before = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    assert torch.equal(to_clip_input(images, preprocess_cfg(TINY_CLIP)), before)


def test_clip_input_uses_the_models_own_preprocess_config(tmp_path: Path) -> None:
    siglip = _siglip_preprocess()
    assert siglip["mean"] == siglip["std"] == (0.5, 0.5, 0.5)  # not OpenAI's
    model, preprocess, _ = load_open_clip(f"local-dir:{_tiny_clip(tmp_path, siglip)}")
    assert tuple(preprocess["mean"]) == tuple(preprocess["std"]) == (0.5, 0.5, 0.5)
    assert preprocess["resize_mode"] == "squash"
    images = _image(32, 32)
    x = to_clip_input(images, preprocess)
    by_hand = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, by_hand)
    transform = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)
    torch.testing.assert_close(x[1], transform(Image.fromarray(images[1])))  # open_clip's own path
    assert model.encode_image(x).shape == (2, TINY_CLIP.embed_dim)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_clip_resize_modes_on_non_square_images(mode: str) -> None:
    images = np.full((1, 20, 40, 3), 200, dtype=np.uint8)
    x = to_clip_input(images, {"size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": mode})
    assert x.shape == (1, 3, 16, 16)
    inside = (200 / 255 - 0.5) / 0.5
    if mode == "longest":  # 8×16 picture centred on a black (fill_color 0) canvas
        torch.testing.assert_close(x[0, :, 4:12], torch.full((3, 8, 16), inside))
        torch.testing.assert_close(x[0, :, :4], torch.full((3, 4, 16), -1.0))
    else:
        torch.testing.assert_close(x, torch.full_like(x, inside))
    with pytest.raises(ValueError, match="interpolation 'random'"):
        to_clip_input(images, {"size": 16, "interpolation": "random"})


# ----------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> tuple[Path, list[str]]:
    """A tiny world through prepare + embed (local engine) with the default preprocessing."""
    from dinoalign.cli import main
    from dinoalign.data.prepare import read_pairs
    from pipeline_testing import embed_features

    root = tmp_path_factory.mktemp("preprocessing")
    ov = tiny_overrides(root, tiny_clip_dir, **{"embed.engine": "local", "data.synthetic.n_train": "8",
                                                 "data.synthetic.n_test": "4"})
    assert main(["prepare", "-p", MISSING, *ov]) == 0
    embed_features(load_params(MISSING, ov), read_pairs(root / "pairs"))
    return root, ov


def _spec(root: Path) -> dict[str, Any]:
    return json.loads((root / "features" / "manifest.json").read_text())["spec"]


def test_manifest_records_both_preprocessings(embedded: tuple[Path, list[str]]) -> None:
    from dinoalign.embed.engine import feature_spec
    from dinoalign.stages.embed import embed_job

    root, ov = embedded
    spec = _spec(root)
    assert spec["interpolation"] == "bicubic"  # embed.interpolation null: the backbone's own
    assert spec["preprocessing"] == {
        "backbone": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic",
                     "crop_pct": 1.0, "crop_mode": "center", "input_size": [3, 56, 56],
                     "config_input_size": [3, 518, 518]},
        "clip": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                 "resize_mode": "shortest", "fill_color": 0, "input_size": [3, 32, 32]},
    }
    # another preprocessing is another spec: embed starts afresh
    other = feature_spec(embed_job(load_params(MISSING, [*ov, "embed.interpolation=bilinear"]), str(root / "features")))
    assert other["preprocessing"]["backbone"]["interpolation"] == "bilinear"
    assert other["spec_hash"] != spec["spec_hash"]


def _projector(root: Path, ov: list[str], *extra: str) -> Any:
    from dinoalign.model import AlignedModel, Towers
    from dinoalign.recipes import build

    recipe = build("projector", {"vision_dim": 48, "embed_dim": TINY_CLIP.embed_dim})
    params = load_params(MISSING, [*ov, *extra])
    towers = Towers.from_sections(params.backbone, params.seed, params.embed, params.clip, params.align)
    return AlignedModel(recipe, towers, root)


def test_evaluation_refuses_features_of_other_preprocessing(
    embedded: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, ov = embedded
    features = str(root / "features")
    uids = sorted(_uids(features))[:3]
    assert _projector(root, ov).store_batch(features, uids)["token_mean"].shape == (3, 48)

    with pytest.raises(InferenceError) as err:
        _projector(root, ov, "embed.interpolation=bilinear").store_batch(features, uids)
    message = str(err.value)
    assert "\n" not in message and message.startswith("backbone preprocessing mismatch")
    assert "bicubic" in message and "bilinear" in message and "re-run embed" in message

    siglip_clip = _tiny_clip(tmp_path, _siglip_preprocess())
    with pytest.raises(InferenceError, match=r"clip preprocessing mismatch.*0\.4814.*\[0\.5, 0\.5, 0\.5\]"):
        _projector(root, ov, f"clip.name=local-dir:{siglip_clip}").store_batch(features, uids)


def _uids(features: str) -> list[str]:
    from dinoalign.embed.store import FeatureStore

    return FeatureStore(features).read_all("images", ["uid"]).column("uid").to_pylist()


def test_online_training_refuses_features_of_other_preprocessing(embedded: tuple[Path, list[str]]) -> None:
    """dinotxt's online images mode puts crops through the backbone next to the stored
    features: a recorded mean/std (or none recorded) that differs is refused."""
    from dinoalign.train.data import check_backbone

    root, ov = embedded
    params = load_params(MISSING, ov)
    spec = _spec(root)
    check_backbone(spec, params.seed, "feats")
    tampered = copy.deepcopy(spec)
    tampered["preprocessing"]["backbone"]["mean"] = list(SAT493M_MEAN)
    with pytest.raises(PreprocessingMismatch, match=r"feats were embedded with \[mean \[0\.43, .*\] but .*\[mean \[0\.485"):
        check_backbone(tampered, params.seed, "feats")
    del tampered["preprocessing"]
    with pytest.raises(PreprocessingMismatch, match="unrecorded"):
        check_backbone(tampered, params.seed, "feats")

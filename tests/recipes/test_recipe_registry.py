"""The recipe registry and what every recipe shares: build, save/load, param groups,
input validation, and the shared loss helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinoalign.config import ConfigError
from dinoalign.recipes import RECIPES, Recipe, Talk2DINOConfig, build, load_recipe
from dinoalign.recipes.base import OWN_TEXT, TEXT_INPUTS, LogitScale, symmetric_infonce, to_grid
from dinoalign.train.config import recipe_names

# Every registered recipe, as timm's tests go over list_models(): a new recipe is tested
# by registering it.
NAMES = RECIPES.names()


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_declares_what_the_pipeline_asks(name: str, repo_root) -> None:
    """The class facts train/, evaluate/, serve and ops read instead of the name."""
    from dinoalign.config import load_params

    recipe = RECIPES.get(name)
    assert recipe.name == name == recipe.config_class().name
    assert recipe.text_input in TEXT_INPUTS
    assert recipe.image_columns and all(isinstance(c, str) for c in recipe.image_columns)
    assert recipe.promotion_metric.split(".")[0] in ("zeroshot", "retrieval", "segmentation")
    assert not recipe.has_background_cleaning or recipe.has_dense_head
    assert not recipe.averages_prompt_features or recipe.text_input != OWN_TEXT
    # its params section: align.<name> exists, with the fields read from the features
    section = getattr(load_params(repo_root / "params.yaml").align, name)
    assert section.recipe == name and section.inferred_model_fields


def test_the_params_schema_has_a_section_for_every_registered_recipe() -> None:
    assert sorted(recipe_names()) == RECIPES.names()


@pytest.mark.parametrize("name", NAMES)
def test_build_each_name_with_defaults_and_tiny_config(name: str, tiny) -> None:
    default = build(name)
    assert isinstance(default, Recipe) and default.cfg == RECIPES.get(name).config_class()
    model = tiny.model(name)
    assert model.cfg.name == name
    image = model.encode_image(tiny.batch(name))
    assert image.shape[0] == 4
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))


def test_build_from_mapping_checks_fields_like_params() -> None:
    model = build("talk2dino", {"text_dim": 6, "vision_dim": 4, "projection": "linear"})
    assert model.cfg == Talk2DINOConfig(text_dim=6, vision_dim=4, projection="linear")
    with pytest.raises(ConfigError, match="did you mean 'text_dim'"):
        build("talk2dino", {"text_dims": 6})


def test_build_rejects_bad_names_and_configs(tiny) -> None:
    with pytest.raises(KeyError, match="Did you mean 'dinotxt'"):
        build("dinotext")
    with pytest.raises(TypeError, match="Talk2DINOConfig"):
        build("talk2dino", tiny.configs["projector"])
    with pytest.raises(ValueError, match="named 'projector'"):
        build("talk2dino", {"name": "projector"})
    with pytest.raises(ValueError, match="projection must be one of"):
        Talk2DINOConfig(projection="conv")
    with pytest.raises(ValueError, match="text_dim must be > 0"):
        Talk2DINOConfig(text_dim=0)


def _outputs(model: Recipe, tiny, name: str) -> dict[str, torch.Tensor]:
    batch = tiny.batch(name)
    texts = model.encode_text(tiny.class_texts(name))
    out = {"image": model.encode_image(batch), "text": texts, "loss": model.loss(batch)[0]}
    if model.has_dense_head:
        out["dense"] = model.dense_logits(batch, texts)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scheme", ["", "file://", "memory://"])
def test_save_load_round_trip_gives_identical_outputs(
    name: str, scheme: str, tiny, tmp_path
) -> None:
    model = tiny.model(name, seed=3).eval()
    with torch.no_grad():  # move every weight off its init so a skipped load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    directory = f"{scheme}{tmp_path}/{name}" if scheme != "memory://" else f"memory://models/{name}"
    model.save(directory)
    loaded = load_recipe(directory)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg and not loaded.training
    with torch.no_grad():
        expected, actual = _outputs(model, tiny, name), _outputs(loaded, tiny, name)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_calling_the_module_is_the_loss(name: str, tiny) -> None:
    model = tiny.model(name).eval()
    batch = tiny.batch(name)
    loss, stats = model(batch)
    assert loss.item() == model.loss(batch)[0].item() == stats["loss"]


def test_saved_config_describes_recipe_and_inputs(tiny, tmp_path) -> None:
    model = tiny.model("dinotxt")
    model.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["recipe"] == "dinotxt" and config["format_version"] == 1
    assert config["config"]["backbone"] == "vit_small_patch14_reg4_dinov2"
    assert config["inputs"] == {"tokens_vision": ["B", "1+2+P", 16], "tokens": ["B", 16]}


def test_load_rejects_unknown_format_version(tiny, tmp_path) -> None:
    tiny.model("projector").save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_recipe(str(tmp_path))


def _corrupt(directory, case: str) -> str:
    config = directory / "config.json"
    weights = directory / "model.safetensors"
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "not a readable safetensors file"
    if case == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
        return "not a readable safetensors file"
    if case == "no weights":
        weights.unlink()
        return "model.safetensors does not exist"
    if case == "config not json":
        config.write_text("{recipe: projector,")
        return "is not valid JSON"
    if case == "config without recipe":
        config.write_text("[1, 2]")
        return "lacks 'recipe' and 'config'"
    if case == "no config":
        config.unlink()
        return "config.json does not exist"
    if case == "unknown recipe":
        config.write_text(json.dumps(json.loads(config.read_text()) | {"recipe": "clipper"}))
        return "unknown recipe 'clipper'"
    if case == "weights of another width":
        data = json.loads(config.read_text())
        data["config"]["vision_dim"] += 2
        config.write_text(json.dumps(data))
        return "does not fit the projector config"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated weights",
        "garbage weights",
        "no weights",
        "config not json",
        "config without recipe",
        "no config",
        "unknown recipe",
        "weights of another width",
    ],
)
def test_load_turns_a_bad_model_folder_into_one_clear_error(tiny, tmp_path, case: str) -> None:
    from dinoalign.errors import InferenceError

    tiny.model("projector").save(str(tmp_path))
    expected = _corrupt(tmp_path, case)
    with pytest.raises(InferenceError) as info:
        load_recipe(str(tmp_path))
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_decay_only_matrices(name: str, tiny) -> None:
    model = tiny.model(name)
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_missing_or_misshaped_features_say_what_to_fix(name: str, tiny) -> None:
    model = tiny.model(name)
    batch = tiny.batch(name)
    key = next(iter(model.input_spec()))
    with pytest.raises(KeyError, match=f"no '{key}'.*input_spec"):
        model.loss({k: v for k, v in batch.items() if k != key})
    wrong = dict(batch)
    wrong[key] = torch.cat([batch[key], batch[key][..., :1]], dim=-1)
    with pytest.raises(ValueError, match=f"{key} has shape .* expected"):
        model.loss(wrong)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_features_are_cast(name: str, tiny) -> None:
    batch = tiny.batch(name)
    half = {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}
    model = tiny.model(name)
    torch.testing.assert_close(
        model.encode_image(half), model.encode_image(batch), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("name", ["dinotxt", "projector"])
def test_similarity_defaults_to_cosines_of_the_encoders(name: str, tiny) -> None:
    model = tiny.model(name).eval()
    batch = tiny.batch(name, batch_size=3)
    text = model.encode_text(tiny.class_texts(name, n=2))
    image = model.encode_image(batch)
    scores = model.similarity(text, batch)
    assert scores.shape == (2, 3)
    for n in range(2):
        for b in range(3):
            expected = sum(x * y for x, y in zip(text[n].tolist(), image[b].tolist()))
            assert scores[n, b].item() == pytest.approx(expected, abs=1e-6)


def test_symmetric_infonce_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    rows = [
        -logits[i, i].item() + math.log(sum(math.exp(v) for v in logits[i].tolist()))
        for i in range(3)
    ]
    cols = [
        -logits[j, j].item() + math.log(sum(math.exp(logits[i, j].item()) for i in range(3)))
        for j in range(3)
    ]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    assert symmetric_infonce(logits, logits.T).item() == pytest.approx(expected, rel=1e-6)
    # Offset labels pick other positive columns (what a rank > 0 does after gathering).
    labels = torch.tensor([2, 0, 1])
    rows = [
        -logits[i, labels[i]].item() + math.log(sum(math.exp(v) for v in logits[i].tolist()))
        for i in range(3)
    ]
    assert symmetric_infonce(logits, logits, labels).item() == pytest.approx(
        sum(rows) / 3, rel=1e-6
    )


def test_logit_scale_fixed_learnable_and_clamped() -> None:
    fixed = LogitScale(0.07, learnable=False)
    assert fixed().item() == pytest.approx(1 / 0.07) and list(fixed.parameters()) == []
    assert "log_scale" not in fixed.state_dict()
    learnable = LogitScale(0.07, learnable=True)
    assert [n for n, _ in learnable.named_parameters()] == ["log_scale"]
    with torch.no_grad():
        learnable.log_scale.fill_(10.0)
    assert learnable().item() == pytest.approx(100.0)


def test_to_grid_square_and_explicit() -> None:
    scores = torch.arange(2 * 3 * 6.0).reshape(2, 3, 6)
    assert to_grid(scores, (2, 3))[1, 2, 1, 0].item() == scores[1, 2, 3].item()
    assert to_grid(torch.zeros(1, 1, 9), None).shape == (1, 1, 3, 3)
    with pytest.raises(ValueError, match="pass grid"):
        to_grid(scores, None)
    with pytest.raises(ValueError, match="does not hold 6"):
        to_grid(scores, (2, 2))

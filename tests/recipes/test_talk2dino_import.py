"""Importing the released Talk2DINO projection: good files load, bad ones are refused
with one clear message.

The layout matched is the state dict of ``ProjectionLayer`` in lorebianchi98/Talk2DINO
``src/model.py`` (``weights/vitb_mlp_infonce.pth``): ``linear_layer.weight`` [D, T],
``linear_layer.bias`` [D] and, with ``hidden_layer: True``, ``hidden_layers.0.weight``
[D, D], ``hidden_layers.0.bias`` [D] (older files: ``linear_layer2.*``), configured by the
``model:`` section of ``configs/<name>.yaml`` that ``ProjectionLayer.from_config`` reads
(``act``, ``hidden_layer``, ``dino_embed_dim`` default 1024, ``clip_embed_dim`` default 512).
Every bad file goes through ``dinoalign import-talk2dino`` in-process: exit code 2, one
line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dinoalign.cli import main
from dinoalign.errors import InferenceError
from dinoalign.recipes import load_recipe
from talk2dino_release_testing import psi_by_hand, released_state
from dinoalign.recipes.talk2dino_release import (
    import_talk2dino_checkpoint,
    load_talk2dino_checkpoint,
    read_talk2dino_release,
)

T, D = 6, 4  # text width (clip_embed_dim), DINOv2 width (dino_embed_dim)
OFFICIAL_YAML = """\
model:
  act: tanh
  hidden_layer: True
  dino_embed_dim: {d}
  clip_embed_dim: {t}
train:
  lr: 0.0001
  ltype: infonce
"""


def _state(mlp: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    return released_state(T, D, mlp, seed)


_psi = psi_by_hand


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["import-talk2dino", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(capsys, weights: Path, tmp_path: Path, *more: str) -> str:
    """Run the command on a bad file; check the error contract, return the message."""
    out = tmp_path / "model_out"
    code, stdout, stderr = _cli(capsys, "--weights", str(weights), "--out", str(out), *more)
    assert code == 2, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinoalign import-talk2dino: "), stderr
    assert not out.exists()
    return lines[0]


class _RunsCode:
    """Unpickling this would create ``target``: the loader must refuse it unrun."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (str(self.target),))


def _bad(name: str, tmp_path: Path) -> Path:
    """The corpus of bad weights files, each written on demand."""
    path = tmp_path / "weights" / "vitb_mlp_infonce.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _state()
    if name == "wrong_shape":
        torch.save(state | {"linear_layer.bias": torch.zeros(D + 1)}, path)
    elif name == "missing_key":
        del state["hidden_layers.0.bias"]
        torch.save(state, path)
    elif name == "extra_key":
        torch.save(state | {"attn_weights": torch.zeros(12)}, path)
    elif name == "nan":
        state["linear_layer.weight"][1, 2] = float("nan")
        torch.save(state, path)
    elif name == "inf":
        state["hidden_layers.0.bias"][0] = float("-inf")
        torch.save(state, path)
    elif name == "int_tensor":
        torch.save(state | {"hidden_layers.0.weight": torch.ones(D, D, dtype=torch.int64)}, path)
    elif name == "garbage":
        path.write_bytes(b"this is not a checkpoint at all\n" * 8)
    elif name == "empty":
        path.write_bytes(b"")
    elif name == "code":
        path.write_bytes(pickle.dumps({"linear_layer.weight": _RunsCode(tmp_path / "ran")}))
    elif name == "code_zip":
        torch.save({"linear_layer.weight": _RunsCode(tmp_path / "ran")}, path)
    elif name == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:200])
    elif name == "not_a_dict":
        torch.save(list(state.values()), path)
    elif name == "nested":
        torch.save({"model": state, "epoch": 3}, path)
    elif name == "bad_safetensors":
        path = path.with_suffix(".safetensors")
        path.write_bytes(safetensors.torch.save(state)[:40])
    elif name == "missing_file":
        path = path.with_name("nothing_here.pth")
    else:
        raise AssertionError(name)
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrong_shape", ["linear_layer.bias has shape [5], expected [4]",
                         "Expected linear_layer.weight [D, T], linear_layer.bias [D], "
                         "hidden_layers.0.weight [D, D], hidden_layers.0.bias [D] with D=4, T=6",
                         "the file has linear_layer.weight [4, 6], linear_layer.bias [5]"]),
        ("missing_key", ["missing keys ['hidden_layers.0.bias']",
                         "the file has linear_layer.weight [4, 6], linear_layer.bias [4], "
                         "hidden_layers.0.weight [4, 4]"]),
        ("extra_key", ["unsupported keys ['attn_weights']", "weight_attn_heads: static",
                       "attn_weights [12]"]),
        ("nan", ["linear_layer.weight has 1 NaN and 0 Inf values"]),
        ("inf", ["hidden_layers.0.bias has 0 NaN and 1 Inf values"]),
        ("int_tensor", ["hidden_layers.0.weight holds torch.int64, not floating-point"]),
        ("garbage", ["neither a PyTorch checkpoint (torch.save) nor a safetensors file"]),
        ("empty", ["(it is empty)"]),
        ("code", ["holds pickled objects other than tensors", "weights_only=True"]),
        ("code_zip", ["holds pickled objects other than tensors", "weights_only=True"]),
        ("truncated", ["a damaged PyTorch checkpoint"]),
        ("not_a_dict", ["holds a list, not a state dict"]),
        ("nested", ["keys ['model'] hold dicts", "training checkpoint"]),
        ("bad_safetensors", ["not a valid safetensors file"]),
        ("missing_file", ["no such weights file"]),
    ],
)
def test_bad_weights_files_exit_2_with_one_line_naming_the_problem(
    capsys, tmp_path: Path, name: str, expected: list[str]
) -> None:
    path = _bad(name, tmp_path)
    message = _refused(capsys, path, tmp_path)
    assert str(path) in message
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "ran").exists()  # pickled code is never run


def _yaml(tmp_path: Path, text: str, name: str = "vitb_mlp_infonce.yaml") -> Path:
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "mlp", "expected"),
    [
        (OFFICIAL_YAML.format(d=D, t=T), False,
         ["says hidden_layer: True (mlp) but the file lacks ['hidden_layers.0.weight', "
          "'hidden_layers.0.bias']"]),
        (OFFICIAL_YAML.format(d=D, t=T).replace("hidden_layer: True", "hidden_layer: False"),
         True,
         ["says hidden_layer: False (linear) but the file has ['hidden_layers.0.weight', "
          "'hidden_layers.0.bias']"]),
        (OFFICIAL_YAML.format(d=768, t=T), True,
         ["linear_layer.weight has shape [4, 6], expected [768, 6]",
          "with D=768, T=6 (from dino_embed_dim and clip_embed_dim of"]),
        ("model:\n  act: tanh\n  hidden_layer: True\n  dino_embed_dim: 4\n", True,
         ["linear_layer.weight has shape [4, 6], expected [4, 512]",
          "(clip_embed_dim: ProjectionLayer's defaults)"]),
        (OFFICIAL_YAML.format(d=D, t=T).replace("  act: tanh\n", "  act: tanh\n  frobnicate: 3\n"),
         True, ["model.frobnicate is not a ProjectionLayer setting this importer understands"]),
        (OFFICIAL_YAML.format(d=D, t=T).replace("act: tanh", "act: relu"), True,
         ["act: relu, but this recipe's mlp projection is W2·tanh(W1·t + b1) + b2"]),
        (OFFICIAL_YAML.format(d=D, t=T).replace("  act: tanh\n", ""), True,
         ["act not set (ProjectionLayer then has no activation)"]),
        (OFFICIAL_YAML.format(d=D, t=T).replace("hidden_layer: True", "hidden_layer: 2"), True,
         ["model.hidden_layer: 2 hidden layers"]),
        (OFFICIAL_YAML.format(d=D, t=T).replace("  act: tanh\n", "  act: tanh\n"
                                                "  weight_attn_heads: conditioned\n"), True,
         ["model.weight_attn_heads: 'conditioned'"]),
        ("train:\n  lr: 0.1\n", True, ["no `model:` mapping"]),
        ("model: [unclosed\n", True, ["not a readable YAML file"]),
        ("model:\n  proj_class: vitb_mlp_infonce\n  model_name: dinov2_vitb14_reg\n", True,
         ["an evaluation config", "configs/vitb_mlp_infonce.yaml instead"]),
    ],
)
def test_yaml_that_contradicts_the_weights_or_is_not_understood_is_refused(
    capsys, tmp_path: Path, yaml_text: str, mlp: bool, expected: list[str]
) -> None:
    weights = tmp_path / "weights" / "vitb_mlp_infonce.pth"
    weights.parent.mkdir()
    torch.save(_state(mlp=mlp), weights)
    config = _yaml(tmp_path, yaml_text, "given.yaml")
    message = _refused(capsys, weights, tmp_path, "--config", str(config))
    assert str(config) in message
    for text in expected:
        assert text in message, message


def test_missing_yaml_given_explicitly(capsys, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save(_state(), weights)
    message = _refused(capsys, weights, tmp_path, "--config", str(tmp_path / "nope.yaml"))
    assert f"{tmp_path / 'nope.yaml'}: no such Talk2DINO config file" in message


@pytest.mark.parametrize("mlp", [True, False])
def test_cli_writes_the_recipe_folder_from_the_official_layout(
    capsys, tmp_path: Path, mlp: bool
) -> None:
    """weights/<name>.pth + configs/<name>.yaml, found without --config."""
    state = _state(mlp=mlp)
    weights = tmp_path / "weights" / "vitb_mlp_infonce.pth"
    weights.parent.mkdir()
    torch.save(state, weights)
    text = OFFICIAL_YAML.format(d=D, t=T)
    config = _yaml(tmp_path, text if mlp else text.replace("True", "False"))
    out = tmp_path / "models" / "talk2dino"
    code, stdout, stderr = _cli(capsys, "--weights", str(weights), "--out", str(out))
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["out"] == str(out) and summary["config"] == str(config)
    assert summary["projection"] == ("mlp" if mlp else "linear")
    assert summary["projection_from"].startswith(str(config))
    assert (summary["text_dim"], summary["vision_dim"], summary["format"]) == (T, D, "pytorch")
    model = load_recipe(str(out))
    t = torch.randn(3, T, generator=torch.Generator().manual_seed(5))
    for row, want in zip(model.project_text(t).tolist(), (_psi(state, r) for r in t.tolist())):
        assert row == pytest.approx(want, abs=1e-5)


def test_without_a_yaml_the_projection_is_inferred_and_said_so(tmp_path: Path) -> None:
    state = _state(mlp=True)
    weights = tmp_path / "vitb_mlp_infonce.pth"
    torch.save(state, weights)
    released = read_talk2dino_release(str(weights))
    assert released.summary["config"] is None and released.summary["projection"] == "mlp"
    said = released.summary["projection_from"]
    assert said.startswith("inferred from the keys: hidden_layers.0.* present")
    assert str(tmp_path / "vitb_mlp_infonce.yaml") in said  # where it looked
    assert "pass the official configs/<name>.yaml" in said
    beside = tmp_path / "vitb_mlp_infonce.yaml"  # <stem>.yaml beside the weights wins
    beside.write_text(OFFICIAL_YAML.format(d=D, t=T))
    assert read_talk2dino_release(str(weights)).summary["config"] == str(beside)
    assert read_talk2dino_release(str(weights), None).summary["config"] is None


def test_safetensors_and_legacy_keys_load(tmp_path: Path) -> None:
    state = _state(mlp=True, seed=3)
    path = tmp_path / "projection.safetensors"
    path.write_bytes(safetensors.torch.save(state))
    released = read_talk2dino_release(str(path))
    assert released.summary["format"] == "safetensors"
    t = torch.randn(T).tolist()
    assert released.model.project_text(torch.tensor([t]))[0].tolist() == pytest.approx(
        _psi(state, t), abs=1e-5
    )
    legacy = {  # older official checkpoints: linear_layer2.* (renamed by ProjectionLayer)
        "linear_layer.weight": state["linear_layer.weight"],
        "linear_layer.bias": state["linear_layer.bias"],
        "linear_layer2.weight": state["hidden_layers.0.weight"],
        "linear_layer2.bias": state["hidden_layers.0.bias"].half(),
    }
    torch.save(legacy, tmp_path / "old.pth")
    model = load_talk2dino_checkpoint(str(tmp_path / "old.pth"))
    assert model.cfg.projection == "mlp"
    assert model.project_text(torch.tensor([t]))[0].tolist() == pytest.approx(
        _psi(state, t), abs=1e-2
    )


def test_python_api_names_the_files_own_keys() -> None:
    state = _state(mlp=False) | {"linear_layer2.weight": torch.zeros(D, D + 2)}
    with pytest.raises(InferenceError) as caught:
        import_talk2dino_checkpoint(state, source="mine.pth")
    message = str(caught.value)
    assert message.startswith("mine.pth: ")
    # the file's own key, not hidden_layers.0.* nor the recipe's proj_out.weight
    assert "linear_layer2.weight has shape [4, 6], expected [4, 4]" in message
    assert "missing keys ['hidden_layers.0.bias']" in message
    assert "proj_in" not in message and "proj_out" not in message
    assert isinstance(caught.value, ValueError)

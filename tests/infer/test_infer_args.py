"""The inference commands refuse bad arguments and bad model folders before any work,
with exit 2 and one line on stderr (issue #19): no model or towers are needed to check."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoalign.cli import main

SEGMENT = ["segment", "--image", "img.png", "--classes", "cat,dog"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits
        code = e.code
    return int(code), capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "m", "--out", "o.png", "--bg-threshold", "nan"], "'nan' must be a finite number"),
        (["--model", "m", "--out", "o.png", "--bg-threshold", "inf"], "'inf' must be a finite number"),
        (["--model", "m", "--out", "o.png", "--bg-threshold", "high"], "'high' is not a number"),
        (["--model", "m", "--out", "o.png", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["--model", "m", "--out", "{tmp}"], "is a folder; give a file name"),
        (["--model", "m", "--out", "o.png", "--overlay", "{tmp}"], "--overlay"),
    ],
)
def test_segment_arguments(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    argv = SEGMENT + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, err = _run(argv, capsys)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_classify_top_k_and_unknown_command(capsys) -> None:
    code, err = _run(["classify", "--model", "m", "--image", "i", "--classes", "a", "--top-k", "0"], capsys)
    assert code == 2 and "--top-k must be >= 1" in err and len(err.strip().splitlines()) == 1
    code, err = _run(["segmnt"], capsys)
    assert code == 2 and "invalid choice: 'segmnt'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["truncated weights", "config not json"])
def test_a_corrupt_model_folder_is_one_line(tmp_path: Path, case: str, capsys, repo_root) -> None:
    from dinoalign.recipes import Talk2DINOConfig, build

    model_dir = tmp_path / "model"
    build("talk2dino", Talk2DINOConfig(text_dim=4, vision_dim=4)).save(str(model_dir))
    if case == "truncated weights":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        message = "not a readable safetensors file"
    else:
        (model_dir / "config.json").write_text("{oops")
        message = "is not valid JSON"
    argv = ["classify", "--model", str(model_dir), "--image", "i.png", "--classes", "a,b",
            "-p", str(repo_root / "params.yaml")]
    code, err = _run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

"""The pipeline's stages, one module each (REVIEW.md §4.3 example 2), checked on the source.

Each ``src/dinoalign/stages/<name>.py`` has one public ``run(params, root)``, its DVC and
CLI commands at the top of its docstring, and is the only place (with ``dinoalign
retrain``, which is a command of its own) where an MLflow run is opened. Each stage's
dvc.yaml ``params:`` list holds every ``paths.*`` key the stage reads, so DVC's idea of a
stage's inputs does not drift from the code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from dinoalign.cli import build_parser
from dinoalign.stages import STAGE_NAMES, run_stage

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "dinoalign"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_the_stage_list_is_dvc_yaml_in_pipeline_order_and_the_cli_commands() -> None:
    assert list(STAGE_NAMES) == list(DVC)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(STAGE_NAMES) <= set(commands)
    for name in STAGE_NAMES:
        assert (REPO / "stages" / f"{name}.py").is_file()
        assert f"python stages/{name}.py" in yaml.safe_dump(DVC[name])


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_a_stage_module_has_one_run_and_says_how_to_launch_it(name: str) -> None:
    module = importlib.import_module(f"dinoalign.stages.{name}")
    assert list(inspect.signature(module.run).parameters)[:2] == ["params", "root"]
    doc = module.__doc__ or ""
    head = doc.split("\n\n")[1]  # the paragraph after the title: the commands
    assert f"dvc repro {name}" in head and f"dinoalign {name}" in head, head
    tree = ast.parse(inspect.getsource(module))
    public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    assert public[0] == "run", public


def test_mlflow_runs_are_opened_only_by_stages_and_retrain() -> None:
    openers = re.compile(r"\bstage_run\(|mlflow\.start_run\(")
    found = sorted(
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
        if openers.search(p.read_text()) and p.parent.name != "stages"
    )
    assert found == ["ops/retrain.py", "tracking.py"], found


def _paths_read(module_name: str) -> set[str]:
    """``paths.<key>`` named in a stage module and in the dinoalign modules it imports."""
    source = inspect.getsource(importlib.import_module(module_name))
    sources = [source]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dinoalign."):
            sources.append(inspect.getsource(importlib.import_module(node.module)))
    read = set()
    for tree in map(ast.parse, sources):
        for node in ast.walk(tree):  # params.paths.<key>, or <key> of a local named paths
            if isinstance(node, ast.Attribute) and (
                (isinstance(node.value, ast.Attribute) and node.value.attr == "paths")
                or (isinstance(node.value, ast.Name) and node.value.id == "paths")
            ):
                read.add(node.attr)
    return read


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_dvc_declares_the_locations_a_stage_reads(name: str) -> None:
    stage = DVC[name].get("do", DVC[name])
    declared = {p.removeprefix("paths.") for p in stage["params"] if isinstance(p, str) and p.startswith("paths.")}
    read = _paths_read(f"dinoalign.stages.{name}")
    assert read, f"stage {name} reads no location?"
    assert read <= declared, f"dvc.yaml {name}: params lacks {sorted(read - declared)}"


def test_run_stage_refuses_an_unknown_stage() -> None:
    with pytest.raises(KeyError, match="unknown stage 'nope'; stages: prepare, teacher"):
        run_stage("nope", None, REPO)

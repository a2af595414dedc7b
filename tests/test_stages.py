"""The pipeline's stages, one module each (REVIEW.md §4.3 example 2), checked on the source.

Each ``src/dinoalign/stages/<name>.py`` has one public ``run(params, root)``, its DVC and
CLI commands at the top of its docstring, and is the only place (with ``dinoalign
retrain``, which is a command of its own) where an MLflow run is opened. Each stage's
dvc.yaml ``params:`` list holds every key the stage reads (``paths.*`` included), so
DVC's idea of a stage's inputs does not drift from the code.
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


# Read by every stage's MLflow run, never by what it computes: where runs are logged and
# the profile tag must not re-run a stage.
RUN_METADATA = {"tracking", "profile"}
# Sections a stage hands whole to the library, which reads the declared parts: align
# gives its section to plan_align/fit, which read align.<recipe> and the Ray keys (listed
# one by one in dvc.yaml so that align@talk2dino does not re-run for dinotxt's section);
# evaluate gives its section to evaluate_model, which reads every key but mlflow_ui, and
# its command sets evaluate.recipes (test_evaluate_declares_each_evaluate_key_but_the_reports).
# Evaluate's Towers.from_sections reads embed.img_size, embed.interpolation and
# embed.text_encoders (declared one by one) and align.<recipe>.text_encoder of every recipe
# that has one (only talk2dino; declared as such).
WHOLE_SECTIONS = {"align": {"align"}, "evaluate": {"evaluate", "evaluate.recipes", "align", "embed"}}
# Read only for the MLflow model a stage logs beside its DVC outputs, which DVC does not
# track: align's model bundle carries the train captions' vocabulary when the CLIP is the
# demo teacher (dinoalign.serve.write_bundle).
MLFLOW_MODEL_ONLY = {"align": {"teacher.enabled"}}
# A DataConfig passed whole to image_limits reads exactly the image bounds.
IMAGE_LIMITS = ("data.max_pixels", "data.min_side", "data.max_aspect_ratio", "data.max_bytes",
                "data.read_timeout_s", "data.read_attempts", "data.read_backoff_s")


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _params_read(module_name: str) -> set[str]:
    """The params keys a stage reads: ``params.<section>.<key>`` (and ``paths.<key>`` of a
    local named ``paths``) in its module and the dinoalign modules it imports; a section
    used whole counts as all of it, except a ``params.data`` handed to ``image_limits``."""
    source = inspect.getsource(importlib.import_module(module_name))
    sources = [source]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dinoalign."):
            sources.append(inspect.getsource(importlib.import_module(node.module)))
    read: set[str] = set()
    for tree in map(ast.parse, sources):
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        limits = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and getattr(n.func, "id", None) == "image_limits" for a in n.args}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue  # only whole chains
            chain = _chain(node)
            if chain and chain[0] == "paths" and len(chain) == 2:
                read.add(f"paths.{chain[1]}")
            elif chain and chain[0] == "params" and len(chain) >= 2:
                if id(node) in limits:
                    read.update(IMAGE_LIMITS)
                else:
                    read.add(".".join(chain[1:3]))
    return {k for k in read if k.split(".")[0] not in RUN_METADATA and k != "paths"}


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_dvc_declares_the_params_a_stage_reads(name: str) -> None:
    """Issue #17: no stage reads a key dvc.yaml does not declare for it (``teacher`` read
    ``embed.pairs_dir`` and two image bounds undeclared; ``report`` the backbone and CLIP
    it names), so DVC re-runs a stage when, and only when, an input of it changed."""
    stage = DVC[name].get("do", DVC[name])
    declared = [p.replace("${item}", "talk2dino") for p in stage["params"] if isinstance(p, str)]
    exempt = WHOLE_SECTIONS.get(name, set()) | MLFLOW_MODEL_ONLY.get(name, set())
    read = _params_read(f"dinoalign.stages.{name}") - exempt
    assert any(k.startswith("paths.") for k in read), f"stage {name} reads no location?"
    undeclared = sorted(k for k in read if not _covered(k, declared))
    assert undeclared == [], f"dvc.yaml {name}: params lacks {undeclared}"


def test_evaluate_declares_each_evaluate_key_but_the_reports() -> None:
    """evaluate@<recipe> depends on every ``evaluate.*`` key except ``recipes`` (its command
    sets it) and ``mlflow_ui`` (only the report's links use it), so that neither re-runs
    the three evaluations."""
    import dataclasses

    from dinoalign.evaluate.config import EvaluateConfig

    declared = {p for p in DVC["evaluate"]["do"]["params"] if p.startswith("evaluate")}
    fields = {f"evaluate.{f.name}" for f in dataclasses.fields(EvaluateConfig)}
    assert declared == fields - {"evaluate.recipes", "evaluate.mlflow_ui"}
    assert "evaluate" in DVC["report"]["params"]


def test_the_dvc_metrics_are_the_evaluate_headlines_and_the_report_reads_the_details() -> None:
    """Issue #17: ``dvc exp show`` / ``metrics diff`` columns are the headline numbers of
    metrics/<recipe>.json only; its details file is a plain out, which the report reads."""
    metrics = {name: DVC[name].get("do", DVC[name]).get("metrics", []) for name in STAGE_NAMES}
    assert {k: v for k, v in metrics.items() if v} == {"evaluate": ["metrics/${item}.json"]}
    assert "metrics/${item}.details.json" in DVC["evaluate"]["do"]["outs"]
    recipes = DVC["evaluate"]["foreach"]
    assert [d for d in DVC["report"]["deps"] if d.startswith("metrics/")] == [
        f"metrics/{r}.details.json" for r in recipes
    ]


def _stage_outputs() -> list[str]:
    """Every out, metric and plot file of dvc.yaml's stages, ``foreach`` expanded."""
    found = []
    for stage in DVC.values():
        body = stage.get("do", stage)
        for item in stage.get("foreach", [None]):
            for kind in ("outs", "metrics", "plots"):
                for out in body.get(kind, []):
                    path = out if isinstance(out, str) else next(iter(out))
                    found.append(path.replace("${item}", item or ""))
    return found


def test_a_report_only_key_makes_only_the_report_stale(tmp_path: Path) -> None:
    """Issue #17: with a dvc.lock that matches the tree (``dvc commit --force`` over a
    skeleton of every output: nothing runs), changing a key only the report reads makes
    ``dvc status`` list the report alone (``evaluate.mlflow_ui`` re-ran all evaluations)."""
    import json
    import subprocess
    import sys

    from ops.ops_checkout import copy_checkout

    from dinoalign.config import apply_overrides

    root = copy_checkout(REPO, tmp_path, {})
    for name in _stage_outputs():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:  # a file (x.json, curve.csv, index.html), else a directory
            path.write_text("{}\n")
        else:
            path.mkdir(exist_ok=True)
            (path / "skeleton").write_text("")
    dvc = [str(Path(sys.executable).with_name("dvc"))]

    def status() -> dict:
        done = subprocess.run([*dvc, "status", "--json"], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    subprocess.run([*dvc, "commit", "--force", "--quiet"], cwd=root, check=True, capture_output=True)
    assert status() == {}
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, ["evaluate.mlflow_ui=http://mlflow:80"])))
    assert list(status()) == ["report"]


def test_run_stage_refuses_an_unknown_stage() -> None:
    with pytest.raises(KeyError, match="unknown stage 'nope'; stages: prepare, pretrain, teacher"):
        run_stage("nope", None, REPO)


def test_help_describes_the_product_and_lists_each_stage_with_its_gist(capsys) -> None:
    """Issue #17: a real description, the stages in pipeline order with one line each
    (taken from each stage module's docstring, read without importing it), --version."""
    from dinoalign.cli import main
    from dinoalign.stages import summary

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "self-supervised vision backbone" in text and "The ``dinoalign`` command" not in text
    assert "prepare -> pretrain -> teacher -> embed -> curate -> align -> evaluate -> report" in text
    positions = [text.index(f"{name} stage: ") for name in STAGE_NAMES]
    assert positions == sorted(positions)
    assert summary("curate") == "balance the train pairs over image clusters and caption entries and drop near-duplicates"
    assert summary("teacher") == "(demo profile) train the tiny CLIP that stands in for a pretrained one"
    assert summary("pretrain") == "(demo profile) DINO-pretrain the demo's tiny ViT on unlabelled images of the synthetic world"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.fullmatch(r"dinoalign \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_summary_ends_the_demo_with_headline_numbers_the_report_and_mlflow(tmp_path: Path, capsys) -> None:
    """Issue #17: ``make demo`` ends with ``dinoalign summary``: each evaluated recipe's
    numbers with chance beside them, what is not evaluated yet, the report, the MLflow UI."""
    import json

    from dinoalign.cli import main

    (tmp_path / "metrics").mkdir()
    block = {"zeroshot": {"top1": 0.25, "chance_top1": 1 / 30},
             "segmentation": {"miou": 0.125, "chance_miou": 0.003}}
    (tmp_path / "metrics" / "dinotxt.details.json").write_text(json.dumps({**block, "heldout": block}))
    assert main(["summary", "-p", str(tmp_path / "params.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "evaluate@dinotxt [seen]: zero-shot top-1 0.250 (chance 0.033), mIoU 0.125 (chance 0.003)" in out
    assert any(line.startswith("talk2dino: not evaluated yet") for line in out)
    assert out[-2] == f"report: not written yet ({tmp_path}/report/index.html: dvc repro report)"
    assert out[-1].startswith("MLflow: make mlflow-ui")

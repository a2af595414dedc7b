"""Rules of the package's shape that a reader relies on, checked on the source text.

Recipes are one registry: what differs between them is a class fact or hook of
``dinoalign.recipes.Recipe`` (``image_columns``, ``text_input``, ``has_clip_reference``,
``training_data`` ...), so code outside ``src/dinoalign/recipes/`` never compares a recipe
name, keys a table by one nor lists them (REVIEW.md §2.2, §4.3 example 1). A new recipe is then one
module plus its ``align.<name>`` params section.

Library code never receives the whole ``Params`` (REVIEW.md §4, issue #14): it takes its own
section configs and explicit inputs, which the boundaries (stage modules, the CLI, the
inference commands, ...) resolve from the params once.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dinoalign.recipes import RECIPES
from dinoalign.train.config import recipe_names

SRC = Path(__file__).resolve().parents[1] / "src" / "dinoalign"

# (file relative to src/dinoalign, text on the line) allowed to name a recipe literally.
EXCEPTIONS = {
    # A *template set* name, not the recipe: the 7 TCL ImageNet prompts that Talk2DINO's
    # dense evaluation uses (``evaluate.dense_templates: talk2dino`` picks it).
    ("evaluate/templates.py", "TALK2DINO_TEMPLATES"),
}


def _patterns(names: list[str]) -> list[tuple[str, re.Pattern[str]]]:
    name = "|".join(re.escape(n) for n in names)
    quoted = rf"""["'](?:{name})["']"""
    return [
        ("compares a recipe name", re.compile(rf"(==|!=)\s*{quoted}|{quoted}\s*(==|!=)")),
        ("tests membership of a recipe name", re.compile(rf"{quoted}\s+(not\s+)?in\b")),
        (
            "tests membership in a literal list of recipe names",
            re.compile(rf"\bin\s*[(\[{{][^)\]}}]*{quoted}"),
        ),
        ("matches on a recipe name", re.compile(rf"\bcase\s+{quoted}")),
        ("keys a dict by a recipe name", re.compile(rf"{quoted}\s*:(?!=)")),
        ("lists recipe names (use RECIPES.names())", re.compile(rf"{quoted}\s*,\s*{quoted}")),
    ]


def recipe_name_branches(root: Path, names: list[str]) -> list[str]:
    """``file:line: what  | the line`` for every recipe-name comparison or recipe-keyed
    dict in the Python files under ``root`` outside ``recipes/``."""
    patterns = _patterns(names)
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("recipes/"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.strip()
            if code.startswith("#") or any(
                relative == file and text in code for file, text in EXCEPTIONS
            ):
                continue
            for what, pattern in patterns:
                if pattern.search(line):
                    found.append(f"src/dinoalign/{relative}:{number}: {what}  | {code}")
                    break
    return found


def test_no_code_outside_recipes_branches_on_a_recipe_name() -> None:
    found = recipe_name_branches(SRC, RECIPES.names())
    assert not found, (
        "recipe names compared outside src/dinoalign/recipes/; ask the recipe class instead "
        "(a class fact or hook on dinoalign.recipes.Recipe):\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    "line",
    [
        'if model.name == "talk2dino":',
        "if recipe != 'projector':",
        'if "projector" in metrics:',
        'if self.name in ("talk2dino", "projector"):',
        'keys = {"talk2dino": ("head_embeddings",), "projector": ("token_mean",)}[self.name]',
        '    case "dinotxt":',
        'RECIPES = ("talk2dino", "dinotxt", "projector")',
    ],
)
def test_the_scan_finds_each_kind_of_branch(tmp_path: Path, line: str) -> None:
    (tmp_path / "module.py").write_text(f"{line}\n")
    assert len(recipe_name_branches(tmp_path, RECIPES.names())) == 1


@pytest.mark.parametrize(
    "line",
    [
        'name = "talk2dino"',
        'recipe: ClassVar[str] = "dinotxt"',
        'dense_templates: str | list[str] = "talk2dino"',
        'raise KeyError(f"no recipe {name!r}; e.g. talk2dino")',
        'if model.name != recipe:',
    ],
)
def test_the_scan_lets_names_that_are_not_branches_pass(tmp_path: Path, line: str) -> None:
    (tmp_path / "module.py").write_text(f"{line}\n")
    assert recipe_name_branches(tmp_path, RECIPES.names()) == []


def test_the_light_recipe_list_of_params_is_the_registry() -> None:
    """``recipe_names()`` (the align section's training sections, no torch) validates
    align.recipe, evaluate.recipes and retrain.recipes; it must list the registry."""
    assert sorted(recipe_names()) == RECIPES.names()


# Files and folders (relative to src/dinoalign) that may take the whole Params: the
# boundaries, which resolve the section configs and inputs the library functions take.
PARAMS_BOUNDARIES = (
    "stages/",  # one module per stage: run(params, root)
    "cli.py",
    "infer.py",  # the inference commands
    "tracking.py",  # a stage's MLflow run: tracking URI, experiment, the params it logs
    "ops/",  # dinoalign retrain and the stack commands
    "config.py",  # Params itself
    "serve.py",  # the MLflow model stores the resolved params (params.json) and rebuilds them
)


def _names_params(annotation: ast.expr) -> bool:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Params":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Params":
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\bParams\b", node.value):
            return True
    return False


def params_receivers(root: Path, boundaries: tuple[str, ...] = PARAMS_BOUNDARIES) -> list[str]:
    """``file:line: function(arg: annotation)`` for every function parameter annotated with
    ``Params`` in the Python files under ``root`` outside ``boundaries``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(boundaries):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None and arg.annotation is not None and _names_params(arg.annotation):
                    found.append(f"src/dinoalign/{relative}:{node.lineno}: "
                                 f"{node.name}({arg.arg}: {ast.unparse(arg.annotation)})")
    return found


def test_library_code_never_receives_the_whole_params() -> None:
    found = params_receivers(SRC)
    assert not found, (
        "library functions take their own section configs and explicit inputs, built from "
        "the params at the boundary (a stage module, the CLI, infer.py):\n" + "\n".join(found)
    )


def test_the_params_scan_finds_each_annotation_and_spares_the_boundaries(tmp_path: Path) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "x.py").write_text("def run(params: Params, root: Path) -> None: ...\n")
    (tmp_path / "lib.py").write_text(
        "def a(params: Params) -> None: ...\n"
        "def b(cfg: EvaluateConfig, p: 'Params | None' = None) -> None: ...\n"
        "def c(*, params: config.Params) -> None: ...\n"
        "def d(params: Any, cfg: ParamsLike) -> None: ...\n"
    )
    found = params_receivers(tmp_path, ("stages/",))
    assert [f.split(": ", 1)[1] for f in found] == [
        "a(params: Params)", "b(p: 'Params | None')", "c(params: config.Params)"]

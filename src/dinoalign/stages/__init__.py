"""The pipeline stages, one module each: ``dinoalign.stages.<name>.run(params, root)``.

A stage module is the only code that reads the whole :class:`~dinoalign.config.Params`,
opens an MLflow run (:func:`dinoalign.tracking.stage_run`) and prints; it resolves its
section config and locations, calls the library, writes and logs the outputs and prints
one summary. ``python stages/<name>.py`` (the DVC command) and ``dinoalign <name>`` both
land here. Modules are imported when their stage runs, so ``dinoalign --help`` stays
free of torch and MLflow.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

# In pipeline order (dvc.yaml); each is the module dinoalign.stages.<name>.
STAGE_NAMES = ("prepare", "pretrain", "teacher", "embed", "curate", "align", "evaluate", "report")


def run_stage(name: str, params: Any, root: Path) -> dict[str, Any]:
    """Run stage ``name`` (one of :data:`STAGE_NAMES`) with ``params`` in the checkout
    ``root``; returns the stage's summary."""
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    module = importlib.import_module(f"dinoalign.stages.{name}")
    return module.run(params, root)


def summary(name: str) -> str:
    """The gist of stage ``name``'s docstring (its first clause, one line, without "The
    <name> stage: "), as ``dinoalign --help`` lists it. Read from the source file, not imported, so
    the help stays free of torch and MLflow."""
    spec = importlib.util.find_spec(f"dinoalign.stages.{name}")
    assert spec is not None and spec.origin is not None
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    first = re.sub(rf"^The {name} stage( \(([^)]*)\))?: ", lambda m: f"({m.group(2)}) " if m.group(2) else "", first)
    first = re.sub(r" \((RECIPES|docs)[^)]*\)", "", first.split("; ")[0])  # the gist, no references
    return first.rstrip(".")

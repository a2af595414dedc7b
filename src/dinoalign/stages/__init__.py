"""The pipeline stages, one module each: ``dinoalign.stages.<name>.run(params, root)``.

A stage module is the only code that reads the whole :class:`~dinoalign.config.Params`,
opens an MLflow run (:func:`dinoalign.tracking.stage_run`) and prints; it resolves its
section config and locations, calls the library, writes and logs the outputs and prints
one summary. ``python stages/<name>.py`` (the DVC command) and ``dinoalign <name>`` both
land here. Modules are imported when their stage runs, so ``dinoalign --help`` stays
free of torch and MLflow.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# In pipeline order (dvc.yaml); each is the module dinoalign.stages.<name>.
STAGE_NAMES = ("prepare", "teacher", "embed", "curate", "align", "evaluate", "report")


def run_stage(name: str, params: Any, root: Path) -> dict[str, Any]:
    """Run stage ``name`` (one of :data:`STAGE_NAMES`) with ``params`` in the checkout
    ``root``; returns the stage's summary."""
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    module = importlib.import_module(f"dinoalign.stages.{name}")
    return module.run(params, root)

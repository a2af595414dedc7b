"""Pipeline stages as functions ``fn(params, root) -> summary dict``.

Each stage opens one MLflow run (``tracking.stage_run``), calls into the library and logs
counts. ``stages/<name>.py`` and ``dinoalign <name>`` both land here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dinoalign.config import Params
from dinoalign.registry import Registry

StageFn = Callable[[Params, Path], dict[str, Any]]
STAGES: Registry[StageFn] = Registry("pipeline stage")


@STAGES.register("prepare")
def prepare(params: Params, root: Path) -> dict[str, Any]:
    import mlflow

    from dinoalign.data.prepare import run_prepare
    from dinoalign.tracking import run_url, stage_run

    with stage_run("prepare", params) as run:
        summary = run_prepare(params, root)
        mlflow.log_metrics(
            {
                "pairs": summary["n_pairs"],
                "captions": summary["n_captions"],
                "rejects": summary["n_rejects"],
                **{f"pairs.{k}": v for k, v in summary["splits"].items()},
                **{f"rejects.{k}": v for k, v in summary["rejects_by_reason"].items()},
            }
        )
        out = root / params.prepare.out_dir
        mlflow.log_artifact(str(out / "summary.json"))
        summary["mlflow_run"] = run_url(run)
    print(
        f"prepare: {summary['n_pairs']} pairs ({summary['splits']}), "
        f"{summary['n_rejects']} rejects -> {out}/manifest, rejects in {out}/rejects.parquet\n"
        f"prepare: MLflow run {summary['mlflow_run']}"
    )
    return summary

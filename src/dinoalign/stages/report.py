"""The report stage: every recipe side by side in one self-contained page.

    dvc repro report
    dinoalign report [section.key=value ...]       # = python stages/report.py

Reads what the other stages wrote (metrics, plots, curves, the pairs and curation
summaries, the MLflow runs of this experiment); writes ``<paths.report>/index.html``,
which needs no network to open (:mod:`dinoalign.report`, given the
:class:`~dinoalign.report.ReportInputs` that :func:`report_inputs` gathers from the params).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from dinoalign.config import Params
from dinoalign.report import ReportInputs, write_report
from dinoalign.tracking import run_url, stage_run, tracking_uri


def run(params: Params, root: Path) -> dict[str, Any]:
    with stage_run("report", params) as run:
        path = write_report(report_inputs(params, root))
        mlflow.log_artifact(str(path))
        summary = {"report": str(path), "mlflow_run": run_url(run)}

    print(f"report: {path} (open it in a browser; it needs no network)\nreport: MLflow run {summary['mlflow_run']}")
    return summary


def report_inputs(params: Params, root: Path) -> ReportInputs:
    """What the page compares and where it reads it: the recipes of ``evaluate.recipes``,
    the ``paths`` of the checkout ``root`` and the MLflow store of ``tracking``."""
    return ReportInputs(
        recipes=tuple(params.evaluate.recipes),
        dataset=params.evaluate.dataset,
        profile=params.profile,
        backbone=params.backbone,
        clip=params.clip,
        paths=params.paths,
        root=root,
        tracking_uri=tracking_uri(params),
        experiment=params.tracking.experiment,
        mlflow_ui=params.evaluate.mlflow_ui,
    )

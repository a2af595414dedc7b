"""The prepare stage: the configured source -> the validated pairs manifest.

    dvc repro prepare
    dinoalign prepare [section.key=value ...]      # = python stages/prepare.py

Reads ``data.source`` (plus the pairs ``dinoalign retrain`` appended under
``paths.incoming``), checks every image against the ``data`` bounds and writes to
``paths.pairs``: ``manifest/part-*.parquet``, ``rejects.parquet`` (uid, reason) and
``summary.json`` (:mod:`dinoalign.data.prepare`). Every uid of the source ends in one of
the manifest or the rejects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from dinoalign.config import Params
from dinoalign.data.prepare import manifest_digest, prepare_pairs
from dinoalign.storage import under_root
from dinoalign.tracking import log_dataset, run_url, stage_run


def run(params: Params, root: Path) -> dict[str, Any]:
    cfg, paths = params.prepare, params.paths
    out = Path(under_root(paths.pairs, root))
    incoming = Path(under_root(paths.incoming, root)) if paths.incoming else None

    with stage_run("prepare", params) as run:
        summary = prepare_pairs(params.data, cfg.shard_size, cfg.validate_images, out, root, incoming)
        mlflow.log_metrics(
            {
                "pairs": summary["n_pairs"],
                "captions": summary["n_captions"],
                "rejects": summary["n_rejects"],
                **{f"pairs.{k}": v for k, v in summary["splits"].items()},
                **{f"rejects.{k}": v for k, v in summary["rejects_by_reason"].items()},
            }
        )
        mlflow.log_artifact(str(out / "summary.json"))
        log_dataset("pairs", str(out / "manifest"), manifest_digest(out), "output", rows=summary["n_pairs"])
        summary["mlflow_run"] = run_url(run)

    print(
        f"prepare: {summary['n_pairs']} pairs ({summary['splits']}), "
        f"{summary['n_rejects']} rejects -> {out}/manifest, rejects in {out}/rejects.parquet\n"
        f"prepare: MLflow run {summary['mlflow_run']}"
    )
    return summary

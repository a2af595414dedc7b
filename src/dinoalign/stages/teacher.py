"""The teacher stage (demo profile): train the tiny CLIP that stands in for a pretrained
one; real profiles set ``teacher.enabled=false`` and the stage only records which CLIP
they configured.

    dvc repro teacher
    dinoalign teacher [section.key=value ...]      # = python stages/teacher.py

Reads the train split of the pairs (``paths.pairs``); writes ``paths.teacher``:
``model/`` (an open_clip ``local-dir:`` model), ``curve.csv`` and ``metrics.json``
(test-split retrieval with chance beside it; :mod:`dinoalign.teacher`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from dinoalign.config import Params
from dinoalign.data.images import image_limits
from dinoalign.teacher import run_teacher
from dinoalign.storage import under_root, write_atomic
from dinoalign.data.prepare import manifest_digest
from dinoalign.tracking import log_dataset, run_url, stage_run


def run(params: Params, root: Path) -> dict[str, Any]:
    cfg = params.teacher
    out = Path(under_root(params.paths.teacher, root))
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        note = {"skipped": True, "reason": "teacher.enabled=false: a real CLIP is configured",
                "clip": {"name": params.clip.name, "pretrained": params.clip.pretrained}}
        write_atomic(out / "metrics.json", json.dumps(note, indent=2) + "\n")
        print(f"teacher: skipped ({note['reason']}: {params.clip.name})")
        return note

    def log(row: dict[str, float]) -> None:
        print(f"teacher: epoch {row['epoch']} loss {row['loss']:.3f} ({row['samples_per_s']:.0f} samples/s)")
        mlflow.log_metrics({"loss": row["loss"], "samples_per_s": row["samples_per_s"]}, step=int(row["step"]))

    pairs_dir = Path(under_root(params.paths.pairs, root))
    with stage_run("teacher", params) as run:
        log_dataset("pairs", str(pairs_dir / "manifest"), manifest_digest(pairs_dir), "training")
        metrics = run_teacher(cfg, pairs_dir, image_limits(params.data), params.seed, out, log=log, root=root)
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out / "metrics.json"))
        metrics["mlflow_run"] = run_url(run)

    print(f"teacher: test-split retrieval i2t R@1 {metrics['i2t_R@1']:.3f} (chance {metrics['chance_i2t_R@1']:.3f}), "
          f"t2i R@1 {metrics['t2i_R@1']:.3f} (chance {metrics['chance_t2i_R@1']:.3f}) -> {out}/model\n"
          f"teacher: MLflow run {metrics['mlflow_run']}")
    return metrics

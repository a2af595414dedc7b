"""The curate stage: balance the train pairs over image clusters and caption entries and
drop near-duplicates (RECIPES.md "Curation", docs/curation.md).

    dvc repro curate
    dinoalign curate [section.key=value ...]       # = python stages/curate.py

Reads the train split of the pairs (``paths.pairs``) and the image feature
``curate.feature`` of the embed store (``paths.features``); writes under ``paths.curated``
the uid list with its cluster ids and filter masks, ``stats.json`` and the plot tables
(:mod:`dinoalign.curate.tables`). Val and test pairs are never curated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlflow

from dinoalign.config import Params
from dinoalign.curate.tables import PLOTS_DIR, STATS_FILE, UIDS_FILE, curate_train_split, stats_metrics, write_outputs
from dinoalign.data.prepare import manifest_digest
from dinoalign.embed.store import FeatureStore
from dinoalign.storage import under_root
from dinoalign.tracking import log_dataset, run_url, stage_run
from dinoalign.train.data import uids_digest


def run(params: Params, root: Path) -> dict[str, Any]:
    cfg = params.curate
    if isinstance(cfg.text_vocab, str):
        cfg = dataclasses.replace(cfg, text_vocab=under_root(cfg.text_vocab, root))
    pairs_dir = Path(under_root(params.paths.pairs, root))
    features = under_root(params.paths.features, root)
    out = Path(under_root(params.paths.curated, root))

    with stage_run("curate", params) as run:
        log_dataset("pairs", str(pairs_dir / "manifest"), manifest_digest(pairs_dir), "curation")
        log_dataset("features", features, FeatureStore(features).digest(), "curation")
        curated = curate_train_split(cfg, pairs_dir, features)
        write_outputs(out, curated.table, curated.stats)
        kept = curated.table.filter(curated.table.column("kept")).column("uid").to_pylist()
        log_dataset("curated_uids", str(out / UIDS_FILE), uids_digest(sorted(kept)), "output", rows=len(kept))
        stats = curated.stats
        mlflow.log_metrics({**stats_metrics(stats), "seconds": curated.seconds})
        mlflow.set_tag("curate.faiss_device", stats["kmeans"]["device"])
        mlflow.log_artifact(str(out / STATS_FILE))
        mlflow.log_artifacts(str(out / PLOTS_DIR), PLOTS_DIR)
        url = run_url(run)

    removed = stats["removed"]
    print(
        f"curate: kept {stats['n_kept']} of {stats['n_train']} train pairs "
        f"({stats['combine']}; removed: {removed['dedup']} near-duplicates, "
        f"{removed['image_balancing']} by image balancing, {removed['text_balancing']} by text "
        f"balancing; {stats['without_features']['count']} without features) -> {out}\n"
        + "".join(f"curate: warning: {note}\n" for note in stats["kmeans"]["warnings"])
        + f"curate: MLflow run {url}"
    )
    return {"stats": stats, "out_dir": str(out), "seconds": curated.seconds, "mlflow_run": url}

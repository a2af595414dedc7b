"""The curate stage's inputs and outputs: train-split features and captions -> the
curated uid list (the stage itself: :mod:`dinoalign.stages.curate`).

Reads the image feature ``curate.feature`` of every train pair from the embed store
(``paths.features``) and its captions from the pairs manifest (``paths.pairs``), runs
:func:`dinoalign.curate.curate` and writes under ``paths.curated``::

    uids.parquet    every train uid, sorted: cluster_l1 … cluster_lL (int32, null without
                    features) and the bool columns kept_features, kept_dedup, kept_image,
                    kept_text, kept (the curated set); its metadata names the digest of
                    the features it was computed from (CURATED_FEATURES_KEY)
    stats.json      counts per filter, FAISS sample counts, cluster sizes, entry counts
    plots/cluster_sizes/level_<ℓ>.csv        rank, cluster, before, after (points/cluster)
    plots/captions_per_entry/before.csv      entry, captions (text balancing on only)
    plots/captions_per_entry/after.csv

Val and test pairs are never curated. A train pair that embed rejected (a reject row in
the feature store) is listed with ``kept_features`` false; a train pair with neither
features nor a reject means the features are older than the manifest, which is an error.
Curation is recomputed from all features on every run (cheap next to embedding), so new
pairs change the output, deterministically for a seed.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dinoalign.curate.config import CurateConfig
from dinoalign.curate.curation import cluster_column, curate
from dinoalign.data.prepare import read_pairs
from dinoalign.data.schema import CURATED_FEATURES_KEY
from dinoalign.embed.store import FeatureStore, load_image_features
from dinoalign.errors import ConfigError, DataError, DataFileMissing
from dinoalign.storage import atomic_path, remove_temporaries, write_atomic

CURATED_SPLIT = "train"
UIDS_FILE = "uids.parquet"
STATS_FILE = "stats.json"
PLOTS_DIR = "plots"
MASK_COLUMNS = ("kept_features", "kept_dedup", "kept_image", "kept_text", "kept")


@dataclasses.dataclass(frozen=True)
class CuratedSplit:
    """What :func:`curate_train_split` decided: ``table`` (uids.parquet), ``stats``
    (stats.json) and ``seconds`` (curation alone, without reading the inputs)."""

    table: pa.Table
    stats: dict[str, Any]
    seconds: float


def curate_train_split(cfg: CurateConfig, pairs_dir: Path, features_uri: str) -> CuratedSplit:
    """Curate the train split of the pairs in ``pairs_dir`` from the features at
    ``features_uri`` (``cfg.text_vocab`` already resolved to a readable path)."""
    pairs = _train_pairs(pairs_dir)
    train_uids = pairs.column("uid").to_pylist()
    uids, embeddings = _load_train_features(features_uri, cfg.feature, train_uids)
    missing = sorted(set(train_uids) - set(uids))
    missing_reasons = _embed_reject_reasons(features_uri, missing)
    if not uids:
        raise DataError(
            f"none of the {len(train_uids)} train pairs has features in {features_uri}: "
            f"embed rejected them all ({missing_reasons}); see its rejects.parquet"
        )
    captions_by_uid = dict(zip(train_uids, pairs.column("captions").to_pylist()))

    started = time.perf_counter()
    result = curate(uids, embeddings, [captions_by_uid[uid] for uid in uids], cfg)
    seconds = time.perf_counter() - started

    stats = {
        "split": CURATED_SPLIT,
        "feature": cfg.feature,
        "features_digest": FeatureStore(features_uri).digest(),
        "n_train": len(train_uids),
        "without_features": {"count": len(missing), "embed_reject_reasons": missing_reasons},
        **result.stats,
    }
    table = _with_pairs_without_features(result.table, missing, len(cfg.levels))
    table = table.replace_schema_metadata({CURATED_FEATURES_KEY: stats["features_digest"]})
    return CuratedSplit(table=table, stats=stats, seconds=seconds)


def _train_pairs(pairs_dir: Path) -> pa.Table:
    """uid and captions of the train split of the pairs manifest, sorted by uid."""
    manifest = read_pairs(pairs_dir)
    train = manifest.filter(pc.equal(manifest.column("split"), CURATED_SPLIT))
    if train.num_rows == 0:
        splits = dict(collections.Counter(manifest.column("split").to_pylist()))
        raise DataError(
            f"no {CURATED_SPLIT!r} pairs in {pairs_dir} (splits: {splits}): curate only "
            "curates the train split; val and test stay untouched"
        )
    return train.select(["uid", "captions"]).sort_by("uid")


def _load_train_features(
    uri: str, feature: str, train_uids: list[str]
) -> tuple[list[str], np.ndarray]:
    """(uids with features, sorted; their ``feature`` vectors N×D float32)."""
    manifest = FeatureStore(uri).read_manifest()
    if manifest is None:
        raise DataFileMissing(f"{uri}/manifest.json is missing: run the embed stage first")
    columns = manifest["spec"]["columns"]
    vectors = sorted(c for c, shape in columns.items() if len(shape) == 1)
    if feature not in columns or len(columns[feature]) != 1:
        raise ConfigError(
            f"curate.feature={feature!r} is not a per-image vector of {uri}; "
            f"choose one of {vectors}"
        )
    loaded = load_image_features(uri, [feature], uids=train_uids)
    return loaded["uid"].tolist(), loaded[feature].astype(np.float32, copy=False)


def _embed_reject_reasons(uri: str, missing: list[str]) -> dict[str, int]:
    """Reject reasons (count per reason) of the train uids without features; an error if
    any of them has no reject either (the features are older than the manifest)."""
    if not missing:
        return {}
    rejects = FeatureStore(uri).read_rejects()
    reason_of = dict(zip(rejects.column("uid").to_pylist(), rejects.column("reason").to_pylist()))
    unexplained = [uid for uid in missing if uid not in reason_of]
    if unexplained:
        raise DataError(
            f"{len(unexplained)} train pairs have neither features nor an embed reject in "
            f"{uri} (e.g. uid {unexplained[0]}): the features are older than the pairs "
            "manifest; run the embed stage (dvc repro embed) first"
        )
    return dict(sorted(collections.Counter(reason_of[uid] for uid in missing).items()))


def _with_pairs_without_features(
    curated: pa.Table, missing: list[str], n_levels: int
) -> pa.Table:
    """``curated`` (one row per clustered pair) plus a row for every uid in ``missing``
    (null clusters, every mask false), with ``kept_features``; sorted by uid."""
    curated = curated.append_column(
        "kept_features", pa.array(np.ones(curated.num_rows, dtype=bool))
    )
    n = len(missing)
    rows_without: dict[str, pa.Array] = {"uid": pa.array(missing, type=pa.string())}
    for level in range(1, n_levels + 1):
        rows_without[cluster_column(level)] = pa.nulls(n, type=pa.int32())
    for name in MASK_COLUMNS:
        rows_without[name] = pa.array(np.zeros(n, dtype=bool))
    names = ["uid", *(cluster_column(level) for level in range(1, n_levels + 1)), *MASK_COLUMNS]
    without = pa.table(rows_without).select(names)
    return pa.concat_tables([curated.select(names), without]).sort_by("uid")


def write_outputs(out_dir: Path, table: pa.Table, stats: dict[str, Any]) -> None:
    """uids.parquet, stats.json and the plot CSVs (module docstring). Files are written
    to a temporary name and renamed; the temporaries of a killed run and the plots of an
    earlier run are removed first, so a re-run writes exactly what an uninterrupted run
    writes and a change in the number of levels leaves no stale level file behind."""
    remove_temporaries(out_dir)
    with atomic_path(out_dir / UIDS_FILE) as tmp:
        pq.write_table(table, tmp)
    write_atomic(out_dir / STATS_FILE, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    plots = out_dir / PLOTS_DIR
    shutil.rmtree(plots, ignore_errors=True)
    for level in stats["kmeans"]["levels"]:
        before = np.asarray(level["sizes_before"])
        after = np.asarray(level["sizes_after"])
        ranked = np.lexsort((np.arange(len(before)), -before))  # largest first, then by id
        _write_csv(
            plots / "cluster_sizes" / f"level_{level['level']}.csv",
            ["rank", "cluster", "before", "after"],
            [[rank, c, before[c], after[c]] for rank, c in enumerate(ranked.tolist())],
        )
    text = stats["text"]
    if text["enabled"]:
        for when in ("before", "after"):
            _write_csv(
                plots / "captions_per_entry" / f"{when}.csv",
                ["entry", "captions"],
                [[entry, count] for entry, count in text[f"caption_counts_{when}"].items()],
            )


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def stats_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``stats`` to log as MLflow metrics: counts per filter and, per level,
    the clusters and the number of items FAISS trained on in each k-means run (run 0 is
    the initial k-means, run i ≥ 1 the i-th resampling step)."""
    metrics: dict[str, float] = {
        "pairs.train": stats["n_train"],
        "pairs.without_features": stats["without_features"]["count"],
        "pairs.clustered": stats["n_input"],
        "pairs.kept": stats["n_kept"],
        **{f"removed.{name}": count for name, count in stats["removed"].items()},
    }
    for level in stats["kmeans"]["levels"]:
        prefix = f"kmeans.l{level['level']}"
        metrics[f"{prefix}.k"] = level["k"]
        metrics[f"{prefix}.empty_clusters"] = level["empty_clusters"]
        for run, points in enumerate(level["faiss_points"]):
            metrics[f"{prefix}.faiss_points.run{run}"] = points
    if "near_duplicate_pairs" in stats["dedup"]:
        metrics["dedup.near_duplicate_pairs"] = stats["dedup"]["near_duplicate_pairs"]
    if stats["text"]["enabled"]:
        metrics["text.unmatched_pairs_before"] = stats["text"]["unmatched_pairs_before"]
        metrics["text.unmatched_pairs_after"] = stats["text"]["unmatched_pairs_after"]
    return {name: float(value) for name, value in metrics.items()}


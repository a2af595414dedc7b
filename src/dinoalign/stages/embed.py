"""The embed stage: every pair's image through the backbone and its captions through the
text towers, into the feature store (Ray Data actor pool, or a plain loop).

    dvc repro embed
    dinoalign embed [section.key=value ...]        # = python stages/embed.py

Reads the pairs manifest (``paths.pairs``); writes parquet shards, ``spec.json``,
``manifest.json`` and ``rejects.parquet`` to ``paths.features`` (a path or ``s3://``
URI; :mod:`dinoalign.embed.engine`). Incremental by content: images whose bytes and
captions whose text are already embedded with the same models and preprocessing are
skipped, changed ones are embedded again and their old rows retired, so new or edited
pairs cost only themselves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlflow

from dinoalign.config import Params, describe_backbone
from dinoalign.data.images import image_limits
from dinoalign.data.prepare import manifest_digest, read_pairs
from dinoalign.embed.engine import EmbedJob, run_embed
from dinoalign.embed.store import FeatureStore
from dinoalign.storage import under_root
from dinoalign.tracking import log_dataset, run_url, stage_run


def run(params: Params, root: Path) -> dict[str, Any]:
    pairs_dir = Path(under_root(params.paths.pairs, root))
    manifest = read_pairs(pairs_dir)

    with stage_run("embed", params) as run:
        log_dataset("pairs", str(pairs_dir / "manifest"), manifest_digest(pairs_dir), "embedding", rows=manifest.num_rows)
        features = under_root(params.paths.features, root)
        summary = run_embed(embed_job(params, features, root), manifest)
        log_dataset("features", features, FeatureStore(features).digest(), "output")
        operators, stats_text = summary["operators"], summary.pop("ray_data_stats")
        mlflow.set_tag("dinoalign.embed.nodes", ",".join(summary["nodes"]))
        backbone = describe_backbone(params.backbone, root)
        mlflow.set_tag("dinoalign.backbone", backbone)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_metrics(operator_metrics(operators))
        mlflow.log_text(json.dumps(summary, indent=2), "embed_summary.json")
        if stats_text:
            mlflow.log_text(stats_text, "ray_data_stats.txt")
        summary["mlflow_run"] = run_url(run)

    print(
        f"embed: {summary['images_embedded']} images + {summary['captions_embedded']} captions embedded "
        f"({summary['images_per_s']:.1f} images/s), {summary['images_skipped']} skipped, "
        f"{summary['images_rejected']} rejected -> {params.paths.features}\n"
        f"embed: by content: {summary['images_changed']} images and {summary['captions_changed']} captions "
        f"re-embedded because they changed, {summary['images_retired']} image and {summary['captions_retired']} "
        f"caption rows retired (changed or gone from the pairs), {summary['images_skipped']} images and "
        f"{summary['captions_skipped']} captions skipped as unchanged\n"
        f"embed: backbone {params.backbone.name}: {backbone}\n"
        + (f"embed: {summary['images_rejected_transient']} of the rejects are transient (read_timeout, "
           "unavailable): the next run tries them again (DVC sees no change: dvc repro -s -f embed)\n"
           if summary["images_rejected_transient"] else "")
        + "".join(
            f"embed: {kind} operators (busy s / span s): "
            + ", ".join(f"{name} {t['wall_s']:.1f}/{t['span_s']:.1f}" for name, t in ops.items()) + "\n"
            for kind, ops in operators.items()
        )
        + f"embed: MLflow run {summary['mlflow_run']}"
    )
    return summary


def embed_job(params: Params, features: str, root: Path | None = None) -> EmbedJob:
    """The embed job of ``params`` writing to ``features`` (``paths.features`` resolved
    against the checkout: workers do not run in it); a relative ``backbone.weights`` file
    is read from the checkout ``root`` (the pretrain stage's output in the demo)."""
    return EmbedJob(embed=params.embed, backbone=params.backbone, clip=params.clip,
                    text_encoders=tuple(params.embed.text_encoders), limits=image_limits(params.data),
                    seed=params.seed, features=str(features),
                    root=None if root is None else str(Path(root).resolve()))


def operator_metrics(operators: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """``{"images": {"MapBatches(ImageEmbedder)": {"wall_s": ..}}}`` as MLflow metric names
    (``op.images.MapBatches_ImageEmbedder.wall_s``: MLflow refuses brackets in names)."""
    return {
        f"op.{kind}.{_METRIC_UNSAFE.sub('_', name).strip('_')}.{key}": value
        for kind, ops in operators.items() for name, times in ops.items() for key, value in times.items()
    }


_METRIC_UNSAFE = re.compile(r"[^\w.\-]+")

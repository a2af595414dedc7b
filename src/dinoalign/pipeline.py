"""Pipeline stages as functions ``fn(params, root) -> summary dict``.

Each stage opens one MLflow run (``tracking.stage_run``), calls into the library and logs
counts. ``stages/<name>.py`` and ``dinoalign <name>`` both land here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from dinoalign.config import Params
from dinoalign.registry import Registry
from dinoalign.tracking import run_url, stage_run

# Each stage imports its library code (and mlflow) when it runs: ``dinoalign --help`` and
# ``dinoalign params`` read this module for the stage names and stay free of torch.
StageFn = Callable[[Params, Path], dict[str, Any]]
STAGES: Registry[StageFn] = Registry("pipeline stage")


@STAGES.register("prepare")
def prepare(params: Params, root: Path) -> dict[str, Any]:
    import mlflow

    from dinoalign.data.prepare import run_prepare

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


@STAGES.register("teacher")
def teacher(params: Params, root: Path) -> dict[str, Any]:
    """Demo only: train the tiny CLIP teacher; real profiles record that a real CLIP is used."""
    import mlflow

    from dinoalign.teacher import run_teacher

    out = root / params.teacher.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if not params.teacher.enabled:
        note = {"skipped": True, "reason": "teacher.enabled=false: a real CLIP is configured",
                "clip": {"name": params.clip.name, "pretrained": params.clip.pretrained}}
        (out / "metrics.json").write_text(json.dumps(note, indent=2) + "\n")
        print(f"teacher: skipped ({note['reason']}: {params.clip.name})")
        return note
    with stage_run("teacher", params) as run:
        def log(row: dict[str, float]) -> None:
            print(f"teacher: epoch {row['epoch']} loss {row['loss']:.3f} ({row['samples_per_s']:.0f} samples/s)")
            mlflow.log_metrics({"loss": row["loss"], "samples_per_s": row["samples_per_s"]}, step=int(row["step"]))

        metrics = run_teacher(params, root, log=log)
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out / "metrics.json"))
        metrics["mlflow_run"] = run_url(run)
    print(f"teacher: test-split retrieval i2t R@1 {metrics['i2t_R@1']:.3f} (chance {metrics['chance_i2t_R@1']:.3f}), "
          f"t2i R@1 {metrics['t2i_R@1']:.3f} (chance {metrics['chance_t2i_R@1']:.3f}) -> {out}/model\n"
          f"teacher: MLflow run {metrics['mlflow_run']}")
    return metrics


@STAGES.register("embed")
def embed(params: Params, root: Path) -> dict[str, Any]:
    import mlflow

    from dinoalign.data.prepare import read_manifest
    from dinoalign.embed.engine import run_embed

    manifest = read_manifest(root / params.embed.pairs_dir)
    with stage_run("embed", params) as run:
        summary = run_embed(params, manifest)
        operators, stats_text = summary["operators"], summary.pop("ray_data_stats")
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_metrics(operator_metrics(operators))
        mlflow.log_text(json.dumps(summary, indent=2), "embed_summary.json")
        if stats_text:
            mlflow.log_text(stats_text, "ray_data_stats.txt")
        summary["mlflow_run"] = run_url(run)
    print(
        f"embed: {summary['images_embedded']} images + {summary['captions_embedded']} captions embedded "
        f"({summary['images_per_s']:.1f} images/s), {summary['images_skipped']} skipped, "
        f"{summary['images_rejected']} rejected -> {params.embed.out_dir}\n"
        + "".join(
            f"embed: {kind} operators (busy s / span s): "
            + ", ".join(f"{name} {t['wall_s']:.1f}/{t['span_s']:.1f}" for name, t in ops.items()) + "\n"
            for kind, ops in operators.items()
        )
        + f"embed: MLflow run {summary['mlflow_run']}"
    )
    return summary


def operator_metrics(operators: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """``{"images": {"MapBatches(ImageEmbedder)": {"wall_s": ..}}}`` as MLflow metric names
    (``op.images.MapBatches_ImageEmbedder.wall_s``: MLflow refuses brackets in names)."""
    return {
        f"op.{kind}.{_METRIC_UNSAFE.sub('_', name).strip('_')}.{key}": value
        for kind, ops in operators.items() for name, times in ops.items() for key, value in times.items()
    }


_METRIC_UNSAFE = re.compile(r"[^\w.\-]+")


@STAGES.register("curate")
def curate(params: Params, root: Path) -> dict[str, Any]:
    """Balance the train pairs over image clusters and caption entries, drop near-duplicates."""
    import mlflow

    from dinoalign.curate.stage import PLOTS_DIR, STATS_FILE, run_curate, stats_metrics

    with stage_run("curate", params) as run:
        summary = run_curate(params, root)
        stats, out = summary["stats"], Path(summary["out_dir"])
        mlflow.log_metrics({**stats_metrics(stats), "seconds": summary["seconds"]})
        mlflow.set_tag("curate.faiss_device", stats["kmeans"]["device"])
        mlflow.log_artifact(str(out / STATS_FILE))
        mlflow.log_artifacts(str(out / PLOTS_DIR), PLOTS_DIR)
        summary["mlflow_run"] = run_url(run)
    removed = stats["removed"]
    print(
        f"curate: kept {stats['n_kept']} of {stats['n_train']} train pairs "
        f"({stats['combine']}; removed: {removed['dedup']} near-duplicates, "
        f"{removed['image_balancing']} by image balancing, {removed['text_balancing']} by text "
        f"balancing; {stats['without_features']['count']} without features) -> {out}\n"
        + "".join(f"curate: warning: {note}\n" for note in stats["kmeans"]["warnings"])
        + f"curate: MLflow run {summary['mlflow_run']}"
    )
    return summary


@STAGES.register("evaluate")
def evaluate(params: Params, root: Path) -> dict[str, Any]:
    """Each recipe of ``evaluate.recipes`` -> ``metrics/<recipe>.json`` + ``plots/<recipe>/``,
    one MLflow run ``evaluate@<recipe>`` each (dinoalign.evaluate.stage)."""
    from dinoalign.evaluate.stage import run_evaluate

    return run_evaluate(params, root)


@STAGES.register("align")
def align(params: Params, root: Path) -> dict[str, Any]:
    """Train ``align.recipe`` with Ray Train, register it as ``dinoalign-<recipe>@candidate``
    (dinoalign.train.stage)."""
    from dinoalign.train.stage import run_align

    summary = run_align(params, root)
    print(
        f"align: {summary['recipe']} {summary['steps']} steps ({summary['epochs']} epochs over "
        f"{summary['train_samples']} samples of {summary['train_uids']} train uids), final loss "
        f"{summary['final_loss']:.4f}, {summary['mean_samples_per_s']:.0f} samples/s -> "
        f"{params.align.out_dir}/{summary['recipe']} (dinoalign-{summary['recipe']} version "
        f"{summary['model_version']} @candidate)\n"
        f"align: MLflow run {summary['mlflow_run']}"
    )
    return summary


@STAGES.register("report")
def report(params: Params, root: Path) -> dict[str, Any]:
    """Every recipe side by side in one self-contained page: ``report/index.html``."""
    import mlflow

    from dinoalign.report import write_report

    with stage_run("report", params) as run:
        path = write_report(params, root)
        mlflow.log_artifact(str(path))
        summary = {"report": str(path), "mlflow_run": run_url(run)}
    print(f"report: {path} (open it in a browser; it needs no network)\nreport: MLflow run {summary['mlflow_run']}")
    return summary

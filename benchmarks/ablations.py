"""The papers' ablations in miniature, on the demo world (issue #15).

    make demo && python benchmarks/ablations.py                  # 3 seeds, every row (~1 h on 2 cores)
    python benchmarks/ablations.py --seeds 0 --rows talk2dino    # one seed, one recipe's rows

Runs in a checkout where ``make demo`` has run (it reads that checkout's params.yaml, pairs,
features, curated uids, the pretrained backbone and the teacher CLIP) and changes one factor
per row, as the Talk2DINO and dino.txt ablation tables do:

talk2dino (baseline: the paper's choices, best head of the per-head embeddings, ψ MLP)
  - the image side ψ is trained against: averaged attention (``avg_self_attn_token`` of the
    official code) or the CLS token instead of the best head;
  - ψ linear instead of the tanh MLP;
  - background cleaning off at evaluation (the demo world has a background class);
  - PAMR on at evaluation;
  - τ learnable instead of fixed at the paper's 0.07 (the demo's setting until 2026-12-07);
  - the backbone: its random init instead of the self-supervised one, and DINO + iBOT
    (DINOv2's masked-patch term, ``pretrain.ibot_loss_weight=1``) instead of DINO alone.
    Each such row runs the pipeline's stages for its backbone here: the pretraining (in
    this process, as the pretrain stage), the features (local engine), the curation of
    those features (align refuses a curation of other features), and its own dense
    forward at evaluation.
dinotxt (baseline: g = [CLS′ ; mean patch′], trained on the curated uids)
  - g = CLS′ only (``use_patch_tokens`` false);
  - trained on every train uid (no curation).

Every trained row is trained in this process with the align stage's own training loop
(:class:`dinoalign.train.loop.Trainer`, the job ``plan_align`` makes from params, no Ray,
no MLflow) for each seed (the seed of ψ / the text tower's init and of the batch order; the
frozen features are the same), then measured by ``evaluate_model`` on the test split
exactly as the evaluate stage measures it (seen and held-out compositions). Rows that only
change evaluation reuse their baseline's trained models.

For every row: mean and standard deviation over the seeds of zero-shot top-1 and mIoU (seen
and held-out), the difference to its baseline (paired by seed), in how many seeds it had
that sign and the exact two-sided paired sign-flip p over the seeds
(:func:`dinoalign.pretrain.probe.paired_permutation_p`; 3 seeds cannot go below 0.25, 10
seeds reach 0.002); beside it the direction the paper reports. A row's direction is
"higher"/"lower" only when every seed moved that way. Writes ``--out`` (JSON, default
docs/benchmarks/ablations.json, read by the report's Ablations section) and prints a table.
dinotxt is trained for ``--dinotxt-epochs`` (default 8, the demo trains 20): the seeds and
rows cost minutes each on 2 cores; the baseline row has the same schedule as its ablations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dinoalign.config import BackboneConfig, Params, load_params
from dinoalign.curate.tables import curate_train_split, write_outputs
from dinoalign.data.images import image_limits
from dinoalign.data.prepare import read_pairs
from dinoalign.embed.engine import run_embed
from dinoalign.pretrain.probe import paired_permutation_p
from dinoalign.pretrain.train import CHECKPOINT, demo_pool, pretrain
from dinoalign.evaluate.run import evaluate_model
from dinoalign.stages.embed import embed_job
from dinoalign.stages.evaluate import evaluation_inputs, load_aligned_model
from dinoalign.storage import under_root
from dinoalign.train.loop import Trainer, TrainJob
from dinoalign.train.plan import plan_align
from dinoalign.tracking import git_commit

REPO = Path(__file__).resolve().parents[1]
CURATED = "uids.parquet"
METRICS = (
    ("heldout", "zeroshot", "top1"),
    ("heldout", "segmentation", "miou"),
    ("seen", "zeroshot", "top1"),
    ("seen", "segmentation", "miou"),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of an ablation table: what it changes against its recipe's baseline."""

    recipe: str
    name: str
    model: tuple[tuple[str, Any], ...] = ()  # align.<recipe>.model entries changed
    align: tuple[str, ...] = ()  # other params overrides of training (e.g. align.use_curated=false)
    evaluate: tuple[str, ...] = ()  # params overrides of evaluation only: reuses the baseline's models
    # params overrides of the backbone (e.g. backbone.weights=null: the random init) and of a
    # pretraining of its own (pretrain.*): either gives the row its own features and curation
    backbone: tuple[str, ...] = ()
    pretrain: tuple[str, ...] = ()
    paper: str = ""  # the direction the paper's ablation reports against the baseline
    baseline: bool = False


ROWS = (
    Row("talk2dino", "best head, ψ MLP (the paper's)", baseline=True),
    # Talk2DINO's ablations are segmentation mIoU (its paper has no zero-shot classification)
    Row("talk2dino", "averaged attention instead of the best head",
        model=(("image_feature", "averaged_attention"),), paper="lower mIoU"),
    Row("talk2dino", "CLS token instead of the best head", model=(("image_feature", "cls"),), paper="lower mIoU"),
    Row("talk2dino", "ψ linear instead of the MLP", model=(("projection", "linear"),), paper="lower mIoU"),
    Row("talk2dino", "no background cleaning", evaluate=("evaluate.background_cleaning=false",),
        paper="lower mIoU (datasets with background)"),
    Row("talk2dino", "with PAMR", evaluate=("evaluate.segmentation.pamr=true",), paper="higher mIoU"),
    Row("talk2dino", "τ learnable instead of fixed at 0.07", model=(("learnable_temperature", True),),
        paper="none: the paper fixes τ (the demo learnt it until 2026-12-07)"),
    Row("talk2dino", "random-init backbone", backbone=("backbone.weights=null",),
        paper="none: every row of the paper uses DINOv2 (expected lower)"),
    Row("talk2dino", "DINO + iBOT backbone (DINOv2's patch term)", pretrain=("pretrain.ibot_loss_weight=1.0",),
        paper="none in Talk2DINO; DINOv2 adds iBOT for dense features (expected higher)"),
    Row("dinotxt", "[CLS′ ; mean patch′] on curated data (the paper's)", baseline=True),
    Row("dinotxt", "CLS′ only", model=(("use_patch_tokens", False),), paper="lower, mIoU most"),
    Row("dinotxt", "no curation (every train uid)", align=("align.use_curated=false",),
        paper="lower zero-shot"),
)


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO), help="the checkout where make demo ran")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", choices=("talk2dino", "dinotxt"), default=["talk2dino", "dinotxt"])
    p.add_argument("--dinotxt-epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "ablations.json"))
    p.add_argument("--summarise", metavar="JSON", default=None,
                   help="recompute the table of an earlier --out from its per-seed runs (the rows' labels "
                        "and paper directions as this file has them), write it back, train nothing")
    return p.parse_args(argv)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60]


def _own_backbone(row: Row) -> bool:
    return bool(row.backbone or row.pretrain)


def _backbone_overrides(row: Row, work: Path) -> list[str]:
    """The overrides that point a row with a backbone of its own at its pretraining,
    features and curation under ``work``."""
    if not _own_backbone(row):
        return []
    d = work / "backbones" / _slug(row.name)
    overrides = [*row.backbone, f"paths.features={d / 'features'}", f"paths.curated={d / 'curated'}"]
    if row.pretrain:
        overrides.append(f"backbone.weights={d / 'pretrain' / CHECKPOINT}")
    return overrides


def _params(root: Path, recipe: str, row: Row, extra: tuple[str, ...], work: Path) -> Params:
    base = load_params(root / "params.yaml")
    model = {**getattr(base.align, recipe).model, **dict(row.model)} if row.model else None
    overrides = [f"align.recipe={recipe}", "embed.engine=local", *row.align, *_backbone_overrides(row, work),
                 *extra]
    if model is not None:
        overrides.append(f"align.{recipe}.model={json.dumps(model)}")
    return load_params(root / "params.yaml", overrides)


def _prepare_backbone(root: Path, row: Row, work: Path) -> dict[str, float]:
    """The stages up to align for a row's own backbone, as ``dvc exp run -S ...`` would run
    them: pretrain (when the row changes it), embed (local engine), curate."""
    timings: dict[str, float] = {}
    params = _params(root, row.recipe, row, (), work)
    if row.pretrain:
        started = time.perf_counter()
        cfg = load_params(root / "params.yaml", list(row.pretrain)).pretrain
        b = params.backbone
        init = BackboneConfig(name=b.name, img_size=b.img_size, model_kwargs=b.model_kwargs)
        out = Path(params.backbone.weights).parent
        pretrain(init, cfg, demo_pool(params.data.synthetic, cfg.pool_size), out_dir=out)
        timings["pretrain_s"] = time.perf_counter() - started
    started = time.perf_counter()
    pairs = Path(under_root(params.paths.pairs, root))
    features = params.paths.features
    run_embed(embed_job(params, features, root), read_pairs(pairs))
    timings["embed_s"] = time.perf_counter() - started
    started = time.perf_counter()
    cfg = params.curate
    if isinstance(cfg.text_vocab, str):
        cfg = dataclasses.replace(cfg, text_vocab=under_root(cfg.text_vocab, root))
    curated = curate_train_split(cfg, pairs, features)
    write_outputs(Path(params.paths.curated), curated.table, curated.stats)
    timings["curate_s"] = time.perf_counter() - started
    return timings


def _train(params: Params, root: Path, seed: int, out: Path) -> dict[str, Any]:
    cfg, paths = params.align, params.paths
    curated = f"{under_root(paths.curated, root).rstrip('/')}/{CURATED}"
    plan = plan_align(
        cfg, params.seed, image_limits(params.data),
        features=under_root(paths.features, root), pairs_dir=under_root(paths.pairs, root),
        curated=curated if cfg.use_curated else None, checkpoints=str(out / "checkpoints"), root=root,
    )
    job = TrainJob(recipe=plan.recipe, model_config=plan.model_config, training=plan.training,
                   seed=seed, data=plan.data, torch_threads=torch.get_num_threads())
    started = time.perf_counter()
    trainer = Trainer(job, plan.data)
    trainer.run(lambda row: None, lambda t: None)
    trainer.model.save(str(out))
    return {"train_s": time.perf_counter() - started, "steps": trainer.step,
            "final_loss": trainer.curve[-1]["loss"], "train_uids": len(plan.selection.uids)}


def _evaluate(params: Params, root: Path, model_dir: Path, plots: Path) -> dict[str, float]:
    model = load_aligned_model(params, root, str(model_dir), device="cpu")
    inputs = dataclasses.replace(evaluation_inputs(params, root), plots=plots)
    metrics = evaluate_model(model, params.evaluate, inputs).metrics
    blocks = {"seen": metrics, "heldout": metrics["heldout"]}
    return {"/".join(path): float(blocks[path[0]][path[1]][path[2]]) for path in METRICS}


def _summarise(rows: list[Row], runs: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    baselines = {r.recipe: r.name for r in rows if r.baseline}
    table = []
    for row in rows:
        per_seed = runs[row.name]
        seeds = sorted(per_seed)
        entry: dict[str, Any] = {"recipe": row.recipe, "row": row.name, "baseline": row.baseline,
                                 "paper": row.paper, "seeds": seeds, "metrics": {}}
        base = runs[baselines[row.recipe]]
        for metric in ("/".join(p) for p in METRICS):
            values = [per_seed[s][metric] for s in seeds]
            m: dict[str, Any] = {"mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                 "values": values}
            if not row.baseline:
                diffs = [per_seed[s][metric] - base[s][metric] for s in seeds if s in base]
                m["diff_mean"] = statistics.fmean(diffs)
                m["diff_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                m["seeds_lower"] = sum(d < 0 for d in diffs)
                m["seeds_higher"] = sum(d > 0 for d in diffs)
                m["direction"] = _direction(diffs)
                # exact two-sided paired sign-flip test over the seeds (2^n sign vectors): with
                # n seeds it cannot go below 2 / 2^n (3 seeds: 0.25; 10 seeds: 0.002)
                m["p_value"] = paired_permutation_p(diffs, two_sided=True)
            entry["metrics"][metric] = m
        table.append(entry)
    return table


def _direction(diffs: list[float]) -> str:
    """'higher' / 'lower' when every seed moves that way, else 'mixed' (no claim)."""
    if all(d > 0 for d in diffs):
        return "higher"
    if all(d < 0 for d in diffs):
        return "lower"
    return "mixed"


def _print(table: list[dict[str, Any]]) -> None:
    heads = ["heldout/zeroshot/top1", "heldout/segmentation/miou", "seen/zeroshot/top1", "seen/segmentation/miou"]
    print(f"{'row':52s} " + " ".join(f"{h.replace('/segmentation', '').replace('/zeroshot', ''):>22s}" for h in heads)
          + "  paper")
    for e in table:
        cells = []
        for h in heads:
            m = e["metrics"][h]
            cell = f"{100 * m['mean']:5.1f}±{100 * m['std']:4.1f}"
            if not e["baseline"]:
                cell += f" ({100 * m['diff_mean']:+5.1f})"
            cells.append(f"{cell:>22s}")
        print(f"{e['recipe'][:4]} {e['row'][:47]:47s} " + " ".join(cells) + f"  {e['paper']}")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.summarise:
        return _resummarise(Path(args.summarise))
    root = Path(args.root).resolve()
    torch.set_num_threads(args.threads)
    rows = [r for r in ROWS if r.recipe in args.rows]
    runs: dict[str, dict[int, dict[str, float]]] = {r.name: {} for r in rows}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dinoalign-ablations-") as tmp:
        work = Path(tmp)
        for row in rows:
            if _own_backbone(row):
                for key, value in _prepare_backbone(root, row, work).items():
                    timings[f"{key[:-2]}/{row.name}_s"] = value
                print(f"{row.name}: its backbone's stages took "
                      f"{time.perf_counter() - started:.0f} s so far", flush=True)
        baselines = {r.recipe: r for r in rows if r.baseline}
        for seed in args.seeds:
            for row in rows:
                extra = (f"align.dinotxt.epochs={args.dinotxt_epochs}",) if row.recipe == "dinotxt" else ()
                trained_as = baselines[row.recipe] if row.evaluate else row
                model_dir = work / "models" / f"{trained_as.name}-{seed}".replace(" ", "_").replace("/", "_")
                if not (model_dir / "config.json").exists():
                    info = _train(_params(root, row.recipe, trained_as, extra, work), root, seed, model_dir)
                    timings[f"train/{trained_as.name}/{seed}"] = info["train_s"]
                t0 = time.perf_counter()
                params = _params(root, row.recipe, trained_as, extra + row.evaluate, work)
                runs[row.name][seed] = _evaluate(params, root, model_dir, work / "plots")
                timings[f"evaluate/{row.name}/{seed}"] = time.perf_counter() - t0
                done = runs[row.name][seed]
                print(f"seed {seed} {row.recipe} {row.name}: held-out zero-shot "
                      f"{done['heldout/zeroshot/top1']:.3f}, mIoU {done['heldout/segmentation/miou']:.3f}; "
                      f"seen {done['seen/zeroshot/top1']:.3f}, {done['seen/segmentation/miou']:.3f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = _summarise(rows, runs)
    params = load_params(root / "params.yaml")
    measured = {recipe: {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(REPO), "seeds": args.seeds,
                         **({"dinotxt_epochs": args.dinotxt_epochs} if recipe == "dinotxt" else {})}
                for recipe in args.rows}
    out = Path(args.out)
    table, runs, measured = _keep_other_recipes(out, args.rows, table, runs, measured)
    _print(table)
    result = {
        "benchmark": "ablations",
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(REPO),
        "measured": measured,
        "root_commit": git_commit(root),  # the checkout whose make demo outputs it read
        "seeds": args.seeds,
        "dinotxt_epochs": (measured.get("dinotxt") or {}).get("dinotxt_epochs"),
        "backbone": params.backbone.weights,
        "world": dataclasses.asdict(params.data.synthetic),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "wall_s": time.perf_counter() - started,
        "timings_s": timings,
        "table": table,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(f"ablations: {len(rows)} rows × {len(args.seeds)} seeds in {result['wall_s']:.0f} s -> {out}")
    return 0


def _keep_other_recipes(
    out: Path, recipes: list[str], table: list[dict[str, Any]], runs: dict[str, Any], measured: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """With ``--rows`` naming some recipes, the rows of the others stay as an earlier run at
    ``out`` measured them (with that run's date, commit and seeds under ``measured``)."""
    if not out.is_file():
        return table, runs, measured
    earlier = json.loads(out.read_text())
    kept = [r for r in earlier.get("table", []) if r.get("recipe") not in recipes]
    if not kept:
        return table, runs, measured
    names = {r["row"] for r in kept}
    before = earlier.get("measured") or {}
    for recipe in dict.fromkeys(r["recipe"] for r in kept):
        measured.setdefault(recipe, before.get(recipe) or {
            "date": earlier.get("date"), "commit": earlier.get("commit"), "seeds": earlier.get("seeds"),
            **({"dinotxt_epochs": earlier.get("dinotxt_epochs")} if recipe == "dinotxt" else {})})
    kept_runs = {name: {int(seed): m for seed, m in per_seed.items()}  # JSON keys the seeds as strings
                 for name, per_seed in earlier.get("runs", {}).items() if name in names}
    merged_runs = {**kept_runs, **runs}
    known = {r.name for r in ROWS}
    if all(name in merged_runs for name in names & known) and names <= known:
        # summarised again as this file summarises (e.g. the p values of an older run)
        rows = [r for r in ROWS if r.name in merged_runs]
        return _summarise(rows, merged_runs), merged_runs, measured
    order = [r.recipe for r in ROWS]
    merged = sorted(table + kept, key=lambda r: order.index(r["recipe"]) if r["recipe"] in order else len(order))
    return merged, merged_runs, measured


def _resummarise(path: Path) -> int:
    """Rebuild ``table`` of the results at ``path`` from its ``runs`` (JSON keys the seeds)."""
    result = json.loads(path.read_text())
    runs = {name: {int(seed): m for seed, m in per_seed.items()} for name, per_seed in result["runs"].items()}
    rows = [r for r in ROWS if r.name in runs]
    result["table"] = _summarise(rows, runs)
    result["summarised"] = time.strftime("%Y-%m-%d")
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    _print(result["table"])
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

"""The report stage: one self-contained HTML page comparing the recipes side by side.

``<paths.report>/index.html`` renders offline: CSS inline, pictures as ``data:``
URIs, charts as inline SVG, no script and no external resource. It shows, from the
files the other stages wrote:

- the backbone's DINO self-supervised pretraining (demo profile; ``<paths.pretrained>/``
  ``metrics.json`` and ``curve.csv`` of the pretrain stage): the loss and the teacher's
  entropy against log K (the collapse monitor), CLS attention mass inside the object and
  k-NN top-1, pretrained vs its random init, and a reading of them; a real profile's
  skipped stage as the weights it uses instead;
- the metrics of every recipe (``metrics/<recipe>.details.json``) with chance next to each
  number, seen and held-out compositions apart, the projector as % of its CLIP;
- the zero-shot confusion of each recipe (``plots/<recipe>/zeroshot_predictions.csv``,
  which ``dvc plots show`` draws only online);
- training curves: loss with the learning rate and the in-batch accuracy where logged
  (``<paths.curves>/<recipe>/curve.csv``), the teacher's curve;
- segmentation overlays (a colour-named class in its colour), per-class IoU and confusion
  pictures (``plots/<recipe>/``);
- data counts per split and stage, rejects by reason, curation counts (the pairs
  ``summary.json``, the features ``manifest.json``, ``<paths.curated>/stats.json``);
- the model registry: each recipe's versions with their ``@candidate``/``@champion``;
- versions: git commit, the DVC hashes of ``dvc.lock``, model weights, frozen towers;
- links to the MLflow runs: the align and evaluate runs behind the numbers shown, and
  the latest run of each upstream stage.

Charts are matplotlib SVGs inlined as ``data:`` images, with axes, ticks, legends and
colour scales. Missing inputs (a stage not run yet) are shown as missing, never invented.
What the page is made of and where it lies is one :class:`ReportInputs`, which the report
stage (:mod:`dinoalign.stages.report`) builds from the params.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dinoalign.config import RANDOM_INIT, BackboneConfig, ClipConfig, PathsConfig, describe_backbone
from dinoalign.evaluate.headline import details_path
from dinoalign.pretrain.config import DESCRIPTION as DEMO_BACKBONE
from dinoalign.storage import under_root, write_atomic

REPORT_FILE = "index.html"
MISSING = "—"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:26px;margin:8px 0 2px}h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #dde1e6;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b6570;margin:0 0 12px}
.warn{background:#fff4d6;border:1px solid #f0d68a;padding:8px 12px;border-radius:6px;margin:12px 0}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
th,td{padding:5px 10px;border-bottom:1px solid #e8ebef;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{font-weight:700}.chance{color:#8a949e;font-size:12px;font-weight:400}
.grid{display:flex;flex-wrap:wrap;gap:14px}.card{background:#fff;padding:10px 12px;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card h3{margin-top:0}img{image-rendering:pixelated;max-width:100%}
figure{display:inline-block;vertical-align:top;margin:4px 10px 8px 0}figcaption{font-size:11px;color:#5b6570;max-width:200px}
figure img[width]{border:1px solid #ccd3da}
.bar{display:inline-block;height:9px;background:#4c78a8;border-radius:2px;vertical-align:middle;margin-right:6px}
code{background:#eef1f5;padding:1px 4px;border-radius:3px;font-size:12px}small{color:#5b6570}
a{color:#1f5fa8}
nav.toc{background:#fff;padding:8px 14px;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08);margin:12px 0}
nav.toc ol{margin:4px 0;padding-left:22px;columns:2}img.chart{image-rendering:auto;display:block}
"""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class ReportInputs:
    """Everything the page shows and where to find it: the recipes it compares, what its
    header and versions name, the locations the other stages wrote (``paths``, relative to
    the checkout ``root``) and the MLflow store that holds their runs and models."""

    recipes: tuple[str, ...]  # evaluate.recipes
    dataset: str  # evaluate.dataset
    profile: str
    backbone: BackboneConfig
    clip: ClipConfig
    paths: PathsConfig
    root: Path
    tracking_uri: str  # tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded store
    experiment: str  # tracking.experiment
    mlflow_ui: str  # evaluate.mlflow_ui: the UI of an embedded store (make mlflow-ui)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, None when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_curve(path: Path) -> list[dict[str, float]]:
    """Rows of a training-curve CSV with numeric columns (empty when missing)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def dvc_lock_outputs(root: Path) -> list[tuple[str, str, str]]:
    """(stage, output path, md5) of every output recorded in ``dvc.lock``."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return [
        (stage, out["path"], out.get("md5", out.get("etag", "")))
        for stage, entry in stages.items()
        for out in entry.get("outs", [])
    ]


UPSTREAM_STAGES = ("prepare", "teacher", "embed", "curate")


def mlflow_runs(
    tracking_uri: str, experiment_name: str, shown: Mapping[str, str]
) -> tuple[list[dict[str, Any]], str | None]:
    """(runs, None) or ([], why not): the runs of ``shown`` (label -> run id: the align
    and evaluate runs whose outputs the page shows) and the latest run of each upstream
    stage in the experiment ``experiment_name`` of the store at ``tracking_uri``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return [], f"no MLflow experiment {experiment_name!r} yet"
        runs = []
        for stage in UPSTREAM_STAGES:
            found = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`dinoalign.stage` = '{stage}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            runs += [(f"{stage} (latest)", run) for run in found]
        for label, run_id in shown.items():
            try:
                runs.append((label, client.get_run(run_id)))
            except MlflowException:
                runs.append((label, None))
    except (MlflowException, OSError) as e:
        return [], f"MLflow unreachable: {e}"
    return [_run_row(label, run, shown.get(label)) for label, run in runs], None


def registry_versions(
    tracking_uri: str, experiment: str, recipes: Sequence[str], per_model: int = 5
) -> tuple[list[dict[str, Any]], str | None]:
    """(rows, None) or ([], why not): the latest ``per_model`` versions of each recipe's
    registered model in the store at ``tracking_uri``, newest first, with their aliases
    (``@candidate``, ``@champion``)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dinoalign.tracking import registered_model_name

    rows = []
    try:
        client = MlflowClient(tracking_uri)
        for recipe in recipes:
            name = registered_model_name(recipe, experiment)
            found = client.search_model_versions(f"name = '{name}'")
            found = sorted(found, key=lambda v: int(v.version), reverse=True)[:per_model]
            if not found:
                rows.append({"model": name, "version": None})
                continue
            # a searched version does not carry its aliases: the registered model does
            aliases = client.get_registered_model(name).aliases
            rows += [{"model": name, "version": str(v.version),
                      "aliases": sorted(a for a, version in aliases.items() if str(version) == str(v.version)),
                      "run_id": v.run_id, "created": datetime.datetime.fromtimestamp(
                          v.creation_timestamp / 1000, datetime.timezone.utc)} for v in found]
    except (MlflowException, OSError) as e:
        return [], f"MLflow unreachable: {e}"
    return rows, None


def _run_row(label: str, run: Any, run_id: str | None) -> dict[str, Any]:
    if run is None:
        return {
            "name": label,
            "run_id": run_id,
            "experiment_id": None,
            "status": "not in this store",
        }
    return {
        "name": label,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start": datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.timezone.utc),
    }


def run_link(tracking_uri: str, mlflow_ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI address of a run: the tracking server's when ``tracking_uri`` is one,
    otherwise ``mlflow_ui`` (``evaluate.mlflow_ui``: ``make mlflow-ui`` serves the
    embedded store there)."""
    from dinoalign.tracking import without_credentials

    base = without_credentials(tracking_uri) if tracking_uri.startswith("http") else mlflow_ui
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# ----------------------------------------------------------------------------- html bits


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def pct(value: Any) -> str:
    """A rate in [0, 1] as a percentage with one decimal; missing/NaN -> the dash."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return MISSING
    return f"{100 * value:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], raw: bool = False) -> str:
    """An HTML table of text cells (escaped), or with ``raw`` of ready ``<td>`` elements."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(c if raw else f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_img(data: bytes, alt: str, width: int | None = None, cls: str | None = None) -> str:
    """A PNG as an ``<img>`` with a ``data:`` URI; ``cls="chart"`` scales it smoothly
    (other pictures stay pixelated: the demo's images are 112 px)."""
    size = f' width="{width}"' if width else ""
    size += f' class="{cls}"' if cls else ""
    return f'<img alt="{esc(alt)}"{size} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def chart_img(svg: bytes, alt: str) -> str:
    """An SVG chart as an ``<img>`` with a ``data:`` URI (its own document: the ids of
    several charts cannot clash)."""
    return f'<img class="chart" alt="{esc(alt)}" src="data:image/svg+xml;base64,{base64.b64encode(svg).decode()}">'


def heading(title: str) -> str:
    """A section heading with an id (``Training curves`` -> ``training-curves``): the
    table of contents links to it."""
    return f'<h2 id="{re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")}">{esc(title)}</h2>'


def table_of_contents(body: str) -> str:
    """Links to every :func:`heading` in ``body``, in order."""
    items = "".join(f'<li><a href="#{i}">{t}</a></li>' for i, t in re.findall(r'<h2 id="([^"]+)">(.*?)</h2>', body))
    return f'<nav class="toc"><b>Contents</b><ol>{items}</ol></nav>'


# ----------------------------------------------------------------------------- sections


def _get(block: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(block, Mapping) or key not in block:
            return None
        block = block[key]
    return block


def metric_rows(
    blocks: Mapping[str, Mapping[str, Any]],
) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(label, value path, chance path) of every metric present in any recipe's block."""
    rows: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
        ("zero-shot top-1", ("zeroshot", "top1"), ("zeroshot", "chance_top1")),
        ("zero-shot top-5", ("zeroshot", "top5"), ("zeroshot", "chance_top5")),
        (
            "zero-shot mean per-class recall",
            ("zeroshot", "mean_per_class_recall"),
            ("zeroshot", "chance_top1"),
        ),
    ]
    ks = sorted(
        {
            int(k[1:])
            for b in blocks.values()
            for k in (_get(b, ("retrieval", "i2t")) or {})
            if k[1:].isdigit() and k[0] == "r"
        }
    )
    for direction, label in (("i2t", "image→text"), ("t2i", "text→image")):
        rows += [
            (
                f"{label} R@{k}",
                ("retrieval", direction, f"r{k}"),
                ("retrieval", direction, f"chance_r{k}"),
            )
            for k in ks
        ]
    rows.append(("segmentation mIoU", ("segmentation", "miou"), ("segmentation", "chance_miou")))
    return [r for r in rows if any(_get(b, r[1]) is not None for b in blocks.values())]


def results_table(blocks: Mapping[str, Mapping[str, Any]]) -> str:
    """Recipes side by side: each cell the value (%) with its chance level under it; the
    best recipe of a row in bold."""
    rows = []
    for label, path, chance_path in metric_rows(blocks):
        values = {r: _get(b, path) for r, b in blocks.items()}
        finite = [v for v in values.values() if isinstance(v, (int, float)) and math.isfinite(v)]
        best = max(finite) if len(finite) > 1 else None
        cells = [f"<td>{esc(label)}</td>"]
        for recipe, block in blocks.items():
            value = values[recipe]
            if value is None:
                reason = _skip_reason(block, path[0])
                cells.append(
                    f'<td class="num" title="{esc(reason)}">{MISSING} <span class="chance">{esc(reason)}</span></td>'
                )
                continue
            cls = "num best" if best is not None and value == best else "num"
            cells.append(
                f'<td class="{cls}">{pct(value)} <span class="chance">chance {pct(_get(block, chance_path))}</span></td>'
            )
        rows.append(cells)
    return table(["metric (%)", *blocks], rows, raw=True)


def _skip_reason(block: Mapping[str, Any], task: str) -> str:
    skipped = _get(block, (task, "skipped"))
    return str(skipped) if skipped else "not measured"


def clip_reference_table(block: Mapping[str, Any], recipe: str) -> str:
    """The recalls and zero-shot accuracy of ``recipe``, the teacher CLIP's own on the same
    images, and their ratio; empty unless its evaluation has a CLIP reference (the
    projector's)."""
    ret = block.get("retrieval", {})
    if "percent_of_clip" not in ret:
        return ""
    rows = []
    zs = block.get("zeroshot", {})
    for key, label in (("top1", "zero-shot top-1"), ("top5", "zero-shot top-5")):
        if key in zs.get("percent_of_clip", {}):
            ratio = zs["percent_of_clip"][key]
            rows.append(
                [
                    f"<td>{label}</td>",
                    f'<td class="num">{pct(zs[key])}</td>',
                    f'<td class="num">{pct(zs["clip"][key])}</td>',
                    f'<td class="num">{MISSING if ratio is None else f"{ratio:.1f}"}</td>',
                ]
            )
    for direction, label in (("i2t", "image→text"), ("t2i", "text→image")):
        for key in sorted(ret["percent_of_clip"][direction], key=lambda k: int(k[1:])):
            ratio = ret["percent_of_clip"][direction][key]
            rows.append(
                [
                    f"<td>{label} R@{key[1:]}</td>",
                    f'<td class="num">{pct(ret[direction][key])}</td>',
                    f'<td class="num">{pct(ret["clip"][direction][key])}</td>',
                    f'<td class="num">{MISSING if ratio is None else f"{ratio:.1f}"}</td>',
                ]
            )
    return table(
        ["metric", f"{recipe} (%)", "teacher CLIP (%)", f"{recipe} / CLIP (%)"], rows, raw=True
    )


def _section_results(metrics: Mapping[str, Mapping[str, Any]], missing: Sequence[str]) -> str:
    out = [heading("Results")]
    if missing:
        out.append(
            f'<p class="warn">no metrics for {esc(", ".join(missing))}: run <code>dvc repro</code> (evaluate@…)</p>'
        )
    if not metrics:
        return "".join(out)
    first = next(iter(metrics.values()))
    info = first.get("info", {})
    if "heldout" in first:
        subsets = info.get("subsets", {})
        out.append(
            f"<h3>Seen compositions <small>({esc(subsets.get('seen', '?'))} test images)</small></h3>"
        )
        out.append(results_table(metrics))
        heldout = ", ".join(info.get("heldout_compositions", []))
        out.append(
            f"<h3>Held-out compositions <small>({esc(subsets.get('heldout', '?'))} test images with "
            f"a composition never seen in training: {esc(heldout)})</small></h3>"
        )
        out.append(results_table({r: m.get("heldout", {}) for r, m in metrics.items()}))
    else:
        out.append(f"<h3>{esc(info.get('dataset', ''))}</h3>" + results_table(metrics))
    for recipe, recipe_metrics in metrics.items():  # those with a CLIP reference render
        for title, block in (
            ("seen", recipe_metrics),
            ("held-out", recipe_metrics.get("heldout", {})),
        ):
            rendered = clip_reference_table(block, recipe)
            if rendered:
                out.append(
                    f"<h3>{esc(recipe.capitalize())} vs its teacher CLIP ({title})</h3>{rendered}"
                )
    return "".join(out)


def curve_charts(curve: Sequence[Mapping[str, float]], title: str) -> str:
    """The charts of one training curve: loss with the learning rate against the step,
    and the in-batch accuracies where the curve logs them (``*accuracy`` columns)."""
    from dinoalign.evaluate.visualize import curve_chart  # matplotlib: loaded for charts only

    rows = [r for r in curve if "step" in r and "loss" in r]
    if not rows:
        return "<p><small>no loss values</small></p>"
    steps = [r["step"] for r in rows]
    rate = {"learning rate": [r.get("lr", math.nan) for r in rows]} if all("lr" in r for r in rows) else None
    charts = [chart_img(curve_chart(steps, {"loss": [r["loss"] for r in rows]}, rate, title=title),
                        f"{title}: loss and learning rate by step")]
    accuracies = sorted(k for k in rows[0] if k.endswith("accuracy"))
    if accuracies:
        series = {k.replace("_", " "): [r.get(k, math.nan) for r in rows] for k in accuracies}
        charts.append(chart_img(curve_chart(steps, series, left_label="in-batch accuracy", title=title),
                                f"{title}: in-batch accuracy by step"))
    return "".join(charts)


def zeroshot_confusion(path: Path) -> tuple[str, list[str], np.ndarray] | None:
    """(subset, class names, counts rows actual × columns predicted) of the first subset
    (``seen`` on the demo) of a ``zeroshot_predictions.csv``; None when there is none."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    subset = rows[0]["subset"]
    rows = [r for r in rows if r["subset"] == subset]
    names = sorted({r["actual"] for r in rows} | {r["predicted"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    for r in rows:
        counts[index[r["actual"]], index[r["predicted"]]] += 1
    return subset, names, counts


PRETRAIN_TITLE = "Backbone: DINO self-supervised pretraining"
SIGNIFICANCE = 0.05  # the level at which the reading calls a paired permutation p significant


def _number(value: Any, fmt: str) -> str:
    """``value`` formatted with ``fmt``; missing/non-numeric/NaN -> the dash."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return MISSING
    return format(value, fmt)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pretrain_chart(curve: Sequence[Mapping[str, float]], log_k: float | None) -> str:
    """The pretraining curve as a chart: the DINO loss and the teacher's entropy per epoch
    (nats, from 0) with log K dotted, the entropy of a teacher collapsed to uniform (a
    teacher collapsed to one prototype goes to 0)."""
    from dinoalign.evaluate.visualize import curve_chart  # matplotlib: loaded for charts only

    rows = [r for r in curve if "epoch" in r and "loss" in r and "teacher_entropy" in r]
    if not rows:
        return "<p><small>no loss values in curve.csv</small></p>"
    epochs = [r["epoch"] + 1 for r in rows]  # 0-based in the file: epochs done
    series = {"DINO loss": [r["loss"] for r in rows], "teacher entropy": [r["teacher_entropy"] for r in rows]}
    references = {"log K (collapse to uniform)": log_k} if _is_number(log_k) else None
    svg = curve_chart(epochs, series, x_label="epoch", left_label="nats", title="pretrain (DINO)",
                      references=references, left_min=0.0, legend_loc="best")
    return chart_img(svg, "pretrain: loss and teacher entropy by epoch")


def attention_table(attention: Mapping[str, Any]) -> str:
    """CLS attention mass inside the object (%): the val-selected head and the mean of
    heads, pretrained vs random init vs the object's area share, with the paired tests."""
    rows = []
    for key, label in (("selected_head", "val-selected head"), ("mean_of_heads", "mean of heads")):
        block = attention.get(key) or {}
        if key == "selected_head":
            heads = [_get(attention, (name, "selected_head")) for name in ("pretrained", "random_init")]
            if all(isinstance(h, int) for h in heads):
                label += f" (heads {heads[0]} / {heads[1]})"
        wins, n, diff = block.get("wins"), block.get("n"), block.get("difference")
        rows.append([
            f"<td>{esc(label)}</td>",
            f'<td class="num">{pct(block.get("pretrained"))}</td>',
            f'<td class="num">{pct(block.get("random_init"))}</td>',
            f'<td class="num">{pct(attention.get("area_share"))}</td>',
            f'<td class="num">{_number(100 * diff if _is_number(diff) else None, "+.1f")}</td>',
            f'<td class="num">{esc(f"{wins}/{n}" if wins is not None and n else MISSING)}</td>',
            f'<td class="num">{_number(block.get("permutation_p"), ".2g")}</td>',
            f'<td class="num">{_number(block.get("sign_test_p"), ".2g")}</td>',
        ])
    return table(["attention inside the object (%)", "pretrained", "random init", "area share (uniform)",
                  "difference (points)", "pretrained ahead on", "permutation p", "sign test p"], rows, raw=True)


KNN_ATTRIBUTES = (("class", "class (composition)"), ("colour", "colour"), ("background", "background"))


def knn_table(knn: Mapping[str, Any]) -> str:
    """k-NN top-1 (%) on CLS features by attribute: pretrained vs random init vs the
    majority share (and the chance of a uniform guess); the better backbone in bold."""
    rows = []
    for key, label in KNN_ATTRIBUTES:
        block = knn.get(key)
        if not isinstance(block, Mapping):
            continue
        values = [block.get("pretrained"), block.get("random_init")]
        best = max(values) if all(_is_number(v) for v in values) and values[0] != values[1] else None
        rows.append([f"<td>{esc(label)}</td>"]
                    + [f'<td class="{"num best" if v == best else "num"}">{pct(v)}</td>' for v in values]
                    + [f'<td class="num">{pct(block.get("majority"))}</td>',
                       f'<td class="num">{pct(block.get("chance"))}</td>'])
    return table(["k-NN top-1 (%)", "pretrained", "random init", "majority", "chance"], rows, raw=True)


def pretrain_reading(probe: Mapping[str, Any]) -> str:
    """One sentence read off the probe numbers (never written by hand): whether the
    pretrained backbone's attention in the object is significantly above its random init's
    (paired permutation p < :data:`SIGNIFICANCE`) for the val-selected head and the mean of
    heads, how it stands to the area share, and k-NN by class against random init and the
    majority share."""
    attention, knn = probe.get("attention") or {}, probe.get("knn") or {}
    area = attention.get("area_share")
    clauses = []
    for key, label in (("selected_head", "val-selected head"), ("mean_of_heads", "mean of heads")):
        block = attention.get(key) or {}
        a, b, p = block.get("pretrained"), block.get("random_init"), block.get("permutation_p")
        if not (_is_number(a) and _is_number(b) and _is_number(p)):
            continue
        if p < SIGNIFICANCE and a > b:
            verdict = f"significantly above the random init's {pct(b)} %"
        elif a > b:
            verdict = f"above the random init's {pct(b)} % but not significantly"
        else:
            verdict = f"not above the random init's {pct(b)} %"
        where = ""
        if _is_number(area):
            where = f", {'above' if a > area else 'not above'} the area share {pct(area)} %"
        diff = block.get("difference")
        diff = 100 * (diff if _is_number(diff) else a - b)
        clauses.append(f"its {label} puts {pct(a)} % of the CLS attention inside the object, {verdict} "
                       f"({diff:+.1f} points, paired permutation p = {p:.2g}"
                       f"{' < ' if p < SIGNIFICANCE else ' ≥ '}{SIGNIFICANCE:g}){where}")
    cls = knn.get("class") or {}
    if all(_is_number(cls.get(k)) for k in ("pretrained", "random_init", "majority")):
        a, b, m = cls["pretrained"], cls["random_init"], cls["majority"]
        relation = "above" if a > b else ("equal to" if a == b else "below")
        clauses.append(f"k-NN top-1 by class is {pct(a)} %, {relation} the random init's {pct(b)} % "
                       f"(majority {pct(m)} %)")
    if not clauses:
        return ""
    images = attention.get("images")
    where = f"On {images} held-out test images, the" if isinstance(images, int) else "The"
    sentence = f"{where} pretrained backbone: " + "; ".join(clauses) + "."
    return f"<p><b>Reading.</b> {esc(sentence)}</p>"


def _section_pretrain(inputs: ReportInputs) -> str:
    """The backbone's DINO pretraining (the pretrain stage's ``metrics.json`` and
    ``curve.csv`` under ``paths.pretrained``): its curve, the probes and a reading; one
    line when the stage was skipped (the weights used instead) or has not run."""
    paths, root = inputs.paths, inputs.root
    folder = _at(paths.pretrained, root)
    out = [heading(PRETRAIN_TITLE)]
    metrics = read_json(folder / "metrics.json")
    if metrics is None:
        return "".join(out) + (
            f"<p><small>the pretrain stage has not run (no {esc(paths.pretrained)}/metrics.json): "
            "<code>dvc repro pretrain</code></small></p>"
        )
    backbone = inputs.backbone
    if metrics.get("skipped"):
        description = describe_backbone(backbone, root)
        weights = f" ({backbone.weights})" if backbone.weights and backbone.weights not in description else ""
        return "".join(out) + (
            f"<p>Not pretrained here (pretrain.enabled=false): the backbone <code>"
            f"{esc(metrics.get('backbone') or backbone.name)}</code> uses {esc(description)}{esc(weights)} "
            "instead.</p>"
        )
    final, seconds = metrics.get("final") or {}, metrics.get("seconds") or {}
    pool, probe = metrics.get("pool") or {}, metrics.get("probe") or {}
    description = _get(metrics, ("backbone", "description")) or MISSING
    out.append(
        f'<p class="sub"><b>{esc(description)}</b>: <code>{esc(_get(metrics, ("backbone", "name")) or backbone.name)}'
        f"</code> DINO-pretrained (student and EMA teacher, multi-crop) on {esc(pool.get('images', MISSING))} "
        f"unlabelled {esc(pool.get('split', 'train'))} images of the demo world, {esc(metrics.get('epochs', MISSING))} "
        f"epochs ({esc(metrics.get('steps', MISSING))} steps) in {_number(seconds.get('pretrain'), '.0f')} s "
        f"(probes {_number(seconds.get('probe'), '.0f')} s, stage {_number(seconds.get('total'), '.0f')} s) "
        f"→ <code>{esc(paths.pretrained)}/{esc(metrics.get('checkpoint', 'model.safetensors'))}</code></p>"
    )
    curve = read_curve(folder / "curve.csv")
    chart = pretrain_chart(curve, final.get("log_k")) if curve else "<p><small>no curve.csv yet</small></p>"
    collapse = (
        f"<p><small>final loss {_number(final.get('loss'), '.3f')}, teacher entropy "
        f"{_number(final.get('teacher_entropy'), '.3f')} = {_number(final.get('teacher_entropy_over_log_k'), '.2f')} "
        f"of log K = {_number(final.get('log_k'), '.2f')} (1: collapsed to uniform, 0: to one prototype), "
        f"centre norm {_number(final.get('center_norm'), '.3g')}, {_number(final.get('crops_per_s'), '.0f')} "
        "crops/s</small></p>"
    )
    out.append(f'<div class="grid"><div class="card" style="max-width:480px"><h3>training curve (the collapse '
               f"monitor)</h3>{chart}{collapse}</div>")
    attention, knn = probe.get("attention"), probe.get("knn")
    if isinstance(attention, Mapping):
        selection = attention.get("head_selection") or {}
        out.append(
            f'<div class="card"><h3>CLS attention inside the object <small>(last block, '
            f"{esc(attention.get('images', MISSING))} held-out {esc(attention.get('split', 'test'))} images; "
            f"heads chosen on {esc(selection.get('images', MISSING))} {esc(selection.get('split', 'val'))} "
            f"images)</small></h3>{attention_table(attention)}</div>"
        )
    if isinstance(knn, Mapping):
        refs, queries = knn.get("references") or {}, knn.get("queries") or {}
        out.append(
            f'<div class="card"><h3>k-NN top-1 on CLS features <small>(k {esc(knn.get("k", MISSING))}, '
            f"T {esc(knn.get('temperature', MISSING))}; {esc(refs.get('images', MISSING))} "
            f"{esc(refs.get('split', 'val'))} references, {esc(queries.get('images', MISSING))} "
            f"{esc(queries.get('split', 'test'))} queries of {esc(queries.get('compositions', 'seen'))} "
            f"compositions)</small></h3>{knn_table(knn)}</div>"
        )
    out.append("</div>")
    if not isinstance(attention, Mapping) and not isinstance(knn, Mapping):
        out.append("<p><small>no probes in metrics.json</small></p>")
    out.append(pretrain_reading(probe))
    return "".join(out)


ABLATIONS_TITLE = "The papers' ablations, in miniature"
ABLATIONS_FILE = "docs/benchmarks/ablations.json"  # benchmarks/ablations.py writes it (an hour on 2 cores)
ABLATION_METRICS = (
    ("heldout/zeroshot/top1", "held-out zero-shot top-1"),
    ("heldout/segmentation/miou", "held-out mIoU"),
    ("seen/zeroshot/top1", "seen zero-shot top-1"),
    ("seen/segmentation/miou", "seen mIoU"),
)


def ablation_verdict(row: Mapping[str, Any]) -> str:
    """Ours against the paper's direction on the held-out metrics the paper's words name
    ("mIoU", "zero-shot", else both): 'agrees', 'differs' (every seed the other way) or
    'unclear' (the seeds disagree); '' when the paper gives no direction."""
    paper = str(row.get("paper") or "")
    expected = "lower" if paper.startswith("lower") else "higher" if paper.startswith("higher") else None
    if expected is None:
        return ""
    held_out = [k for k, _ in ABLATION_METRICS if k.startswith("heldout/")]
    named = [k for k in held_out if ("mIoU" in paper and "miou" in k) or ("zero-shot" in paper and "zeroshot" in k)]
    keys = named or held_out
    found = [_get(row, ("metrics", k, "direction")) for k in keys]
    if all(d == expected for d in found):
        return "agrees"
    if any(d not in (expected, "mixed") for d in found):
        return "differs"
    return "unclear"


def _ablation_cell(m: Mapping[str, Any] | None, baseline: bool) -> str:
    if not isinstance(m, Mapping) or not _is_number(m.get("mean")):
        return f'<td class="num">{MISSING}</td>'
    text = f"{pct(m['mean'])} ± {pct(m.get('std'))}"
    if not baseline and _is_number(m.get("diff_mean")):
        n = len(m.get("values") or [])
        moved = m.get("seeds_higher", 0) if m["diff_mean"] > 0 else m.get("seeds_lower", 0)
        p = f", p {m['p_value']:.2g}" if _is_number(m.get("p_value")) else ""
        text += f" ({100 * m['diff_mean']:+.1f}, {moved}/{n}{p})"
    return f'<td class="num">{esc(text)}</td>'


def _section_ablations(root: Path) -> str:
    """The ablation tables of Talk2DINO and dino.txt on the demo world, from
    :data:`ABLATIONS_FILE` (benchmarks/ablations.py; not rerun by ``dvc repro``): per row
    mean ± std over seeds, the difference to the baseline row and in how many seeds it had
    that sign, the paper's direction and whether ours agrees."""
    path = root / ABLATIONS_FILE
    data = read_json(path)
    out = [heading(ABLATIONS_TITLE)]
    if not data or not isinstance(data.get("table"), list):
        out.append(f"<p><small>not measured in this checkout (no {esc(ABLATIONS_FILE)}): "
                   "<code>python benchmarks/ablations.py</code> after <code>make demo</code></small></p>")
        return "".join(out)
    seeds = data.get("seeds") or []
    measured = data.get("measured")
    runs = (  # recipes re-run on their own name their seeds under their heading
        "seeds, date and commit per recipe below" if isinstance(measured, Mapping) and len(measured) > 1
        else f"{len(seeds)} seeds each ({esc(', '.join(map(str, seeds)))}); dinotxt "
             f"{esc(data.get('dinotxt_epochs', MISSING))} epochs")
    out.append(
        f"<p>One factor changed per row against the recipe's baseline (the paper's choice), trained and "
        f"evaluated as the pipeline does, {runs}. Cells: mean ± std over seeds (%), in "
        "brackets the difference to the baseline (points), the seeds that moved that way and the exact "
        "two-sided paired sign-flip p over the seeds (3 seeds cannot go below 0.25). Measured by "
        f"<code>benchmarks/ablations.py</code> on {esc(data.get('date', MISSING))} at commit "
        f"<code>{esc(str(data.get('commit') or MISSING)[:10])}</code> ({esc(ABLATIONS_FILE)}); "
        "<code>dvc repro</code> does not rerun it.</p>"
    )
    differs = []
    for recipe in dict.fromkeys(str(r.get("recipe")) for r in data["table"]):
        rows = []
        for row in (r for r in data["table"] if r.get("recipe") == recipe):
            verdict = ablation_verdict(row)
            if verdict == "differs":
                differs.append(f"{recipe}: {row.get('row')}")
            label = f"{row.get('row')}{' (baseline)' if row.get('baseline') else ''}"
            cells = [f"<td>{esc(label)}</td>"]
            cells += [_ablation_cell(_get(row, ("metrics", k)), bool(row.get("baseline"))) for k, _ in ABLATION_METRICS]
            cells += [f"<td>{esc(row.get('paper') or '')}</td>", f"<td>{esc(verdict)}</td>"]
            rows.append(cells)
        out.append(f"<h3>{esc(recipe)}</h3>")
        when = (data.get("measured") or {}).get(recipe)
        if isinstance(when, Mapping):  # a recipe re-run alone keeps its own provenance
            epochs = f", {esc(when['dinotxt_epochs'])} epochs" if when.get("dinotxt_epochs") else ""
            out.append(f"<p><small>measured on {esc(when.get('date') or MISSING)} at commit "
                       f"<code>{esc(str(when.get('commit') or MISSING)[:10])}</code>, seeds "
                       f"{esc(', '.join(map(str, when.get('seeds') or [])))}{epochs}</small></p>")
        out.append(table([recipe, *(label for _, label in ABLATION_METRICS), "paper", "ours vs paper"], rows, raw=True))
    sentence = (
        "Where ours differs from the paper's direction (every seed the other way): " + "; ".join(differs) + "."
        if differs else "No row moves against the paper's direction in every seed."
    )
    out.append(f"<p><b>Reading.</b> {esc(sentence)} 'unclear': the seeds disagree; the demo world "
               "is not the papers' data, and nothing here was tuned to agree.</p>")
    return "".join(out)


DENSE_LIMITS_TITLE = "What limits the dense half"
DENSE_LIMITS_FILE = "docs/benchmarks/dense_limits.json"  # benchmarks/dense_limits.py writes it (4 min on 2 cores)
DENSE_LIMITS_VARIANTS = "dense_limits_*.json"  # beside it: the same script on other backbones or worlds
DENSE_LIMITS_ROWS = (
    ("patch grid: each patch scored by its true class shares (no model can do better at this resolution)",
     "patch_grid"),
    ("supervised linear head on the patch tokens, background + every composition, pretrained backbone",
     "probe_composition.pretrained"),
    ("the same, its random init", "probe_composition.random_init"),
    ("supervised linear heads, colour × shape (can name held-out compositions), pretrained",
     "probe_colour_x_shape.pretrained"),
    ("the same, its random init", "probe_colour_x_shape.random_init"),
)


def _read_measurement(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A benchmark's JSON with a ``metrics`` object, or None and why not ('' when the file
    is simply absent): a broken file is named on the page, not a crash of the report."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc}); re-run the benchmark that writes it"
    if data is None:
        return None, ""
    if not isinstance(data, Mapping) or not isinstance(data.get("metrics"), Mapping):
        return None, f"{path.name} has no metrics object; re-run the benchmark that writes it"
    return dict(data), ""


def _section_dense_limits(root: Path, metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Upper bounds on the demo's segmentation mIoU from :data:`DENSE_LIMITS_FILE`
    (benchmarks/dense_limits.py; not rerun by ``dvc repro``) beside this run's dense recipes,
    the held-out bound of every other backbone measured (:data:`DENSE_LIMITS_VARIANTS`),
    and a reading from those numbers."""
    path = root / DENSE_LIMITS_FILE
    data, problem = _read_measurement(path)
    out = [heading(DENSE_LIMITS_TITLE)]
    if problem:
        out.append(f'<p class="warn">{esc(problem)}</p>')
    if data is None:
        out.append(f"<p><small>not measured in this checkout (no {esc(DENSE_LIMITS_FILE)}): "
                   "<code>python benchmarks/dense_limits.py --out docs/benchmarks/dense_limits.json</code> "
                   "after <code>make demo</code></small></p>")
        return "".join(out)
    m = data["metrics"]
    rows = [[label, pct(m.get(f"{key}.seen")), pct(m.get(f"{key}.heldout"))] for label, key in DENSE_LIMITS_ROWS]
    ours = {r: (_get(d, ("segmentation", "miou")), _get(d, ("heldout", "segmentation", "miou")))
            for r, d in metrics.items() if _is_number(_get(d, ("segmentation", "miou")))}
    rows += [[f"{recipe}, this run's evaluate stage", pct(seen), pct(held)] for recipe, (seen, held) in ours.items()]
    n_test = data.get("n_test") or {}
    out.append(
        f"<p>Bounds on the test images' mIoU, scored as the evaluate stage scores it: {esc(n_test.get('seen', '?'))} "
        f"seen / {esc(n_test.get('heldout', '?'))} held-out images, probes trained on {esc(data.get('n_train', '?'))} "
        f"train images. Backbone: {esc(data.get('label') or data.get('weights') or MISSING)}. Measured by "
        f"<code>benchmarks/dense_limits.py</code> on {esc(data.get('date') or MISSING)} at commit "
        f"<code>{esc(str(data.get('commit') or MISSING)[:10])}</code> ({esc(DENSE_LIMITS_FILE)}); "
        "<code>dvc repro</code> does not rerun it. The held-out compositions never occur in train, so the "
        "head over every composition has no held-out score.</p>"
    )
    out.append(table(["mIoU (%)", "seen", "held-out"], rows))
    held_out = [m.get(f"probe_colour_x_shape.{b}.heldout") for b in ("pretrained", "random_init")]
    variants = []
    for other in sorted(path.parent.glob(DENSE_LIMITS_VARIANTS)):
        found, problem = _read_measurement(other)
        if found is None:
            out.append(f'<p class="warn">{esc(problem)}</p>')
            continue
        om = found["metrics"]
        variants.append([str(found.get("label") or other.name),
                         *(pct(om.get(f"probe_colour_x_shape.{b}.{s}"))
                           for b in ("pretrained", "random_init") for s in ("seen", "heldout")), other.name])
        held_out += [om.get(f"probe_colour_x_shape.{b}.heldout") for b in ("pretrained", "random_init")]
    if variants:
        out.append("<h3>The colour × shape bound on other backbones and worlds</h3>")
        out.append(table(["backbone", "seen", "held-out", "random init: seen", "random init: held-out", "file"],
                         variants))
    bounds = [v for v in held_out if _is_number(v)]
    if bounds and _is_number(m.get("patch_grid.heldout")):
        reached = "; ".join(f"{esc(r)} {pct(h)} %" for r, (_, h) in ours.items() if _is_number(h))
        out.append(
            f"<p><b>Reading.</b> A perfect scorer at the patch grid reaches {pct(m['patch_grid.heldout'])} % "
            f"held-out, so resolution is not the limit. A supervised linear readout of the patch tokens reaches "
            f"{pct(min(bounds))}-{pct(max(bounds))} % held-out in every measurement here ({1 + len(variants)} "
            f"file(s), each a backbone and its random init)"
            + (f"; this run's recipes: {reached}" if reached else "")
            + ". Talk2DINO scores each patch by its cosine to ψ(text), linear in the patch token before "
            "background cleaning and PAMR: a held-out mIoU well above that bound needs patch features that "
            "separate shapes, which these backbones do not have (docs/benchmarks.md, \"What limits the "
            "demo's dense numbers\").</p>"
        )
    return "".join(out)


def _section_zeroshot(paths: PathsConfig, root: Path, recipes: Sequence[str]) -> str:
    from dinoalign.evaluate.visualize import confusion_chart

    cards = []
    for recipe in recipes:
        found = zeroshot_confusion(_at(paths.plots, root) / recipe / "zeroshot_predictions.csv")
        if found is not None:
            subset, names, counts = found
            svg = confusion_chart(counts, names, f"{recipe}: zero-shot ({subset}, {counts.sum()} images)",
                                  fmt="svg", size=5.2)
            cards.append(f'<div class="card">{chart_img(svg, f"{recipe} zero-shot confusion")}</div>')
    if not cards:
        return ""
    return heading("Zero-shot confusion") + '<div class="grid">' + "".join(cards) + "</div>"


def _section_curves(paths: PathsConfig, root: Path, recipes: Sequence[str]) -> str:
    out = [heading("Training curves"), '<div class="grid">']
    for recipe in recipes:
        curve = read_curve(_at(paths.curves, root) / recipe / "curve.csv")
        summary = read_json(_at(paths.curves, root) / recipe / "metrics.json") or {}
        body = curve_charts(curve, recipe) if curve else "<p><small>no curve.csv yet</small></p>"
        note = "<p><small>no align metrics.json</small></p>"
        if summary:
            final = summary.get("final_loss")
            final = f"{final:.4g}" if isinstance(final, (int, float)) else "?"
            note = (
                f"<p><small>{esc(summary.get('steps', '?'))} steps, "
                f"{esc(summary.get('train_uids', '?'))} train images, final loss {final}</small></p>"
            )
        out.append(f'<div class="card"><h3>{esc(recipe)}</h3>{body}{note}</div>')
    teacher = read_curve(_at(paths.teacher, root) / "curve.csv")
    if teacher:
        out.append(f'<div class="card"><h3>teacher CLIP (demo)</h3>{curve_charts(teacher, "teacher")}</div>')
    out.append("</div>")
    return "".join(out)


def _section_segmentation(
    paths: PathsConfig, root: Path, metrics: Mapping[str, Mapping[str, Any]]
) -> str:
    dense = {r: m for r, m in metrics.items() if "per_class" in m.get("segmentation", {})}
    if not dense:
        return ""
    out = [heading("Segmentation")]
    for recipe in dense:
        plots = _at(paths.plots, root) / recipe
        seg = dense[recipe]["segmentation"]
        threshold = seg.get("bg_threshold")
        threshold = "none" if threshold is None else f"{threshold:.3g}"
        calibration = seg.get("bg_threshold_calibration")
        if calibration:
            threshold += f" (best on {calibration['images']} {calibration['split']} images)"
        settings = (
            f"background threshold {threshold}, background cleaning "
            f"{'on' if seg.get('background_cleaning') else 'off'}, "
            f"PAMR {'on' if seg.get('pamr') else 'off'}"
        )
        pictures = "".join(
            f"<figure>{png_img(p.read_bytes(), f'{recipe} {p.stem}')}<figcaption>{esc(p.stem)}</figcaption></figure>"
            for p in sorted((plots / "examples").glob("*.png"))
        )
        confusion = "".join(
            f"<figure>{png_img(p.read_bytes(), p.stem, 560, 'chart')}<figcaption>pixel confusion, "
            f"{esc(p.stem.rsplit('_', 1)[-1])}: rows ground truth, columns prediction</figcaption></figure>"
            for p in sorted(
                plots.glob("segmentation_confusion_*.png"), key=lambda p: p.stem.endswith("heldout")
            )
        )
        out.append(f"<h3>{esc(recipe)} <small>({esc(settings)})</small></h3>")
        out.append(f'<div class="card">{pictures or "<small>no examples</small>"}{confusion}</div>')
    out.append("<h3>Per-class IoU (%)</h3>")
    names = list(next(iter(dense.values()))["segmentation"]["per_class"])
    columns = [
        (
            r,
            s,
            (m if s == "seen" else m.get("heldout", {}))
            .get("segmentation", {})
            .get("per_class", {}),
        )
        for r, m in dense.items()
        for s in (("seen", "heldout") if "heldout" in m else ("seen",))
    ]
    rows = []
    for name in names:
        cells = [f"<td>{esc(name)}</td>"]
        for _recipe, _subset, per_class in columns:
            value = per_class.get(name)
            bar = f'<span class="bar" style="width:{0 if value is None else round(60 * value)}px"></span>'
            cells.append(f'<td class="num">{bar}{pct(value)}</td>')
        rows.append(cells)
    headers = ["class", *(f"{r} ({s})" for r, s, _ in columns)]
    out.append(table(headers, rows, raw=True))
    return "".join(out)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (MISSING if value is None else str(value))


def _card(title: str, body: str | None) -> str:
    return f'<div class="card"><h3>{esc(title)}</h3>{body if body is not None else "<small>not produced yet</small>"}</div>'


def _pairs_table(pairs: Mapping[str, Any]) -> str:
    """Pairs and captions per split, with the total, then the other prepare counts."""
    splits, captions = pairs.get("splits", {}), pairs.get("captions_per_split", {})
    rows = [[s, _count(n), _count(captions.get(s))] for s, n in splits.items()]
    rows.append(["total", _count(pairs.get("n_pairs")), _count(pairs.get("n_captions"))])
    other = [["labelled (one class)", _count(pairs.get("labelled"))], ["with a mask", _count(pairs.get("with_mask"))],
             ["rejected", _count(pairs.get("n_rejects"))], ["sources", ", ".join(pairs.get("sources", []))]]
    return table(["split", "pairs", "captions"], rows) + table(["prepare", "pairs"], other)


def _curation_table(curate: Mapping[str, Any]) -> str:
    """Train pairs through curation: clustered, removed per filter, kept."""
    rows = [["train pairs", _count(curate.get("n_train"))],
            ["without features", _count((curate.get("without_features") or {}).get("count"))],
            ["clustered", _count(curate.get("n_input"))]]
    rows += [[f"removed: {name}", _count(n)] for name, n in (curate.get("removed") or {}).items()]
    rows.append(["kept", _count(curate.get("n_kept"))])
    return table(["", "pairs"], rows)


def _section_data(paths: PathsConfig, root: Path) -> str:
    from dinoalign.embed.store import FeatureStore

    out = [heading("Data, rejects and curation"), '<div class="grid">']
    pairs = read_json(_at(paths.pairs, root) / "summary.json")
    manifest = FeatureStore(under_root(paths.features, root)).read_manifest()
    curate = read_json(_at(paths.curated, root) / "stats.json")
    out.append(_card("pairs (prepare)", _pairs_table(pairs) if pairs else None))
    features = None
    if manifest is not None:
        counts = manifest.get("counts") or {}
        features = table(["", "count"], [["images embedded", _count(counts.get("images_total"))],
                                         ["captions embedded", _count(counts.get("captions_total"))],
                                         ["rejected", _count(counts.get("rejects_total"))],
                                         ["feature spec", str(manifest["spec"].get("spec_hash", MISSING))]])
    out.append(_card("features (embed)", features))
    out.append(_card("curation (curate)", _curation_table(curate) if curate else None))
    prepare_rejects = (pairs or {}).get("rejects_by_reason") or {}
    embed_rejects = (manifest or {}).get("rejects_by_reason") or {}
    reasons = sorted(set(prepare_rejects) | set(embed_rejects))
    if reasons:
        rows = [[r, _count(prepare_rejects.get(r, 0)), _count(embed_rejects.get(r, 0))] for r in reasons]
        out.append(_card("rejects by reason", table(["reason", "prepare", "embed"], rows)))
    out.append("</div>")
    out.append(curation_charts(_at(paths.curated, root) / "plots"))
    return "".join(out)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def curation_charts(plots: Path) -> str:
    """The curate stage's DVC plots drawn here (``dvc plots show`` loads its chart library
    from a CDN, so it renders nothing offline): the points per cluster of each k-means
    level, largest first, before and after curation, and the captions matching each
    text-balancing entry before and after."""
    from dinoalign.evaluate.visualize import curve_chart, paired_bar_chart  # matplotlib: charts only

    charts = []
    levels = sorted((plots / "cluster_sizes").glob("level_*.csv"), key=lambda p: int(p.stem.split("_")[1]))
    for path in levels:
        rows = _read_csv(path)
        if rows:
            ranks = [int(r["rank"]) + 1 for r in rows]
            series = {k: [float(r[k]) for r in rows] for k in ("before", "after")}
            level = path.stem.split("_")[1]
            charts.append(chart_img(
                curve_chart(ranks, series, x_label="cluster (largest first)", left_label="train pairs",
                            title=f"curate: cluster sizes, level {level} ({len(rows)} clusters)", left_min=0.0,
                            integer_x=True),
                f"curate: train pairs per cluster of level {level}, before and after"))
    entries = plots / "captions_per_entry"
    if (entries / "before.csv").is_file() and (entries / "after.csv").is_file():
        before = {r["entry"]: float(r["captions"]) for r in _read_csv(entries / "before.csv")}
        after = {r["entry"]: float(r["captions"]) for r in _read_csv(entries / "after.csv")}
        order = sorted(before, key=lambda e: (-before[e], e))
        charts.append(chart_img(
            paired_bar_chart(order, [before[e] for e in order], [after.get(e, 0.0) for e in order],
                             "curate: captions per text-balancing entry", "captions"),
            "curate: captions matching each text-balancing entry, before and after"))
    if not charts:
        return ""
    return "<h3>Curation charts</h3>" + "".join(charts)


def _section_versions(inputs: ReportInputs, metrics: Mapping[str, Mapping[str, Any]]) -> str:
    from dinoalign.tracking import git_commit

    out = [heading("Versions")]
    backbone, clip = inputs.backbone, inputs.clip
    description = describe_backbone(backbone, inputs.root)
    if description == RANDOM_INIT:
        named = " — RANDOM INIT (demo)"
    else:  # the weights' own description (tiny self-supervised (demo)), the file beside it
        named = f" — {description}"
        if backbone.weights and backbone.weights not in description:
            named += f" ({backbone.weights})"
    rows = [
        ["git commit", git_commit(inputs.root)],
        ["profile", inputs.profile],
        ["backbone", f"{backbone.name} {backbone.model_kwargs or ''}{named}"],
        [
            "CLIP (text tower, projector target)",
            f"{clip.name} {clip.pretrained or ''}",
        ],
    ]
    for recipe, m in metrics.items():
        model = _get(m, ("info", "model")) or {}
        rows.append(
            [
                f"model {recipe}",
                f"sha256 {str(model.get('weights_sha256', '?'))[:16]}… from {model.get('reference', '?')}",
            ]
        )
    out.append(table(["", ""], rows))
    lock = dvc_lock_outputs(inputs.root)
    if lock:
        out.append(
            "<h3>DVC outputs (dvc.lock)</h3>"
            + table(["stage", "output", "md5"], [[s, p, h] for s, p, h in lock])
        )
    else:
        out.append(
            "<p><small>no dvc.lock (run through <code>dvc repro</code> to record data versions)</small></p>"
        )
    return "".join(out)


def _section_registry(tracking_uri: str, experiment: str, recipes: Sequence[str]) -> str:
    out = [heading("Model registry")]
    rows, problem = registry_versions(tracking_uri, experiment, recipes)
    if problem:
        return "".join(out) + f"<p><small>{esc(problem)}</small></p>"
    cells = [
        [r["model"], MISSING, "not registered yet (the align stage registers each model)", "", ""]
        if r["version"] is None else
        [r["model"], r["version"], " ".join(f"@{a}" for a in r["aliases"]) or MISSING,
         f"{r['created']:%Y-%m-%d %H:%M} UTC", (r["run_id"] or "")[:12]]
        for r in rows
    ]
    out.append(table(["registered model", "version", "aliases", "created", "run"], cells))
    out.append("<p><small>align registers each trained model as <code>@candidate</code>; "
               "<code>dinoalign retrain</code> moves <code>@champion</code> (docs/operations.md)</small></p>")
    return "".join(out)


def _section_mlflow(inputs: ReportInputs, metrics: Mapping[str, Mapping[str, Any]]) -> str:
    paths = inputs.paths
    shown: dict[str, str] = {}
    for recipe in inputs.recipes:
        align = read_json(_at(paths.curves, inputs.root) / recipe / "metrics.json") or {}
        if align.get("mlflow_run_id"):
            shown[f"align@{recipe}"] = align["mlflow_run_id"]
        evaluated = _get(metrics.get(recipe, {}), ("info", "mlflow", "run_id"))
        if evaluated:
            shown[f"evaluate@{recipe}"] = evaluated
    runs, problem = mlflow_runs(inputs.tracking_uri, inputs.experiment, shown)
    out = [heading("MLflow runs")]
    if problem:
        return "".join(out) + f"<p><small>{esc(problem)}</small></p>"
    if not inputs.tracking_uri.startswith("http"):
        out.append(
            "<p><small>embedded store: start the UI with <code>make mlflow-ui</code> for these "
            f"links ({esc(inputs.mlflow_ui)})</small></p>"
        )
    rows = []
    for r in runs:
        link = esc(r["run_id"])
        if r["experiment_id"] is not None:
            href = esc(run_link(inputs.tracking_uri, inputs.mlflow_ui, r["experiment_id"], r["run_id"]))
            link = f'<a href="{href}">{esc(r["run_id"][:12])}</a>'
        started = f"{r['start']:%Y-%m-%d %H:%M:%S} UTC" if "start" in r else MISSING
        rows.append(
            [
                f"<td>{esc(r['name'])}</td>",
                f"<td>{esc(r['status'])}</td>",
                f"<td>{started}</td>",
                f"<td>{link}</td>",
            ]
        )
    out.append(table(["run", "status", "started", "run id"], rows, raw=True))
    return "".join(out)


# ----------------------------------------------------------------------------- the page


def render_report(inputs: ReportInputs) -> str:
    """The report page for the recipes of ``inputs`` (module docstring)."""
    recipes, paths, root = list(inputs.recipes), inputs.paths, inputs.root
    metrics: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        found = read_json(details_path(_at(paths.metrics, root), recipe))
        if found is not None:
            metrics[recipe] = found
    missing = [r for r in recipes if r not in metrics]
    now = datetime.datetime.now(datetime.timezone.utc)
    backbone = inputs.backbone
    description = describe_backbone(backbone, root)
    warn = ""
    if description in (RANDOM_INIT, DEMO_BACKBONE):
        what = (
            "<b>random-init</b> ViT" if description == RANDOM_INIT else
            f"ViT, <b>{esc(description)}</b>: DINO-pretrained by the pretrain stage on the synthetic "
            "world's unlabelled train images"
        )
        warn = (
            f'<p class="warn">Demo profile: the backbone <code>{esc(backbone.name)}</code> is a tiny '
            f"{what}, and the data is the synthetic world; the numbers show that each recipe "
            "learns (compare with chance), not how it compares with the papers (docs/reproduce.md).</p>"
        )
    dataset = inputs.dataset
    sections = "".join(
        [
            _section_pretrain(inputs),  # the backbone the recipes stand on, before them
            _section_results(metrics, missing),
            _section_zeroshot(paths, root, recipes),
            _section_curves(paths, root, recipes),
            _section_segmentation(paths, root, metrics),
            _section_ablations(root),  # one factor at a time, after the recipes' own sections
            _section_dense_limits(root, metrics),
            _section_data(paths, root),
            _section_versions(inputs, metrics),
            _section_registry(inputs.tracking_uri, inputs.experiment, recipes),
            _section_mlflow(inputs, metrics),
        ]
    )
    body = (
        "<h1>dinoalign report</h1>"
        f'<p class="sub">profile <b>{esc(inputs.profile)}</b> · dataset <b>{esc(dataset)}</b> · '
        f"recipes {esc(', '.join(recipes))} · generated {now:%Y-%m-%d %H:%M} UTC</p>"
        + warn + table_of_contents(sections) + sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dinoalign report</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_report(inputs: ReportInputs) -> Path:
    """Render the report and write ``<paths.report>/index.html`` (whole, then
    renamed into place); returns its path."""
    paths = inputs.paths
    path = _at(paths.report, inputs.root) / REPORT_FILE
    write_atomic(path, render_report(inputs))
    return path


def _at(location: str, root: Path) -> Path:
    """A local location from ``paths`` (the report reads and writes local files only)."""
    return Path(under_root(location, root))

"""The report stage: one self-contained page, checked in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright): no console errors, no network, every picture
decodes, the numbers on screen are those of metrics/<recipe>.details.json (and of the
pretrain stage's metrics.json in the backbone section, before the recipes), and the charts
have axes, ticks and legends."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipeline_testing import DemoModels, write_pretrain_outputs
from PIL import Image

from dinoalign.report import PRETRAIN_TITLE, curation_charts, curve_charts, pct, write_report
from dinoalign.stages.report import report_inputs


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic pretrain stage outputs (metrics.json, curve.csv): the demo models'
    backbone is a random init, the section is what is checked."""
    folder = tmp_path_factory.mktemp("report_pretrain") / "pretrain"
    write_pretrain_outputs(folder)
    return folder


@pytest.fixture(scope="module")
def report(evaluated_demo: DemoModels, pretrained: Path) -> Path:
    assert evaluated_demo.main("report", f"paths.pretrained={pretrained}") == 0
    return evaluated_demo.root / "report" / "index.html"


def _cell_texts(page, heading: str) -> dict[str, dict[str, str]]:
    """{metric row label: {recipe: cell text}} of the results table after ``heading``."""
    rows = page.evaluate(
        """(heading) => {
          const h = Array.from(document.querySelectorAll('h3')).find(e => e.textContent.startsWith(heading));
          const table = h.nextElementSibling;
          const names = Array.from(table.querySelectorAll('thead th')).map(th => th.textContent);
          return Array.from(table.querySelectorAll('tbody tr')).map(tr =>
            [names, Array.from(tr.children).map(td => td.textContent)]);
        }""",
        heading,
    )
    return {cells[0]: dict(zip(names[1:], cells[1:])) for names, cells in rows}


def test_report_renders_offline_in_chromium_with_the_metrics_on_screen(
    evaluated_demo: DemoModels, report: Path, pretrained: Path, chromium: Any, tmp_path: Path
) -> None:
    html = report.read_text()
    assert not re.search(r"""(src|href)=["']https?://""", html.split('<h2 id="mlflow-runs">')[0]), (
        "only run links may point out"
    )
    assert "<script" not in html
    problems: list[str] = []
    requests: list[str] = []
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.on(
            "console",
            lambda m: (
                problems.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning")
                else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri(), wait_until="load")
        widths = page.evaluate(
            "Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
        )
        seen = _cell_texts(page, "Seen compositions")
        heldout = _cell_texts(page, "Held-out compositions")
        versus_clip = {t: _cell_texts(page, f"Projector vs its teacher CLIP ({t})") for t in ("seen", "held-out")}
        charts = page.evaluate(
            "Array.from(document.querySelectorAll('img.chart[src^=\"data:image/svg+xml\"]'))"
            ".map(i => [i.alt, i.complete ? i.naturalWidth : 0])"
        )
        contents = page.evaluate(
            "Array.from(document.querySelectorAll('nav.toc a')).map(a => "
            "[a.textContent, !!document.getElementById(a.hash.slice(1))])"
        )
        links = page.evaluate("Array.from(document.querySelectorAll('a')).map(a => a.href)")
        attention = page.evaluate(
            """() => Array.from(document.querySelectorAll('table')).find(t =>
                 t.querySelector('th').textContent.startsWith('attention inside the object'))
               .querySelector('tbody tr').innerText"""
        )
        reading = page.evaluate(
            "Array.from(document.querySelectorAll('p')).find(p => p.textContent.startsWith('Reading.')).innerText"
        )
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    finally:
        page.close()
    assert problems == []
    assert requests == [report.as_uri()]  # pictures are data: URIs, nothing else is fetched
    # 2 examples × 2 subsets + 2 pixel-confusion pictures, for each of the two dense
    # recipes, and the SVG charts: the pretraining curve, the teacher's training curve (the
    # untrained models have none) and a zero-shot confusion per recipe
    assert len(widths) == 2 * (4 + 2) + len(charts) and min(widths) > 0
    assert sorted(alt for alt, _ in charts) == sorted(
        ["pretrain: loss and teacher entropy by epoch", "teacher: loss and learning rate by step"]
        + [f"{r} zero-shot confusion" for r in DemoModels.RECIPES]
    ) and min(w for _, w in charts) > 200
    # the backbone the recipes stand on comes first, then the recipes' results
    assert [t for t, _ in contents][:3] == [PRETRAIN_TITLE, "Results", "Zero-shot confusion"]
    assert all(ok for _, ok in contents)
    head = json.loads((pretrained / "metrics.json").read_text())["probe"]["attention"]["selected_head"]
    assert attention.split("\t")[1:3] == [pct(head["pretrained"]), pct(head["random_init"])]
    assert f"{pct(head['pretrained'])} % of the CLS attention inside the object, significantly above" in reading
    assert "Model registry" in [t for t, _ in contents]
    for recipe in DemoModels.RECIPES:
        metrics = json.loads((evaluated_demo.root / "metrics" / f"{recipe}.details.json").read_text())
        for rows, block in ((seen, metrics), (heldout, metrics["heldout"])):
            zeroshot = block["zeroshot"]
            assert (
                rows["zero-shot top-1"][recipe]
                == f"{pct(zeroshot['top1'])} chance {pct(zeroshot['chance_top1'])}"
            )
            r1 = block["retrieval"]["t2i"]
            assert (
                rows["text→image R@5"][recipe] == f"{pct(r1['r5'])} chance {pct(r1['chance_r5'])}"
            )
            seg = block["segmentation"]
            expected = (
                f"{pct(seg['miou'])} chance {pct(seg['chance_miou'])}"
                if "miou" in seg
                else "— projector has no dense head"
            )
            assert rows["segmentation mIoU"][recipe] == expected
        if recipe == "projector":  # its zero-shot and recalls beside the teacher CLIP's own
            for title, block in (("seen", metrics), ("held-out", metrics["heldout"])):
                zeroshot, row = block["zeroshot"], versus_clip[title]["zero-shot top-1"]
                ratio = zeroshot["percent_of_clip"]["top1"]
                assert [row["projector (%)"], row["teacher CLIP (%)"], row["projector / CLIP (%)"]] == [
                    pct(zeroshot["top1"]), pct(zeroshot["clip"]["top1"]), "—" if ratio is None else f"{ratio:.1f}"]
                assert versus_clip[title]["text→image R@5"]["teacher CLIP (%)"] == pct(
                    block["retrieval"]["clip"]["t2i"]["r5"])
        run_id = metrics["info"]["mlflow"]["run_id"]
        assert any(
            link.endswith(f"/runs/{run_id}") and link.startswith("http://127.0.0.1:5000/#/")
            for link in links
        )
    with Image.open(tmp_path / "report.png") as shot:
        pixels = np.asarray(shot.convert("L"))
    assert (
        shot.size[0] == 1280 and shot.size[1] > 2000 and pixels.std() > 20
    )  # a long, non-blank page


def test_report_says_what_is_missing(evaluated_demo: DemoModels, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    shutil.copy(evaluated_demo.root / "metrics" / "talk2dino.details.json", metrics)
    params = evaluated_demo.params(
        f"paths.metrics={metrics}",
        f"paths.report={tmp_path / 'report'}",
        f"paths.curves={tmp_path / 'no-curves'}",
        f"paths.curated={tmp_path / 'no-curate'}",
        f"paths.pretrained={tmp_path / 'no-pretrain'}",
    )
    html = write_report(report_inputs(params, evaluated_demo.features.root)).read_text()
    assert "no metrics for dinotxt, projector" in html
    assert html.count("no curve.csv yet") == 3
    assert "curation (curate)</h3><small>not produced yet" in html
    assert "the pretrain stage has not run" in html
    assert "RANDOM INIT (demo)" in html and "random-init" in html


def test_curve_charts_draw_loss_with_the_learning_rate_and_the_accuracy() -> None:
    curve = [{"step": float(i), "loss": 2.0 / (i + 1), "lr": 1e-3 * (1 - i / 20), "t2i_accuracy": i / 20}
             for i in range(20)]
    html = curve_charts(curve, "talk2dino")
    svgs = [base64.b64decode(s).decode() for s in re.findall(r"data:image/svg\+xml;base64,([^\"]+)", html)]
    assert len(svgs) == 2
    words = [" ".join(re.findall(r">([^<>]+)</text>", svg)) for svg in svgs]
    # axis labels, the legend of both axes, tick labels
    assert all(w in words[0] for w in ("step", "loss", "learning rate", "talk2dino", "15"))
    assert "in-batch accuracy" in words[1] and "t2i accuracy" in words[1]
    assert curve_charts([{"step": 0.0}], "x") == "<p><small>no loss values</small></p>"


def test_curation_charts_draw_the_curate_stage_plots(tmp_path: Path) -> None:
    """Issue #17: the curate stage's DVC plots (which `dvc plots show` cannot draw offline)
    in the report, from the CSVs the stage's own writer makes: cluster sizes per level,
    captions per text-balancing entry."""
    import pyarrow as pa

    from dinoalign.curate.tables import write_outputs

    stats = {"kmeans": {"levels": [{"level": 1, "sizes_before": [5, 1, 9], "sizes_after": [2, 1, 3]},
                                   {"level": 2, "sizes_before": [6, 9], "sizes_after": [3, 3]}]},
             "text": {"enabled": True, "caption_counts_before": {"red": 10, "circle": 4, "left": 7},
                      "caption_counts_after": {"red": 5, "circle": 4, "left": 6}}}
    write_outputs(tmp_path / "curated", pa.table({"uid": ["a"]}), stats)
    html = curation_charts(tmp_path / "curated" / "plots")
    alts = re.findall(r'alt="([^"]+)"', html)
    assert alts == ["curate: train pairs per cluster of level 1, before and after",
                    "curate: train pairs per cluster of level 2, before and after",
                    "curate: captions matching each text-balancing entry, before and after"]
    svgs = [base64.b64decode(s).decode() for s in re.findall(r"data:image/svg\+xml;base64,([^\"]+)", html)]
    words = [re.findall(r">([^<>]+)</text>", svg) for svg in svgs]
    for level, (text, clusters) in enumerate(zip(words[:2], (3, 2)), start=1):
        assert f"curate: cluster sizes, level {level} ({clusters} clusters)" in text
        assert {"cluster (largest first)", "train pairs", "before", "after"} <= set(text)
    # entries from the most captions before curation down, with the value axis named
    entries = [w for w in words[2] if w in ("red", "circle", "left")]
    assert entries == ["red", "left", "circle"] and {"captions", "before", "after"} <= set(words[2])
    assert curation_charts(tmp_path / "nothing") == ""

"""The report's ablations section (issue #15): benchmarks/ablations.py's table, summarised
by its own ``_summarise`` from per-seed numbers made up here, rendered with the paper's
direction beside ours and a verdict per row; a checkout without the file says how to make it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from dinoalign.report import ABLATIONS_FILE, ABLATIONS_TITLE, _section_ablations, ablation_verdict

REPO = Path(__file__).resolve().parents[2]


def _benchmark():
    spec = importlib.util.spec_from_file_location("ablations_benchmark", REPO / "benchmarks" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _numbers(zeroshot: list[float], miou: list[float]) -> dict[int, dict[str, float]]:
    return {s: {"heldout/zeroshot/top1": z, "heldout/segmentation/miou": m,
                "seen/zeroshot/top1": z + 0.1, "seen/segmentation/miou": m + 0.01}
            for s, (z, m) in enumerate(zip(zeroshot, miou))}


def test_rows_are_summarised_against_their_baseline_and_judged_against_the_paper(tmp_path: Path) -> None:
    bench = _benchmark()
    rows = [r for r in bench.ROWS if r.recipe == "talk2dino"][:4]  # baseline, averaged, CLS, linear
    base, averaged, cls, linear = (r.name for r in rows)
    runs = {
        base: _numbers([0.20, 0.22, 0.24], [0.10, 0.12, 0.11]),
        averaged: _numbers([0.10, 0.12, 0.14], [0.05, 0.06, 0.07]),  # lower in every seed: agrees
        cls: _numbers([0.30, 0.32, 0.34], [0.20, 0.22, 0.21]),  # higher in every seed: differs
        linear: _numbers([0.21, 0.21, 0.25], [0.09, 0.13, 0.11]),  # mixed: unclear
    }
    table = bench._summarise(rows, runs)
    by_row = {e["row"]: e for e in table}
    m = by_row[averaged]["metrics"]["heldout/zeroshot/top1"]
    assert abs(m["mean"] - 0.12) < 1e-9 and abs(m["diff_mean"] + 0.10) < 1e-9
    assert m["seeds_lower"] == 3 and m["direction"] == "lower" and m["p_value"] == 0.25
    assert "diff_mean" not in by_row[base]["metrics"]["heldout/zeroshot/top1"]
    assert [ablation_verdict(by_row[n]) for n in (averaged, cls, linear)] == ["agrees", "differs", "unclear"]

    (tmp_path / ABLATIONS_FILE).parent.mkdir(parents=True)
    (tmp_path / ABLATIONS_FILE).write_text(json.dumps({"table": table, "seeds": [0, 1, 2], "date": "2026-12-07",
                                                       "commit": "abc1234567890", "dinotxt_epochs": 8}))
    html = _section_ablations(tmp_path)
    assert ABLATIONS_TITLE.replace("'", "&#x27;") in html and "3 seeds each" in html
    # averaged attention, held-out zero-shot: lower in 3 of 3 seeds, exact sign-flip p 2/8
    assert "12.0 ± 2.0 (-10.0, 3/3, p 0.25)" in html
    reading = re.search(r"<p><b>Reading\.</b> (.*?)</p>", html).group(1)
    assert "talk2dino: CLS token instead of the best head" in reading and "averaged" not in reading


def test_a_checkout_without_measurements_says_how_to_make_them(tmp_path: Path) -> None:
    html = _section_ablations(tmp_path)
    assert "not measured in this checkout" in html and "benchmarks/ablations.py" in html


def test_rerunning_one_recipe_keeps_the_others_rows_and_their_provenance(tmp_path: Path) -> None:
    bench = _benchmark()
    t2d = [r for r in bench.ROWS if r.recipe == "talk2dino"][:2]
    txt = [r for r in bench.ROWS if r.recipe == "dinotxt"][:2]
    earlier_runs = {t2d[0].name: _numbers([0.2, 0.2, 0.2], [0.1, 0.1, 0.1]),
                    t2d[1].name: _numbers([0.1, 0.1, 0.1], [0.1, 0.1, 0.1]),
                    txt[0].name: _numbers([0.3, 0.3, 0.3], [0.05, 0.05, 0.05]),
                    txt[1].name: _numbers([0.25, 0.26, 0.27], [0.04, 0.04, 0.04])}
    out = tmp_path / ABLATIONS_FILE
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"table": bench._summarise(t2d + txt, earlier_runs), "runs": earlier_runs,
                               "seeds": [0, 1, 2], "date": "2026-12-01", "commit": "old0123456789",
                               "dinotxt_epochs": 8}))
    # talk2dino alone again, two seeds: its rows are replaced, dinotxt's stay as measured then
    runs = {t2d[0].name: _numbers([0.3, 0.3], [0.2, 0.2]), t2d[1].name: _numbers([0.2, 0.2], [0.1, 0.1])}
    measured = {"talk2dino": {"date": "2026-12-07", "commit": "new0123456789", "seeds": [0, 1]}}
    table, merged_runs, measured = bench._keep_other_recipes(
        out, ["talk2dino"], bench._summarise(t2d, runs), runs, measured)
    assert [r["row"] for r in table] == [r.name for r in t2d + txt]  # the benchmark's row order
    assert table[0]["metrics"]["heldout/zeroshot/top1"]["values"] == [0.3, 0.3]
    assert table[2]["metrics"]["heldout/zeroshot/top1"]["values"] == [0.3, 0.3, 0.3]
    assert merged_runs[txt[1].name] == earlier_runs[txt[1].name] and merged_runs[t2d[0].name] == runs[t2d[0].name]
    assert measured["dinotxt"] == {"date": "2026-12-01", "commit": "old0123456789", "seeds": [0, 1, 2],
                                   "dinotxt_epochs": 8}
    out.write_text(json.dumps({"table": table, "seeds": [0, 1], "measured": measured, "date": "2026-12-07"}))
    html = _section_ablations(tmp_path)
    assert "measured on 2026-12-07 at commit <code>new0123456" in html
    assert "measured on 2026-12-01 at commit <code>old0123456" in html and "8 epochs" in html
    assert "seeds, date and commit per recipe below" in html and "2 seeds each" not in html
    # nothing earlier: the run's own rows only
    alone = bench._keep_other_recipes(tmp_path / "none.json", ["talk2dino"], table[:2], runs, {})
    assert [r["row"] for r in alone[0]] == [r.name for r in t2d]

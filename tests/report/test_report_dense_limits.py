"""The report's "what limits the dense half" section (issue #15): benchmarks/dense_limits.py's
bounds beside this run's dense recipes, the held-out bound of the other backbones measured,
and a reading computed from those numbers; a checkout without the file says how to make it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dinoalign.report import (
    DENSE_LIMITS_FILE,
    DENSE_LIMITS_ROWS,
    DENSE_LIMITS_TITLE,
    _section_dense_limits,
    pct,
)

REPO = Path(__file__).resolve().parents[2]


def _bounds(grid: float, composition: float, colour_shape: tuple[float, float]) -> dict[str, float]:
    out = {f"patch_grid.{s}": grid for s in ("seen", "heldout")}
    for backbone, shift in (("pretrained", 0.0), ("random_init", 0.02)):
        out[f"probe_composition.{backbone}.seen"] = composition + shift
        out[f"probe_colour_x_shape.{backbone}.seen"] = colour_shape[0] + shift
        out[f"probe_colour_x_shape.{backbone}.heldout"] = colour_shape[1] + shift
    return out


def _cells(html: str, table_index: int) -> list[list[str]]:
    body = re.findall(r"<tbody>(.*?)</tbody>", html)[table_index]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_bounds_beside_this_runs_recipes_and_a_reading_from_the_numbers(tmp_path: Path) -> None:
    path = tmp_path / DENSE_LIMITS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": _bounds(0.65, 0.28, (0.18, 0.107)), "n_train": 1500,
                                "n_test": {"seen": 300, "heldout": 300}, "label": "the demo backbone",
                                "date": "2026-12-07", "commit": "abc1234567890"}))
    (path.parent / "dense_limits_longer.json").write_text(json.dumps(
        {"metrics": _bounds(0.65, 0.23, (0.181, 0.088)), "label": "DINO, 1,280 steps"}))
    (path.parent / "ablations.json").write_text("{}")  # not a dense-limits file: ignored
    metrics = {"talk2dino": {"segmentation": {"miou": 0.086}, "heldout": {"segmentation": {"miou": 0.083}}},
               "projector": {"segmentation": {"skipped": "no dense head"}}}
    html = _section_dense_limits(tmp_path, metrics)

    assert DENSE_LIMITS_TITLE in html and "abc1234567" in html and "2026-12-07" in html
    main = _cells(html, 0)
    assert [r[1:] for r in main[: len(DENSE_LIMITS_ROWS)]] == [
        ["65.0", "65.0"], ["28.0", "—"], ["30.0", "—"], ["18.0", "10.7"], ["20.0", "12.7"]]
    assert main[len(DENSE_LIMITS_ROWS):] == [["talk2dino, this run&#x27;s evaluate stage", "8.6", "8.3"]]
    assert _cells(html, 1) == [["DINO, 1,280 steps", "18.1", "8.8", "20.1", "10.8", "dense_limits_longer.json"]]
    reading = re.search(r"<p><b>Reading\.</b> (.*?)</p>", html).group(1)
    # four held-out bounds (two files, each a backbone and its random init): 8.8 to 12.7 %
    assert "reaches 8.8-12.7 % held-out in every measurement here (2 file(s)" in reading
    assert "talk2dino 8.3 %" in reading and "patch grid reaches 65.0 %" in reading


def test_a_broken_measurement_file_is_named_on_the_page_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / DENSE_LIMITS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": _bounds(0.65, 0.28, (0.18, 0.107)), "label": "demo"}))
    (path.parent / "dense_limits_cut.json").write_text('{"metrics": {"patch_grid.seen"')  # a half-written file
    (path.parent / "dense_limits_list.json").write_text("[1, 2]")
    html = _section_dense_limits(tmp_path, {})
    assert "dense_limits_cut.json is unreadable" in html and "dense_limits_list.json has no metrics object" in html
    assert "<h3>The colour × shape bound" not in html  # no variant table from broken files
    assert "reaches 10.7-12.7 % held-out in every measurement here (1 file(s)" in html
    path.write_text("not json")
    html = _section_dense_limits(tmp_path, {})
    assert "dense_limits.json is unreadable" in html and "not measured in this checkout" in html


def test_a_checkout_without_measurements_says_how_to_make_them(tmp_path: Path) -> None:
    html = _section_dense_limits(tmp_path, {})
    assert "not measured in this checkout" in html and "benchmarks/dense_limits.py" in html


def test_the_committed_measurements_hold_every_number_the_section_reads() -> None:
    for path in [REPO / DENSE_LIMITS_FILE, *sorted((REPO / DENSE_LIMITS_FILE).parent.glob("dense_limits_*.json"))]:
        data = json.loads(path.read_text())
        assert data.get("label") and data.get("date") and data.get("commit"), path.name
        for _, key in DENSE_LIMITS_ROWS:
            subsets = ("seen",) if key.startswith("probe_composition") else ("seen", "heldout")
            for subset in subsets:
                value = data["metrics"][f"{key}.{subset}"]
                assert 0.0 <= value <= 1.0 and pct(value) != "—", (path.name, key, subset)

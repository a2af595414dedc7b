"""The report's backbone section (issue #15): the pretrain stage's ``metrics.json`` and
``curve.csv`` under ``paths.pretrained`` as the collapse-monitor chart, the attention and
k-NN tables and a reading generated from the numbers; one line when the stage was skipped
(a real profile's weights) or has not run. Synthetic stage outputs
(``pipeline_testing.write_pretrain_outputs``), no models."""

from __future__ import annotations

import base64
import html as htmllib
import re
from pathlib import Path

import pytest
from pipeline_testing import write_pretrain_outputs

from dinoalign.config import load_params
from dinoalign.report import PRETRAIN_TITLE, _section_pretrain, pct
from dinoalign.stages.report import report_inputs


def _section(tmp_path: Path, *overrides: str) -> str:
    params = load_params(tmp_path / "no-params.yaml", [f"paths.pretrained={tmp_path / 'pretrain'}", *overrides])
    return _section_pretrain(report_inputs(params, tmp_path))


def _rows(html: str, first_header: str) -> dict[str, list[str]]:
    """{row label: the other cells' texts} of the table whose first header is ``first_header``."""
    found = re.search(rf"<table><thead><tr><th>{re.escape(first_header)}</th>.*?</table>", html)
    assert found, first_header
    rows = re.findall(r"<tr>(<td.*?)</tr>", found.group(0))
    cells = [[htmllib.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
             for r in rows]
    return {c[0]: c[1:] for c in cells}


def _reading(html: str) -> str:
    found = re.search(r"<p><b>Reading\.</b> (.*?)</p>", html)
    assert found, "no reading"
    return htmllib.unescape(found.group(1))


def test_the_section_shows_the_curve_the_probes_and_a_reading(tmp_path: Path) -> None:
    m = write_pretrain_outputs(tmp_path / "pretrain", gain=0.25)
    html = _section(tmp_path)
    assert html.startswith('<h2 id="backbone-dino-self-supervised-pretraining">') and PRETRAIN_TITLE in html
    assert "tiny self-supervised (demo)" in html and "64 unlabelled train images" in html
    assert "4 epochs (16 steps)" in html

    # (1) the curve: loss and teacher entropy by epoch with log K, from 0 (one SVG chart)
    svgs = re.findall(r'<img class="chart" alt="([^"]+)" src="data:image/svg\+xml;base64,([^"]+)"', html)
    assert [alt for alt, _ in svgs] == ["pretrain: loss and teacher entropy by epoch"]
    words = " ".join(re.findall(r">([^<>]+)</text>", base64.b64decode(svgs[0][1]).decode()))
    assert all(w in words for w in ("DINO loss", "teacher entropy", "log K (collapse to uniform)", "epoch", "nats"))
    final = m["final"]
    assert f"= {final['teacher_entropy_over_log_k']:.2f} of log K = {final['log_k']:.2f}" in html

    # (2) attention inside the object: pretrained vs random init vs area share, with p
    attention = m["probe"]["attention"]
    rows = _rows(html, "attention inside the object (%)")
    assert list(rows) == ["val-selected head (heads 2 / 0)", "mean of heads"]
    for label, key in zip(rows, ("selected_head", "mean_of_heads")):
        block = attention[key]
        assert rows[label] == [pct(block["pretrained"]), pct(block["random_init"]), pct(attention["area_share"]),
                               f"{100 * block['difference']:+.1f}", f"{block['wins']}/{block['n']}",
                               f"{block['permutation_p']:.2g}", f"{block['sign_test_p']:.2g}"]

    # (3) k-NN top-1 by class, colour and background vs random init, majority and chance
    knn = _rows(html, "k-NN top-1 (%)")
    assert list(knn) == ["class (composition)", "colour", "background"]
    for label, key in zip(knn, ("class", "colour", "background")):
        block = m["probe"]["knn"][key]
        assert knn[label] == [pct(block[k]) for k in ("pretrained", "random_init", "majority", "chance")]

    # (4) the reading, from the numbers
    reading = _reading(html)
    p = attention["selected_head"]["permutation_p"]
    assert p < 0.05
    assert reading.startswith("On 40 held-out test images, the pretrained backbone: its val-selected head puts "
                              f"{pct(attention['selected_head']['pretrained'])} % of the CLS attention inside the "
                              f"object, significantly above the random init's "
                              f"{pct(attention['selected_head']['random_init'])} % "
                              f"({100 * attention['selected_head']['difference']:+.1f} points, "
                              f"paired permutation p = {p:.2g} < 0.05)")
    assert f"above the area share {pct(attention['area_share'])} %" in reading
    assert f"k-NN top-1 by class is {pct(0.55)} %, above the random init's {pct(0.30)} %" in reading


@pytest.mark.parametrize("gain", [0.0, -0.1])
def test_the_reading_does_not_claim_what_the_numbers_do_not_show(tmp_path: Path, gain: float) -> None:
    m = write_pretrain_outputs(tmp_path / "pretrain", gain=gain)
    reading = _reading(_section(tmp_path))
    attention = m["probe"]["attention"]
    assert "significantly above" not in reading
    for key in ("selected_head", "mean_of_heads"):
        block = attention[key]
        assert block["permutation_p"] >= 0.05
        assert f"points, paired permutation p = {block['permutation_p']:.2g} ≥ 0.05" in reading
    if gain < 0:
        assert "not above the random init's" in reading and "by class is" in reading and "below the random init's" in reading


def test_a_skipped_stage_is_one_line_naming_the_weights_used_instead(tmp_path: Path) -> None:
    write_pretrain_outputs(tmp_path / "pretrain", skipped=True)
    html = _section(tmp_path, "pretrain.enabled=false", "backbone.weights=/models/dinov2_vitb14_reg4.safetensors",
                    "backbone.name=vit_base_patch14_reg4_dinov2")
    body = html.split("</h2>", 1)[1]
    assert body.count("<p>") == 1 and "<table" not in body and "<img" not in body
    assert "Not pretrained here (pretrain.enabled=false): the backbone <code>vit_base_patch14_reg4_dinov2</code> " \
           "uses weights /models/dinov2_vitb14_reg4.safetensors instead." in body
    html = _section(tmp_path, "backbone.weights=null", "backbone.pretrained=true")
    assert "uses pretrained (timm&#x27;s default weights) instead" in html


def test_a_stage_that_has_not_run_is_said_so(tmp_path: Path) -> None:
    html = _section(tmp_path)  # no such folder
    assert PRETRAIN_TITLE in html and "the pretrain stage has not run" in html and "<table" not in html
    assert f"no {tmp_path / 'pretrain'}/metrics.json" in html

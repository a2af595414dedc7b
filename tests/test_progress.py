"""dinoalign's own progress lines (dinoalign.progress): plain lines on stderr, a line at
most every ``every_s`` while a loop runs and one for its last item; the evaluate stage's
segmentation loops print them."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from dinoalign.progress import Progress


def test_a_line_per_interval_and_one_at_the_end() -> None:
    out = io.StringIO()
    tick = Progress("evaluate: segmentation", 5, file=out, every_s=math.inf)
    for done in range(1, 6):
        tick(done)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("evaluate: segmentation 5/5 images (") and "\x1b" not in line and "\r" not in line
    out = io.StringIO()
    tick = Progress("evaluate: segmentation", 5, file=out, every_s=0.0)
    for done in range(1, 6):
        tick(done)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        f"evaluate: segmentation {i}/5 images" for i in range(1, 6)
    ]


def test_segmentation_evaluation_says_how_far_it_is(capsys) -> None:
    from dinoalign.evaluate.segmentation import evaluate_segmentation

    class Tiny:
        class_names = ["background", "red circle"]
        has_background = True

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), f"im{i}"

    result = evaluate_segmentation(Tiny(), lambda image: torch.zeros(4, 4, dtype=torch.long))
    assert result["num_images"] == 3
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays for what commands print as results
    assert captured.err.startswith("evaluate: segmentation 3/3 images (")

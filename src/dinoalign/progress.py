"""dinoalign's own progress for long loops: plain lines, one per event, that read the
same in a terminal and in a log file (no bars, no carriage returns, no colour).

    tick = Progress("evaluate: segmentation", len(items))
    for i, item in enumerate(items):
        ...
        tick(i + 1)

prints ``evaluate: segmentation 40/180 images (3.1 images/s, 13 s)`` at most once every
``every_s`` seconds while it runs and once when the last item is done. Lines go to
stderr: commands that print JSON on stdout (``dinoalign retrain``, ``classify``) keep it
clean, and ``dvc repro`` shows both.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# a running loop says where it is this often; the last item always gets its line
EVERY_S = 30.0


class Progress:
    """Call with the number of items done after each item."""

    def __init__(self, label: str, total: int, unit: str = "images", every_s: float = EVERY_S,
                 file: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
        self.file = file
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        print(f"{self.label} {done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, {elapsed:.0f} s)",
              file=self.file or sys.stderr, flush=True)

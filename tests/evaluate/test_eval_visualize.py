"""Pictures the evaluation writes: colours that agree with colour-named classes, confusion
charts with class names and a colour scale (issue #17)."""

from __future__ import annotations

import colorsys
import io
import re

import numpy as np
from PIL import Image

from dinoalign.data.synthetic import CLASSES, COLOURS
from dinoalign.evaluate.visualize import class_palette, confusion_chart, label_palette


def test_a_colour_named_class_is_drawn_in_its_colour() -> None:
    names = ["background", *CLASSES]
    palette = class_palette(names, background=True).astype(int)
    assert palette[0].tolist() == [40, 40, 40]
    for i, name in enumerate(CLASSES, start=1):
        # the hue of its colour word (shaded darker or lighter apart from its siblings)
        own = colorsys.rgb_to_hsv(*(np.asarray(COLOURS[name.split()[0]]) / 255))
        drawn = colorsys.rgb_to_hsv(*(palette[i] / 255))
        assert abs(drawn[0] - own[0]) < 0.01 and drawn[1] > 0.5 and drawn[2] > 0.3, (name, palette[i])
    assert len({tuple(c) for c in palette.tolist()}) == len(names)  # every class its own colour
    # names without a colour word keep the hue palette
    plain = ["background", "cat", "dog"]
    assert class_palette(plain, background=True).tolist() == label_palette(3, background=True).tolist()


def test_confusion_chart_names_the_classes_and_has_a_colour_scale() -> None:
    counts = np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]])
    labels = ["background", "red circle", "blue star"]
    svg = confusion_chart(counts, labels, "pixel confusion (seen)", fmt="svg").decode()
    words = re.findall(r">([^<>]+)</text>", svg)
    assert all(words.count(n) == 2 for n in labels)  # both axes
    assert {"predicted", "ground truth", "share of the row (recall)", "pixel confusion (seen)"} <= set(words)
    assert "1.0" in words and "0.0" in words  # the colour scale's ends
    with Image.open(io.BytesIO(confusion_chart(counts, labels, "x"))) as png:
        assert png.size[0] == png.size[1] >= 500

"""Pictures of segmentations, confusion matrices and training curves: label colours
(a class named after a colour is drawn in it), overlays, side-by-side panels with a
legend (PIL), and matplotlib charts with axes, ticks, legends and colour scales, rendered
offline to PNG or SVG bytes (no pyplot, no display)."""

from __future__ import annotations

import colorsys
import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dinoalign.data.synthetic import COLOURS as DEMO_COLOURS

PANEL_GAP = 4


def label_palette(num_labels: int, background: bool = False) -> np.ndarray:
    """num_labels×3 uint8 colours, far apart in hue (golden-ratio steps); with
    ``background`` label 0 is dark grey."""
    colours = []
    for i in range(num_labels):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.75
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, value)])
    palette = np.asarray(colours, dtype=np.uint8).reshape(num_labels, 3)
    if background and num_labels:
        palette[0] = (40, 40, 40)
    return palette


# Colour words a class name may hold (the demo world's "red circle"): such a class is
# drawn in its colour, so that a picture never paints a "red star" blue. The demo's six
# come from the generator (dinoalign.data.synthetic.COLOURS).
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    **DEMO_COLOURS,
    "pink": (240, 110, 170),
    "brown": (140, 85, 40),
    "cyan": (30, 200, 210),
    "magenta": (220, 40, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
}


def class_palette(names: Sequence[str], background: bool = False) -> np.ndarray:
    """len(names)×3 uint8 colours: a class whose name holds a colour word
    (:data:`NAMED_COLOURS`) in that colour, the classes sharing one in shades of it from
    dark to light (``red circle`` … ``red star``); the others as :func:`label_palette`;
    with ``background`` label 0 dark grey."""
    palette = label_palette(len(names), background)
    named: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if background and i == 0:
            continue
        word = next((w for w in str(name).lower().replace("-", " ").split() if w in NAMED_COLOURS), None)
        if word is not None:
            named.setdefault(word, []).append(i)
    for word, indices in named.items():
        base = np.asarray(NAMED_COLOURS[word], dtype=np.float64)
        for rank, i in enumerate(indices):
            # darker to lighter at the same hue, never so light that red reads as pink
            shade = 0.0 if len(indices) == 1 else 0.65 * rank / (len(indices) - 1) - 0.45
            colour = base * (1 + shade) if shade < 0 else base + (255 - base) * shade
            palette[i] = colour.round().clip(0, 255).astype(np.uint8)
    return palette


def colorize(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """H×W label ids -> H×W×3 uint8 colours; ``ignore_index`` pixels are white."""
    out = np.full((*label.shape, 3), 255, dtype=np.uint8)
    valid = (label != ignore_index) & (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


def overlay(
    image: np.ndarray,
    label: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.6,
    keep: Sequence[int] = (),
) -> np.ndarray:
    """Blend the label colours over an H×W×3 uint8 image (``alpha`` = colour weight);
    pixels whose label is in ``keep`` (e.g. the background, 0) show the image as is."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(label, palette).astype(
        np.float32
    )
    kept = np.isin(label, list(keep))
    blended[kept] = image[kept]
    return blended.round().clip(0, 255).astype(np.uint8)


def panels(images: Sequence[np.ndarray], titles: Sequence[str] = ()) -> Image.Image:
    """Same-height H×W×3 images side by side on white, each under its title."""
    font = ImageFont.load_default()
    title_height = 14 if titles else 0
    height = max(img.shape[0] for img in images)
    width = sum(img.shape[1] for img in images) + PANEL_GAP * (len(images) - 1)
    canvas = Image.new("RGB", (width, height + title_height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, img in enumerate(images):
        canvas.paste(Image.fromarray(img), (x, title_height))
        if i < len(titles):
            draw.text((x + 2, 1), titles[i], fill=(0, 0, 0), font=font)
        x += img.shape[1] + PANEL_GAP
    return canvas


def with_legend(
    picture: Image.Image, names: Sequence[str], palette: np.ndarray, present: Sequence[int]
) -> Image.Image:
    """``picture`` with a colour key of the labels in ``present`` below it."""
    font = ImageFont.load_default(size=12)
    row = 16
    rows = [i for i in present if 0 <= i < len(names)]
    canvas = Image.new(
        "RGB", (max(picture.width, 180), picture.height + row * len(rows) + 4), "white"
    )
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, label in enumerate(rows):
        y = picture.height + 2 + n * row
        draw.rectangle((2, y + 2, 14, y + 13), fill=tuple(int(c) for c in palette[label]), outline=(0, 0, 0))
        draw.text((18, y), f"{label}: {names[label]}", fill=(0, 0, 0), font=font)
    return canvas


def png_bytes(picture: Image.Image | np.ndarray) -> bytes:
    """PNG encoding of a PIL image or an H×W[×3] uint8 array."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- charts


def _figure(width: float, height: float):  # noqa: ANN202 (matplotlib imported lazily)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _encoded(figure, fmt: str) -> bytes:  # noqa: ANN001
    import matplotlib

    buffer = io.BytesIO()
    # no date and a fixed id salt: the same chart gives the same bytes; SVG text stays
    # <text> (DejaVu Sans, else the browser's sans-serif): smaller and searchable
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dinoalign"}):
        figure.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buffer.getvalue()


def confusion_chart(
    counts: np.ndarray, labels: Sequence[str], title: str, fmt: str = "png", size: float = 7.0
) -> bytes:
    """A K×K count matrix (rows ground truth, columns prediction) as a square heat map of
    row shares (each row's recall; a row without pixels stays 0) with the class names on
    both axes and a colour scale, PNG or SVG bytes."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    figure = _figure(size, size)
    ax = figure.subplots()
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = np.arange(len(labels))
    font = max(4.0, min(9.0, 260 / max(len(labels), 1)))
    ax.set_xticks(ticks, [str(n) for n in labels], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [str(n) for n in labels], fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    figure.colorbar(shown, ax=ax, shrink=0.8, label="share of the row (recall)")
    return _encoded(figure, fmt)


def curve_chart(
    x: Sequence[float],
    left: Mapping[str, Sequence[float]],
    right: Mapping[str, Sequence[float]] | None = None,
    x_label: str = "step",
    left_label: str = "loss",
    right_label: str = "learning rate",
    title: str = "",
    references: Mapping[str, float] | None = None,
    left_min: float | None = None,
    legend_loc: str = "upper right",
    integer_x: bool = False,
) -> bytes:
    """Line chart (SVG bytes) of the ``left`` series against ``x`` on the left axis and the
    ``right`` series (e.g. the learning rate, dashed) on a second axis on the right, with
    one legend for both. ``references``: horizontal dotted lines on the left axis (name ->
    value, e.g. the log K a collapsed DINO teacher's entropy reaches); ``left_min``: the
    bottom of the left axis (e.g. 0), else matplotlib's; ``legend_loc``: matplotlib's ``loc``;
    ``integer_x``: ticks only at whole numbers (ranks, epochs)."""
    figure = _figure(4.6, 2.9)
    ax = figure.subplots()
    lines = [ax.plot(x, values, label=name, linewidth=1.6)[0] for name, values in left.items()]
    lines += [ax.axhline(value, label=name, linestyle=":", linewidth=1.4, color="#555555")
              for name, value in (references or {}).items()]
    if left_min is not None:
        ax.set_ylim(bottom=left_min)
    ax.set_xlabel(x_label)
    ax.set_ylabel(left_label)
    ax.grid(alpha=0.3)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if right:
        twin = ax.twinx()
        colours = ("#d62728", "#9467bd", "#8c564b")
        lines += [
            twin.plot(x, values, label=name, linestyle="--", linewidth=1.2, color=colours[i % len(colours)])[0]
            for i, (name, values) in enumerate(right.items())
        ]
        twin.set_ylabel(right_label)
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc=legend_loc)
    return _encoded(figure, "svg")



def paired_bar_chart(labels: Sequence[str], before: Sequence[float], after: Sequence[float], title: str,
                     value_label: str, names: tuple[str, str] = ("before", "after")) -> bytes:
    """Horizontal bars (SVG bytes), two per label (``before`` light, ``after`` dark), in
    the given order from the top, with a legend and the value axis labelled: e.g. the
    captions matching each text-balancing entry before and after curation."""
    n = len(labels)
    figure = _figure(5.2, max(1.8, 0.22 * n + 1.0))
    ax = figure.subplots()
    rows = np.arange(n)
    ax.barh(rows - 0.2, before, height=0.4, label=names[0], color="#9ecae1")
    ax.barh(rows + 0.2, after, height=0.4, label=names[1], color="#3182bd")
    ax.set_yticks(rows, [str(label) for label in labels], fontsize=max(5.0, min(8.0, 300 / max(n, 1))))
    ax.invert_yaxis()  # the first label on top
    ax.set_xlabel(value_label)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _encoded(figure, "svg")

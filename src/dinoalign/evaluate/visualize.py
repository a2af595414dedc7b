"""Pictures of segmentations and confusion matrices, drawn with PIL only (no plotting
library): label colours, overlays, side-by-side panels with a legend, heat maps."""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
    font = ImageFont.load_default()
    row = 14
    rows = [i for i in present if 0 <= i < len(names)]
    canvas = Image.new(
        "RGB", (max(picture.width, 160), picture.height + row * len(rows) + 4), "white"
    )
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, label in enumerate(rows):
        y = picture.height + 2 + n * row
        draw.rectangle((2, y + 2, 12, y + 11), fill=tuple(int(c) for c in palette[label]))
        draw.text((16, y), f"{label}: {names[label]}", fill=(0, 0, 0), font=font)
    return canvas


def heatmap(matrix: np.ndarray, cell: int = 6) -> Image.Image:
    """A K×K count matrix as a picture: rows normalised to sum 1 (ground-truth recall),
    white = 0, dark blue = 1; each entry is a ``cell``×``cell`` square."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (low + share[..., None] * (high - low)).round().astype(np.uint8)
    return Image.fromarray(rgb).resize(
        (counts.shape[1] * cell, counts.shape[0] * cell), Image.Resampling.NEAREST
    )


def png_bytes(picture: Image.Image | np.ndarray) -> bytes:
    """PNG encoding of a PIL image or an H×W[×3] uint8 array."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()

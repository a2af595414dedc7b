"""Small image files that exercise every decode path, for the image and prepare tests.

``write_bad_corpus(dir)`` writes one file per failure kind and returns
``{file name: expected ImageRejected reason}``; ``write_good_corpus(dir)`` writes one
valid file per unusual pixel mode and returns ``{file name: expected decoded shape}``.
Both are meant to be decoded with ``max_pixels=CORPUS_MAX_PIXELS`` and
``min_side=CORPUS_MIN_SIDE``. The constants below describe the pixels of the good files
so that tests can compute the expected RGB values by hand.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS_MAX_PIXELS = 1_000_000
CORPUS_MIN_SIDE = 14

# good files are GOOD_WIDTH x GOOD_HEIGHT (landscape) unless said otherwise
GOOD_WIDTH, GOOD_HEIGHT = 32, 20
# exif_rotated.jpg: stored landscape, blue, with a red RED_BLOCK x RED_BLOCK square in the
# stored top-left corner, and EXIF orientation 6 (a viewer rotates it 90° clockwise)
RED_BLOCK = 8
# gray16.png: every row is GRAY16_ROW (16-bit grey), tiled across the width
GRAY16_ROW = np.array([0, 257, 65535, 32896, 128, 129, 65278, 1000], dtype=np.uint16)
# rgb48.png: every pixel is RGB48_PIXEL (16 bits per channel)
RGB48_PIXEL = (65535, 32896, 256)
# rgba.png columns [0, 8): RGBA_TRANSPARENT, [8, 16): RGBA_OPAQUE, [16, 32): RGBA_HALF
RGBA_TRANSPARENT = (10, 200, 30, 0)
RGBA_OPAQUE = (10, 20, 30, 255)
RGBA_HALF = (0, 0, 0, 128)
# palette_transparent.png: left half palette index 0 (transparent), right half index 1
PALETTE = (0, 0, 0, 255, 0, 0)  # index 0 black, index 1 red
# cmyk.jpg: every pixel is pure cyan
CMYK_PIXEL = (255, 0, 0, 0)
# grey.png: pixel (r, c) = 8 * c
# int32.tif: column c holds INT32_ROW[c % len]; float.tif: FLOAT_ROW likewise
INT32_ROW = np.array([-1000, 0, 1000, 99000], dtype=np.int32)
FLOAT_ROW = np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_bad_corpus(directory: Path) -> dict[str, str]:
    """Write the failure files into ``directory``; return file name -> expected reason."""
    jpeg = _encode(Image.fromarray(_noise((64, 64, 3))), "JPEG", quality=90)
    noisy_png = _encode(Image.fromarray(_noise((64, 64, 3))), "PNG")
    files = {
        "empty.jpg": (b"", "empty_file"),
        "text_named.jpg": (b"a cat on a mat, not an image at all\n" * 4, "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt_idat.png": (_flip_bytes(noisy_png, noisy_png.index(b"IDAT") + 60, 40), "corrupt"),
        "damaged_header.png": (PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" + b"\xff" * 30, "corrupt"),
        # the header claims 2000x2000 but the file ends inside its first rows (IEND and
        # the end of IDAT cut off): only a check of the header before decoding says
        # too_many_pixels rather than truncated
        "bomb_header.png": (
            png_bytes(2000, 2000, 8, 0, [bytes(2000)] * 4)[:-24],
            "too_many_pixels",
        ),
        # a real, complete 1-bit image over PIL's own hard limit: 48 kB on disk
        "bomb_20000.png": (png_bytes(20000, 20000, 1, 0, [bytes(2500)] * 20000), "too_many_pixels"),
        "tiny.png": (_encode(Image.new("RGB", (40, CORPUS_MIN_SIDE - 4)), "PNG"), "too_small"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (directory / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


def write_good_corpus(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Write one valid file per unusual mode; return file name -> decoded H×W×3 shape."""
    h, w = GOOD_HEIGHT, GOOD_WIDTH
    landscape = (h, w, 3)
    columns = np.arange(w)
    files = {
        "exif_rotated.jpg": (_exif_rotated_jpeg(), (w, h, 3)),
        "grey.png": (
            _encode(Image.fromarray(np.tile((8 * columns).astype(np.uint8), (h, 1))), "PNG"),
            landscape,
        ),
        "bilevel.png": (
            _encode(Image.fromarray(_checkerboard(h, w)).convert("1"), "PNG"),
            landscape,
        ),
        "palette_transparent.png": (_palette_png(h, w), landscape),
        "rgba.png": (_encode(Image.fromarray(_rgba_pixels(h, w), "RGBA"), "PNG"), landscape),
        "la.png": (_encode(Image.new("LA", (w, h), (0, 128)), "PNG"), landscape),
        "cmyk.jpg": (_encode(Image.new("CMYK", (w, h), CMYK_PIXEL), "JPEG", quality=95), landscape),
        "gray16.png": (_encode(Image.fromarray(_tile_row(GRAY16_ROW, h, w)), "PNG"), landscape),
        "rgb48.png": (
            png_bytes(w, h, 16, 2, [struct.pack(">3H", *RGB48_PIXEL) * w] * h),
            landscape,
        ),
        "int32.tif": (_encode(Image.fromarray(_tile_row(INT32_ROW, h, w)), "TIFF"), landscape),
        "float.tif": (_encode(Image.fromarray(_tile_row(FLOAT_ROW, h, w)), "TIFF"), landscape),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (directory / name).write_bytes(data)
    return {name: shape for name, (_, shape) in files.items()}


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _noise(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def _flip_bytes(data: bytes, start: int, count: int) -> bytes:
    damaged = bytearray(data)
    for i in range(start, start + count):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def png_bytes(
    width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]
) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, and a bomb must not be built in
    memory): each row gets filter byte 0; ``rows`` may hold fewer rows than ``height``."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _exif_rotated_jpeg() -> bytes:
    stored = np.zeros((GOOD_HEIGHT, GOOD_WIDTH, 3), dtype=np.uint8)
    stored[...] = (0, 0, 255)
    stored[:RED_BLOCK, :RED_BLOCK] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())


def _checkerboard(h: int, w: int) -> np.ndarray:
    rows, cols = np.indices((h, w))
    return (((rows + cols) % 2) * 255).astype(np.uint8)


def _palette_png(h: int, w: int) -> bytes:
    indices = np.zeros((h, w), dtype=np.uint8)
    indices[:, w // 2 :] = 1
    image = Image.fromarray(indices, "L").convert("P")
    image.putpalette(list(PALETTE))
    image.info["transparency"] = 0
    return _encode(image, "PNG", transparency=0)


def _rgba_pixels(h: int, w: int) -> np.ndarray:
    pixels = np.zeros((h, w, 4), dtype=np.uint8)
    pixels[:, :8] = RGBA_TRANSPARENT
    pixels[:, 8:16] = RGBA_OPAQUE
    pixels[:, 16:] = RGBA_HALF
    return pixels


def _tile_row(row: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.tile(row, (h, w // len(row) + 1))[:, :w]

"""Safe image decoding, validation and the resize/crop used to feed a ViT.

Inputs are untrusted (scraped tables, tar shards, user folders), so nothing here may crash
a run: every failure to produce pixels becomes an :class:`ImageRejected` whose ``reason``
is one of the short codes in :data:`REJECT_REASONS`. Callers turn it into a ``Reject`` row.

Decoding rules (:func:`decode_image`):

- Only the formats in :data:`ALLOWED_FORMATS` are opened. Others (EPS, which runs
  Ghostscript, and a long tail of rarely used plugins) are ``not_an_image``.
- The pixel count is checked from the header, before any pixel is decoded, against the
  caller's ``max_pixels``. PIL's own hard limit (``DecompressionBombError`` above
  2 x ``PIL.Image.MAX_IMAGE_PIXELS``) also gives ``too_many_pixels``. PIL's
  ``DecompressionBombWarning`` (above ``MAX_IMAGE_PIXELS``) is left to Python's warning
  filters, because silencing it per call (``warnings.catch_warnings``) is not thread-safe
  and images are decoded in threads; where warnings are errors it is caught like the
  error. Either way our ``max_pixels`` check decides.
- The read itself is bounded (:func:`load_image`, :func:`probe_image`): at most
  ``max_bytes`` bytes (``too_large``) and ``read_timeout_s`` seconds in all, connect to
  last byte (``read_timeout``), so a URL that trickles or never ends is a reject, not a
  hang or an out-of-memory kill.
- Long side / short side above ``max_aspect_ratio`` is ``extreme_aspect_ratio``, from the
  header. Together with ``max_pixels`` this bounds every later resize: a short side
  scaled to S gives at most S² x ``max_aspect_ratio`` pixels (a 14×1,000,000 strip would
  otherwise grow to gigabytes in a short-side resize, and to a 0-pixel side in the
  segmentation resize). :func:`resize_crop` also resizes only its crop window once the
  full resize would be huge, so its memory holds whatever the aspect ratio.
- The whole image is decoded (``Image.load``) so truncated files are caught.
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (its default) for that.
- EXIF orientation is applied, so arrays are upright as a viewer shows them.
- Every mode becomes H x W x 3 uint8 RGB. Transparent pixels are composited onto white:
  an alpha channel hides whatever colour lies under alpha 0 (often black or noise), and
  transparent web images (logos, product shots) are made to be seen on a white page.
  16-bit greyscale is scaled ``round(v / 257)`` so 0..65535 maps onto 0..255 exactly;
  32-bit integer images in 0..65535 get the same scaling, other ``I`` images and float
  images outside 0..1 are stretched from their own min..max; float images in 0..1 are
  multiplied by 255.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import time
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinoalign.storage import ReadTimedOut, ReadTooLarge, is_transient, read_bytes

REJECT_REASONS: dict[str, str] = {
    "missing": "the file or object does not exist",
    "empty_file": "the file has zero bytes",
    "not_an_image": "not an image in one of the allowed formats",
    "truncated": "the image data ends before the image is complete",
    "corrupt": "an image file whose header or data cannot be decoded",
    "too_many_pixels": "width x height above the pixel limit (decompression bomb), "
    "checked from the header before decoding",
    "too_small": "a side shorter than min_side (one ViT patch)",
    "unsupported_mode": "a pixel mode PIL cannot convert to RGB",
    "read_error": "an error reading the bytes that trying again will not mend (access denied, "
    "a bad request, an unreadable file)",
    "read_timeout": "the bytes did not arrive within read_timeout_s (a stalled or trickling "
    "server): the read is abandoned, not waited for; transient",
    "unavailable": "the source failed for now (HTTP 429 or 5xx, a refused or reset connection, "
    "S3 throttling or a server error); transient",
    "too_large": "more than max_bytes bytes (declared or streamed): the read stops at the cap",
    "extreme_aspect_ratio": "long side / short side above max_aspect_ratio, checked from the "
    "header before decoding",
}

# Reasons of a read that may succeed later: each read is tried again within the call
# (read_attempts, with backoff), and the embed stage retries their uids on its next run
# instead of remembering them as done.
TRANSIENT_REASONS = frozenset({"read_timeout", "unavailable"})

# Defaults of the read and shape bounds (DataConfig's; callers pass params.data's values).
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_READ_ATTEMPTS = 3
DEFAULT_READ_BACKOFF_S = 1.0
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_MAX_ASPECT_RATIO = 20.0

# resize_crop's centre mode resizes only the window its crop keeps when the full short-side
# resize would be larger than this (pixels; 48 MiB as RGB). Below it, the full resize as
# before; above it, only images too elongated to be normal (224 px: aspect > 334).
_FULL_RESIZE_MAX_PIXELS = 2**24

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")

Image.init()
# PIL raises KeyError for a format its build lacks (AVIF is optional): pass only known ones.
_OPENABLE_FORMATS = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Signatures of the allowed formats: bytes that start like an image but do not open are
# a damaged image ("corrupt"), not some other kind of file ("not_an_image").
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)
_RIFF_WEBP = (b"RIFF", b"WEBP")  # bytes 0:4 and 8:12
_AVIF_BRANDS = (b"ftypavif", b"ftypavis")  # bytes 4:12

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_LABEL_MAP_MODES = _SIXTEEN_BIT_MODES | {"P", "L", "1", "I"}
_WHITE_RGBA = (255, 255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS_SWAPPING_SIDES = frozenset({5, 6, 7, 8})


class ImageRejected(Exception):
    """An input that cannot become pixels; ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(
                f"unknown reject reason {reason!r}; use one of {sorted(REJECT_REASONS)}"
            )
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def image_limits(data: Any) -> dict[str, Any]:
    """The bounds of :func:`load_image` / :func:`probe_image` from a ``DataConfig``
    (``params.data``), as keyword arguments."""
    return {
        "max_pixels": data.max_pixels,
        "min_side": data.min_side,
        "max_aspect_ratio": data.max_aspect_ratio,
        "max_bytes": data.max_bytes,
        "read_timeout_s": data.read_timeout_s,
        "read_attempts": data.read_attempts,
        "read_backoff_s": data.read_backoff_s,
    }


def decode_image(
    data: bytes, *, max_pixels: int, min_side: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> np.ndarray:
    """Decode image bytes to an upright H×W×3 uint8 RGB array, or raise ImageRejected."""
    image = _open_validated(
        data, max_pixels=max_pixels, min_side=min_side, max_aspect_ratio=max_aspect_ratio
    )
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a malformed EXIF block can raise anything from struct/TiffTags
        raise ImageRejected("corrupt", f"unreadable EXIF orientation: {exc}") from None
    return _to_rgb_array(image)


def load_image(uri: str, **limits: Any) -> np.ndarray:
    """Read ``uri`` (local path, ``s3://``, ``http(s)://``) and decode it: H×W×3 uint8 RGB
    (:func:`load_image_sha256` without the hash; ``limits`` as there)."""
    return load_image_sha256(uri, **limits)[0]


def load_image_sha256(
    uri: str, *, max_pixels: int, min_side: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    read_attempts: int = DEFAULT_READ_ATTEMPTS,
    read_backoff_s: float = DEFAULT_READ_BACKOFF_S,
) -> tuple[np.ndarray, str]:
    """Read ``uri`` (local path, ``s3://``, ``http(s)://``), decode it (H×W×3 uint8 RGB) and
    hash the bytes decoded (sha256 hex: what the pixels were made from, the embed stage's
    content key).

    The read stops at ``max_bytes`` (``too_large``) or after ``read_timeout_s`` in all
    (``read_timeout``); see :func:`dinoalign.storage.read_bytes`. A transient failure
    (:data:`TRANSIENT_REASONS`) is tried ``read_attempts`` times in all, waiting
    ``read_backoff_s`` × 2^k (k = 0, 1, ...; jittered) between tries."""
    data = _read(uri, max_bytes, read_timeout_s, read_attempts, read_backoff_s)
    array = decode_image(data, max_pixels=max_pixels, min_side=min_side, max_aspect_ratio=max_aspect_ratio)
    return array, hashlib.sha256(data).hexdigest()


def probe_image(uri: str, **limits: Any) -> tuple[int, int]:
    """Validate ``uri`` with a full decode (truncation is caught) and return its upright
    ``(width, height)``, skipping the EXIF rotation and RGB conversion of the pixels
    (:func:`probe_image_sha256` without the hash). Reads as :func:`load_image` does."""
    return probe_image_sha256(uri, **limits)[0]


def probe_image_sha256(
    uri: str, *, max_pixels: int, min_side: int,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    read_attempts: int = DEFAULT_READ_ATTEMPTS,
    read_backoff_s: float = DEFAULT_READ_BACKOFF_S,
) -> tuple[tuple[int, int], str]:
    """:func:`probe_image` and the sha256 (hex) of the bytes it validated (the prepare
    stage records it in the pairs manifest as ``image_sha256``)."""
    data = _read(uri, max_bytes, read_timeout_s, read_attempts, read_backoff_s)
    return _probe(data, max_pixels, min_side, max_aspect_ratio), hashlib.sha256(data).hexdigest()


def image_sha256(
    uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    read_attempts: int = DEFAULT_READ_ATTEMPTS, read_backoff_s: float = DEFAULT_READ_BACKOFF_S, **_decode: Any,
) -> str:
    """The sha256 (hex) of the bytes at ``uri``, read as :func:`load_image` reads them
    (the decode bounds in ``_decode`` are accepted and unused); ImageRejected when
    unreadable."""
    return hashlib.sha256(_read(uri, max_bytes, read_timeout_s, read_attempts, read_backoff_s)).hexdigest()


def _probe(data: bytes, max_pixels: int, min_side: int, max_aspect_ratio: float) -> tuple[int, int]:
    image = _open_validated(data, max_pixels=max_pixels, min_side=min_side, max_aspect_ratio=max_aspect_ratio)
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception as exc:  # same malformed-EXIF failures as in decode_image
        raise ImageRejected("corrupt", f"unreadable EXIF orientation: {exc}") from None
    if orientation in _ORIENTATIONS_SWAPPING_SIDES:
        return height, width
    return width, height


def load_mask(uri: str) -> np.ndarray:
    """Read a label-map PNG as an H×W integer array of label indices.

    Palette (``P``) masks keep their palette indices (the labels), never their colours.
    8-bit masks come back as uint8, 16-bit ones as uint16/int32, 1-bit ones as 0/1 uint8.
    Colour masks are refused: map colours to indices before using them as labels.
    """
    data = _read(uri)
    try:
        mask = _open(data)
        _decode_all(mask)
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, f"{uri}: {exc.detail}") from None
    if mask.mode not in _LABEL_MAP_MODES:
        raise ImageRejected(
            "unsupported_mode",
            f"{uri} is a {mask.mode} image, not a label map: convert its colours to class "
            "indices and save it as a single-channel (L or P) PNG",
        )
    labels = np.array(mask)
    return labels.astype(np.uint8) if labels.dtype == bool else labels


def resize_short_side(array: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize H×W×C (C = 3 or 4) or H×W uint8 so the short side is ``size``; aspect ratio kept.

    The long side is ``int(size * long / short)`` (truncated, as torchvision's
    ``Resize(int)``), and PIL resampling is used (antialiased when shrinking), so the
    result matches torchvision's PIL path that the reference recipes were trained with.
    Returns the input itself when its short side already equals ``size``.
    """
    _check_uint8_image(array)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    height, width = array.shape[:2]
    short, long = min(height, width), max(height, width)
    if short == size:
        return array
    new_long = max(1, int(size * long / short))
    new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    resized = Image.fromarray(array).resize(
        (new_width, new_height), resample=_resample(interpolation)
    )
    return np.array(resized)


def center_crop(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Crop the centre ``size`` (int or ``(height, width)``) of an H×W[×C] array.

    Offsets are ``round((H - h) / 2)`` as in torchvision's ``CenterCrop``; the result is a
    contiguous h×w[×C] copy. The array must be at least as large as the crop.
    """
    _check_uint8_image(array)
    crop_height, crop_width = (size, size) if isinstance(size, int) else size
    height, width = array.shape[:2]
    if crop_height > height or crop_width > width or min(crop_height, crop_width) < 1:
        raise ValueError(
            f"cannot crop {crop_height}x{crop_width} from a {height}x{width} image: "
            "resize the short side to at least the crop size first (resize_crop does both)"
        )
    top = round((height - crop_height) / 2.0)
    left = round((width - crop_width) / 2.0)
    return np.ascontiguousarray(array[top : top + crop_height, left : left + crop_width])


CROP_MODES: tuple[str, ...] = ("center", "squash")


def resize_crop(
    array: np.ndarray,
    size: int,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    crop_mode: str = "center",
) -> np.ndarray:
    """timm's evaluation resize + crop: H×W×C uint8 -> size×size×C uint8.

    ``center`` (talk2dino's preprocessing at ``crop_pct`` 1): short side to
    ``floor(size / crop_pct)``, aspect ratio kept, then the centre ``size``×``size``;
    ``squash``: both sides to ``floor(size / crop_pct)``, then the centre crop.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale = math.floor(size / crop_pct)
    if crop_mode == "center":
        _check_uint8_image(array)
        height, width = array.shape[:2]
        short, long = min(height, width), max(height, width)
        if short != scale and scale * max(1, int(scale * long / short)) > _FULL_RESIZE_MAX_PIXELS:
            return _resize_centre_window(array, scale, size, interpolation)
        return center_crop(resize_short_side(array, scale, interpolation), size)
    if crop_mode == "squash":
        _check_uint8_image(array)
        if array.shape[:2] != (scale, scale):
            array = np.array(
                Image.fromarray(array).resize((scale, scale), resample=_resample(interpolation))
            )
        return center_crop(array, size)
    raise ValueError(
        f"unknown crop_mode {crop_mode!r}; use one of {list(CROP_MODES)} (timm's 'border' "
        "mode, which pads, is not supported)"
    )


# ----------------------------------------------------------------------------- internals


def _resize_centre_window(array: np.ndarray, scale: int, size: int, interpolation: str) -> np.ndarray:
    """``center_crop(resize_short_side(array, scale), size)`` without the full resize: PIL
    resamples only the ``size``×``size`` window the crop keeps (``box``: the same sample
    positions and filters, taps reaching outside the window included), so memory is
    size² whatever the aspect ratio, where the full resize of a 14×1,000,000 image to a
    short side of 448 would be 32,000,000 pixels long (43 GB). PIL may run its two
    passes (horizontal, vertical) in the other order than for the full image, and each
    pass rounds to 8 bits, so pixels can differ by a few grey levels from the full path
    (which such an image cannot afford anyway)."""
    height, width = array.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = max(1, int(scale * long / short))
    new_height, new_width = (scale, new_long) if height <= width else (new_long, scale)
    if not 1 <= size <= min(new_height, new_width):
        raise ValueError(f"cannot crop {size}x{size} from a {new_height}x{new_width} image")
    top = round((new_height - size) / 2.0)
    left = round((new_width - size) / 2.0)
    sy, sx = height / new_height, width / new_width
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    resized = Image.fromarray(array).resize((size, size), resample=_resample(interpolation), box=box)
    return np.array(resized)


def _read(uri: str, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
          attempts: int = DEFAULT_READ_ATTEMPTS, backoff_s: float = DEFAULT_READ_BACKOFF_S) -> bytes:
    """The bytes at ``uri``, tried up to ``attempts`` times while the failure is transient."""
    for attempt in range(1, attempts + 1):
        try:
            return _read_once(uri, max_bytes, timeout_s)
        except ImageRejected as exc:
            if exc.reason not in TRANSIENT_REASONS or attempt >= attempts:
                if attempt > 1:
                    exc.detail = f"{exc.detail} (tried {attempt} times)"
                raise
        # exponential backoff with jitter, so that workers do not retry a server in step
        time.sleep(backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")  # the loop returns or raises


def _read_once(uri: str, max_bytes: int, timeout_s: float) -> bytes:
    try:
        return read_bytes(uri, max_bytes=max_bytes, timeout_s=timeout_s)
    except FileNotFoundError:
        raise ImageRejected("missing", f"{uri} does not exist") from None
    except ReadTooLarge as exc:
        raise ImageRejected("too_large", str(exc)) from None
    except (ReadTimedOut, TimeoutError) as exc:  # TimeoutError: a client's own timeout
        raise ImageRejected("read_timeout", str(exc) or f"{uri}: {type(exc).__name__}") from None
    except Exception as exc:  # fsspec backends raise their own network/client error types
        reason = "unavailable" if is_transient(exc) else "read_error"
        raise ImageRejected(reason, f"{uri}: {type(exc).__name__}: {exc}") from None


def _open_validated(
    data: bytes, *, max_pixels: int, min_side: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
) -> Image.Image:
    """Open ``data``, check its size and shape from the header, then decode every pixel."""
    if max_pixels < 1 or min_side < 1:
        raise ValueError(
            f"max_pixels and min_side must be positive, got max_pixels={max_pixels}, "
            f"min_side={min_side}"
        )
    if not max_aspect_ratio >= 1:
        raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
    image = _open(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}",
        )
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}: a side is below min_side {min_side}")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageRejected(
            "extreme_aspect_ratio",
            f"{width}x{height}: aspect ratio {max(width, height) / min(width, height):.4g} > "
            f"max_aspect_ratio {max_aspect_ratio:g}",
        )
    _decode_all(image)
    return image


def _open(data: bytes) -> Image.Image:
    """Parse the header only (PIL opens lazily): size and mode are known, no pixels yet."""
    if not data:
        raise ImageRejected("empty_file", "0 bytes")
    try:
        return Image.open(io.BytesIO(data), formats=_OPENABLE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # the warning arrives here only where warnings are errors (python -W error)
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        if _has_image_signature(data):
            raise ImageRejected(
                "corrupt", "image signature present but the header is unreadable"
            ) from None
        raise ImageRejected(
            "not_an_image", f"not one of {', '.join(ALLOWED_FORMATS)} (starts with {data[:8]!r})"
        ) from None
    except Exception as exc:  # plugins raise SyntaxError, struct.error, ... on bad headers
        raise ImageRejected(_decode_failure_reason(exc), f"{type(exc).__name__}: {exc}") from None


def _decode_all(image: Image.Image) -> None:
    """Decode every pixel now, so truncated or damaged data is caught here."""
    try:
        image.load()
    except Exception as exc:  # decoders raise OSError, EOFError, ValueError, zlib errors...
        raise ImageRejected(_decode_failure_reason(exc), f"{type(exc).__name__}: {exc}") from None


def _has_image_signature(data: bytes) -> bool:
    return (
        data.startswith(_SIGNATURES)
        or (data[:4], data[8:12]) == _RIFF_WEBP
        or data[4:12] in _AVIF_BRANDS
    )


def _decode_failure_reason(exc: Exception) -> str:
    truncated = isinstance(exc, EOFError) or (isinstance(exc, OSError) and "truncated" in str(exc))
    return "truncated" if truncated else "corrupt"


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> H×W×3 uint8 RGB (see the module docstring for the rules)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        grey = _high_depth_to_uint8(np.asarray(image), image.mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    try:
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, _WHITE_RGBA)
            image = Image.alpha_composite(white, image.convert("RGBA"))
        rgb = image.convert("RGB") if image.mode != "RGB" else image
    except ValueError as exc:
        raise ImageRejected("unsupported_mode", f"mode {image.mode}: {exc}") from None
    # np.array, not asarray: PIL's buffer view is read-only, and torch.from_numpy warns on it
    return np.array(rgb)


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """H×W uint16/int32/float32 -> H×W uint8 by the scaling rules of the module docstring."""
    if mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            return np.round(values * 255.0).astype(np.uint8)
        return _stretch(values, low, high)
    wide = values.astype(np.int64)
    low, high = int(wide.min()), int(wide.max())
    if mode in _SIXTEEN_BIT_MODES or (low >= 0 and high <= 65535):
        # round(v * 255 / 65535) in integers: 0 -> 0, 257·k -> k, 65535 -> 255
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return _stretch(wide.astype(np.float64), low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; use one of {sorted(INTERPOLATIONS)}"
        ) from None


def _check_uint8_image(array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 numpy array, got {type(array).__name__} "
            f"{getattr(array, 'dtype', '')}: decode with decode_image/load_image first"
        )
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an H×W, H×W×3 or H×W×4 array, got shape {array.shape}")

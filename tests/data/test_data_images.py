"""Safe decoding, mode conversion, resize/crop and label-map loading (dinoalign.data.images)."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import badfiles
import numpy as np
import pytest
from PIL import Image

from dinoalign.data.images import (
    REJECT_REASONS,
    ImageRejected,
    center_crop,
    decode_image,
    load_image,
    load_mask,
    probe_image,
    resize_crop,
    resize_short_side,
)

LIMITS = {"max_pixels": badfiles.CORPUS_MAX_PIXELS, "min_side": badfiles.CORPUS_MIN_SIDE}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("bad")
    return directory, badfiles.write_bad_corpus(directory)


@pytest.fixture(scope="module")
def good_corpus(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, tuple[int, int, int]]]:
    directory = tmp_path_factory.mktemp("good")
    return directory, badfiles.write_good_corpus(directory)


def _decode_good(good_corpus: tuple[Path, dict], name: str) -> np.ndarray:
    directory, _ = good_corpus
    return decode_image((directory / name).read_bytes(), **LIMITS)


# ----------------------------------------------------------------------------- rejects


def test_every_bad_file_is_rejected_with_its_reason(
    bad_corpus: tuple[Path, dict[str, str]],
) -> None:
    directory, expected = bad_corpus
    assert set(expected.values()) <= set(REJECT_REASONS)
    for name, reason in expected.items():
        path = directory / name
        for decode, argument in (
            (decode_image, path.read_bytes()),
            (load_image, str(path)),
            (probe_image, str(path)),
        ):
            with pytest.raises(ImageRejected) as caught:
                decode(argument, **LIMITS)
            assert caught.value.reason == reason, f"{decode.__name__}({name}): {caught.value}"


def test_bomb_is_refused_from_the_header_before_decoding(
    bad_corpus: tuple[Path, dict[str, str]],
) -> None:
    directory, _ = bad_corpus
    data = (directory / "bomb_header.png").read_bytes()
    # with a limit above its claimed 2000x2000, the same file is decoded and found truncated
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=2000 * 2000, min_side=14)
    assert caught.value.reason == "truncated"
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=2000 * 2000 - 1, min_side=14)
    assert caught.value.reason == "too_many_pixels"


def test_pil_hard_bomb_limit_applies_even_above_the_callers_limit(
    bad_corpus: tuple[Path, dict[str, str]],
) -> None:
    directory, _ = bad_corpus
    with pytest.raises(ImageRejected) as caught:
        decode_image((directory / "bomb_20000.png").read_bytes(), max_pixels=10**12, min_side=1)
    assert caught.value.reason == "too_many_pixels"


def test_pil_bomb_warning_is_a_reject_only_where_warnings_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "big.png"  # 10000x10000 = 1e8 pixels: above PIL's warning threshold
    path.write_bytes(badfiles.png_bytes(10_000, 10_000, 1, 0, [bytes(1250)] * 10_000))
    with pytest.warns(Image.DecompressionBombWarning):
        assert probe_image(str(path), max_pixels=10**9, min_side=1) == (10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageRejected) as caught:
            probe_image(str(path), max_pixels=10**9, min_side=1)
    assert caught.value.reason == "too_many_pixels"


def test_min_side_boundary() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 14)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), max_pixels=10**6, min_side=14).shape == (14, 30, 3)
    with pytest.raises(ImageRejected, match="too_small"):
        decode_image(buffer.getvalue(), max_pixels=10**6, min_side=15)


def test_missing_and_unreadable_uris(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as caught:
        load_image(str(tmp_path / "nope.jpg"), **LIMITS)
    assert caught.value.reason == "missing"
    with pytest.raises(ImageRejected) as caught:
        load_image(str(tmp_path), **LIMITS)  # a directory cannot be read as bytes
    assert caught.value.reason == "read_error"


def test_image_rejected_is_picklable_and_checks_its_reason() -> None:
    rejected = pickle.loads(pickle.dumps(ImageRejected("truncated", "12 bytes missing")))
    assert (rejected.reason, rejected.detail, str(rejected)) == (
        "truncated",
        "12 bytes missing",
        "truncated: 12 bytes missing",
    )
    with pytest.raises(ValueError, match="unknown reject reason"):
        ImageRejected("broken")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        decode_image(b"x", max_pixels=0, min_side=14)


# ----------------------------------------------------------------------------- good modes


def test_every_good_file_decodes_to_rgb_uint8_of_the_expected_shape(
    good_corpus: tuple[Path, dict[str, tuple[int, int, int]]],
) -> None:
    directory, expected = good_corpus
    for name, shape in expected.items():
        array = load_image(str(directory / name), **LIMITS)
        assert array.dtype == np.uint8 and array.shape == shape, name
        assert array.flags.writeable and array.flags.c_contiguous, name
        assert probe_image(str(directory / name), **LIMITS) == (shape[1], shape[0]), name


def test_exif_orientation_is_applied(good_corpus: tuple[Path, dict]) -> None:
    upright = _decode_good(good_corpus, "exif_rotated.jpg").astype(int)
    block = badfiles.RED_BLOCK
    # orientation 6 = rotate 90° clockwise: the stored top-left corner goes top-right
    assert upright.shape == (badfiles.GOOD_WIDTH, badfiles.GOOD_HEIGHT, 3)
    top_right = upright[1 : block - 1, -block + 1 : -1].reshape(-1, 3).mean(0)
    top_left = upright[1 : block - 1, 1 : block - 1].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[2] < 50  # red (JPEG is lossy)
    assert top_left[0] < 50 and top_left[2] > 200  # blue


def test_sixteen_bit_grey_is_scaled_not_clipped(good_corpus: tuple[Path, dict]) -> None:
    array = _decode_good(good_corpus, "gray16.png")
    # round(v / 257) by hand for GRAY16_ROW = 0, 257, 65535, 32896, 128, 129, 65278, 1000
    assert array[0, :8, 0].tolist() == [0, 1, 255, 128, 0, 1, 254, 4]
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_sixteen_bit_rgb_keeps_the_high_byte(good_corpus: tuple[Path, dict]) -> None:
    array = _decode_good(good_corpus, "rgb48.png")
    # 65535 -> 255, 32896 = 0x8080 -> 128, 256 = 0x0100 -> 1 (clipping would give 255s)
    assert (array.reshape(-1, 3) == [255, 128, 1]).all()


def test_transparency_is_composited_on_white(good_corpus: tuple[Path, dict]) -> None:
    rgba = _decode_good(good_corpus, "rgba.png")
    assert (rgba[:, :8] == 255).all()  # alpha 0 hides (10, 200, 30)
    assert (rgba[:, 8:16] == [10, 20, 30]).all()  # opaque pixels keep their colour
    # black at alpha 128 over white: 255 * (1 - 128/255) = 127
    assert (rgba[:, 16:] == 127).all()
    assert (_decode_good(good_corpus, "la.png") == 127).all()
    palette = _decode_good(good_corpus, "palette_transparent.png")
    half = badfiles.GOOD_WIDTH // 2
    assert (palette[:, :half] == 255).all()  # transparent index 0 -> white, not black
    assert (palette[:, half:] == [255, 0, 0]).all()


def test_grey_bilevel_and_cmyk_become_rgb(good_corpus: tuple[Path, dict]) -> None:
    grey = _decode_good(good_corpus, "grey.png")
    assert (grey == (8 * np.arange(badfiles.GOOD_WIDTH))[None, :, None]).all()
    bilevel = _decode_good(good_corpus, "bilevel.png")
    rows, cols = np.indices(bilevel.shape[:2])
    assert (bilevel == (((rows + cols) % 2) * 255)[..., None]).all()
    cyan = _decode_good(good_corpus, "cmyk.jpg").reshape(-1, 3).astype(int)
    assert (np.abs(cyan - [0, 255, 255]) <= 3).all()


def test_int32_and_float_images_are_rescaled(good_corpus: tuple[Path, dict]) -> None:
    # int32 -1000..99000 is outside 16-bit: stretched, (v + 1000) * 255 / 100000 rounded
    assert _decode_good(good_corpus, "int32.tif")[0, :4, 0].tolist() == [0, 3, 5, 255]
    # float 0..1 times 255: 0, 63.75, 127.5, 255 rounded half to even
    assert _decode_good(good_corpus, "float.tif")[0, :4, 0].tolist() == [0, 64, 128, 255]


# ----------------------------------------------------------------------------- resize / crop


def test_resize_short_side_shapes_follow_torchvision() -> None:
    landscape = np.zeros((20, 32, 3), np.uint8)
    assert resize_short_side(landscape, 10).shape == (10, 16, 3)
    assert resize_short_side(np.zeros((32, 20, 3), np.uint8), 10).shape == (16, 10, 3)
    # long side int(2 * 7 / 3) = 4, truncated rather than rounded (4.67)
    assert resize_short_side(np.zeros((3, 7), np.uint8), 2).shape == (2, 4)
    assert resize_short_side(landscape, 20) is landscape


def test_box_downscale_averages_aligned_blocks() -> None:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    halved = resize_short_side(image, 2, "box").astype(float)
    by_hand = image.reshape(2, 2, 3, 2, 3).mean(axis=(1, 3))
    assert np.abs(halved - by_hand).max() <= 0.5


def test_nearest_resize_keeps_label_values() -> None:
    labels = np.kron(np.array([[0, 7], [255, 3]], np.uint8), np.ones((5, 5), np.uint8))
    resized = resize_short_side(labels, 40, "nearest")
    assert resized.shape == (40, 40) and set(np.unique(resized)) == {0, 3, 7, 255}


def test_center_crop_offsets_by_hand() -> None:
    image = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)
    # top = round(2 / 2) = 1, left = round(4 / 2) = 2
    assert (center_crop(image, 3) == image[1:4, 2:5]).all()
    # round() halves to even as in torchvision: (4 - 1) / 2 = 1.5 -> 2, (3 - 2) / 2 = 0.5 -> 0
    assert center_crop(np.arange(16, dtype=np.uint8).reshape(4, 4), 1).item() == 10
    assert (center_crop(np.arange(9, dtype=np.uint8).reshape(3, 3), 2) == [[0, 1], [3, 4]]).all()
    assert center_crop(np.zeros((6, 9, 3), np.uint8), (4, 5)).shape == (4, 5, 3)


def test_resize_crop_gives_square_outputs() -> None:
    for shape in [(20, 32, 3), (45, 17, 3), (28, 28, 3)]:
        assert resize_crop(np.zeros(shape, np.uint8), 14).shape == (14, 14, 3)


def test_resize_and_crop_errors_say_what_to_do() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown interpolation"):
        resize_short_side(image, 5, "cubic")
    with pytest.raises(ValueError, match="resize the short side"):
        center_crop(image, 11)
    with pytest.raises(ValueError, match="uint8"):
        resize_short_side(image.astype(np.float32), 5)
    with pytest.raises(ValueError, match="H×W×3"):
        resize_short_side(np.zeros((10, 10, 2), np.uint8), 5)


# ----------------------------------------------------------------------------- masks


def test_load_mask_keeps_palette_indices(tmp_path: Path) -> None:
    labels = np.array([[0, 5, 5], [255, 1, 0]], np.uint8)
    palette_mask = Image.fromarray(labels, "L").convert("P")
    palette_mask.putpalette([(i * 37) % 256 for i in range(768)])  # colours unlike the indices
    palette_mask.save(tmp_path / "p.png")
    Image.fromarray(labels).save(tmp_path / "l.png")
    for name in ("p.png", "l.png"):
        mask = load_mask(str(tmp_path / name))
        assert mask.dtype == np.uint8 and (mask == labels).all(), name


def test_load_mask_refuses_colour_images(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageRejected) as caught:
        load_mask(str(tmp_path / "rgb.png"))
    assert caught.value.reason == "unsupported_mode" and "single-channel" in caught.value.detail
    with pytest.raises(ImageRejected) as caught:
        load_mask(str(tmp_path / "absent.png"))
    assert caught.value.reason == "missing"

"""Sliding-window inference, resizing, background threshold and dataset evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoalign.evaluate.datasets import EVAL_DATASETS
from dinoalign.evaluate.metrics import ConfusionMatrix
from dinoalign.evaluate.segmentation import (
    SegmentationConfig,
    calibrate_bg_threshold,
    evaluate_segmentation,
    make_predictor,
    scored_class_names,
    segment,
    segment_scores,
    short_side_resize,
    sliding_window_logits,
    window_boxes,
)


def _coordinate_image(height: int, width: int) -> torch.Tensor:
    """1×3×H×W with channel 0 = row index, channel 1 = column index, channel 2 = 0."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([ys, xs, torch.zeros_like(ys)]).float()[None]


def test_window_boxes_clamp_the_last_row_and_column_like_mmseg():
    # H=10: starts 0,3,6 -> all fit; W=8: starts 0,3,6 -> the last one is clamped to 4..8
    rows = [(0, 4), (3, 7), (6, 10)]
    cols = [(0, 4), (3, 7), (4, 8)]
    assert window_boxes(10, 8, crop=4, stride=3) == [
        (y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols
    ]
    assert window_boxes(3, 2, crop=4, stride=3) == [(0, 3, 0, 2)]  # smaller than a crop
    assert window_boxes(448, 597, crop=448, stride=224) == [(0, 448, 0, 448), (0, 448, 149, 597)]


def test_sliding_window_merge_divides_sums_by_overlap_counts():
    height, width, crop, stride = 10, 8, 4, 3
    image = _coordinate_image(height, width)
    calls: list[int] = []

    def logits_fn(window: torch.Tensor) -> torch.Tensor:
        # coordinates pass through; channel 2 = the index of this window (per call)
        calls.append(len(calls))
        return torch.cat([window[:, :2], torch.full_like(window[:, :1], float(len(calls) - 1))], 1)

    merged = sliding_window_logits(image, logits_fn, 3, crop, stride)
    boxes = window_boxes(height, width, crop, stride)
    assert len(calls) == len(boxes) == 9
    assert torch.allclose(merged[0, :2], image[0, :2])  # same value from every window
    expected_ids = np.zeros((height, width))
    counts = np.zeros((height, width), dtype=int)
    for y in range(height):
        for x in range(width):
            covering = [
                i for i, (y1, y2, x1, x2) in enumerate(boxes) if y1 <= y < y2 and x1 <= x < x2
            ]
            counts[y, x] = len(covering)
            expected_ids[y, x] = sum(covering) / len(covering)
    assert counts.min() == 1 and counts.max() == 4  # the overlaps really vary
    np.testing.assert_allclose(merged[0, 2].numpy(), expected_ids, rtol=1e-6)


def test_sliding_window_upsamples_patch_grid_scores_to_the_window():
    height, width, crop, stride = 13, 11, 8, 4
    image = _coordinate_image(height, width)

    def patch_logits(window: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(window[:, :1], 4)  # 2×2 "patch grid" of mean row indices

    merged = sliding_window_logits(
        image, patch_logits, 1, crop, stride, align_corners=False
    )[0, 0].numpy()
    # bilinear (align_corners=False) of cell means of a ramp = the ramp, clamped to the
    # first/last cell centre (y1 + 1.5 .. y1 + 5.5) inside each window
    expected = np.zeros((height, width))
    boxes = window_boxes(height, width, crop, stride)
    for y in range(height):
        for x in range(width):
            values = [
                min(max(y, y1 + 1.5), y1 + 5.5)
                for y1, y2, x1, x2 in boxes
                if y1 <= y < y2 and x1 <= x < x2
            ]
            expected[y, x] = sum(values) / len(values)
    np.testing.assert_allclose(merged, expected, rtol=1e-5)


def test_sliding_window_upsamples_with_aligned_corners_by_default():
    """Talk2DINO upsamples the patch grid to the window with ``align_corners=True``: the
    first and last cell centres land on the window's first and last pixel, a straight
    line from y1 + 1.5 to y1 + 5.5 across the 8 rows of each window."""
    height, width, crop, stride = 13, 11, 8, 4
    image = _coordinate_image(height, width)

    def patch_logits(window: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(window[:, :1], 4)

    merged = sliding_window_logits(image, patch_logits, 1, crop, stride)[0, 0].numpy()
    expected = np.zeros((height, width))
    boxes = window_boxes(height, width, crop, stride)
    for y in range(height):
        for x in range(width):
            values = [
                y1 + 1.5 + 4.0 * (y - y1) / (crop - 1)
                for y1, y2, x1, x2 in boxes
                if y1 <= y < y2 and x1 <= x < x2
            ]
            expected[y, x] = sum(values) / len(values)
    np.testing.assert_allclose(merged, expected, rtol=1e-5)


def _official_slide_scores(image, logits_fn, crop, stride, short, max_long):
    """Written from mmseg 0.x ``EncoderDecoder.slide_inference`` (which the Talk2DINO/TCL
    evaluation runs, ``align_corners`` False) around Talk2DINO's
    ``DINOText.generate_masks`` (lorebianchi98/Talk2DINO, src/open_vocabulary_segmentation/
    models/dinotext/dinotext.py: patch-grid mask -> crop with bilinear
    ``align_corners=True``): grids, clamped windows, zero-padded sums over a count matrix,
    then a bilinear resize to the original shape with ``align_corners=False``."""
    h0, w0 = image.shape[-2:]
    factor = min(short / min(h0, w0), max_long / max(h0, w0))
    img = F.interpolate(
        image, size=(int(h0 * factor + 0.5), int(w0 * factor + 0.5)), mode="bilinear",
        align_corners=False,
    )
    h_img, w_img = img.shape[-2:]
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds, count = None, torch.zeros(1, 1, h_img, w_img)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            grid = logits_fn(img[:, :, y1:y2, x1:x2])
            mask = F.interpolate(grid, (y2 - y1, x2 - x1), mode="bilinear", align_corners=True)
            padded = F.pad(mask, (x1, w_img - x2, y1, h_img - y2))
            preds = padded if preds is None else preds + padded
            count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=(h0, w0), mode="bilinear", align_corners=False)


def test_segment_scores_use_the_official_pair_of_corner_settings():
    """Default settings = the official pair (windows True, output False): max abs
    difference to the mmseg + Talk2DINO computation <= 1e-5 on a random image; each of
    the two settings on its own changes the result, so both are really applied."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 37, 53, generator=g) * 255
    weights = torch.randn(4, 3, generator=g)

    def logits_fn(window: torch.Tensor) -> torch.Tensor:  # a 4-class score on a 4-px grid
        pooled = F.avg_pool2d(window / 255.0, 4)
        return torch.sigmoid(torch.einsum("nc,bchw->bnhw", weights, pooled - 0.5) * 3)

    cfg = SegmentationConfig(short_side=24, max_long_side=64, crop=16, stride=10)
    assert cfg.window_align_corners is True and cfg.output_align_corners is False
    ours = segment_scores(image, logits_fn, 4, cfg)
    official = _official_slide_scores(image, logits_fn, 16, 10, 24, 64)
    assert ours.shape == official.shape == (1, 4, 37, 53)
    assert (ours - official).abs().max().item() <= 1e-5
    for change in ({"window_align_corners": False}, {"output_align_corners": True}):
        other = segment_scores(image, logits_fn, 4, dataclasses.replace(cfg, **change))
        assert (other - official).abs().max().item() > 1e-3


def test_sliding_window_checks_logits_shape():
    with pytest.raises(ValueError, match="expected 1×3"):
        sliding_window_logits(torch.zeros(1, 3, 8, 8), lambda w: torch.zeros(1, 2, 2, 2), 3, 8, 4)


def test_short_side_resize_follows_mmcv_rescale():
    assert short_side_resize(torch.zeros(1, 3, 375, 500), 448, 2048).shape[-2:] == (448, 597)
    # the long-side cap binds: factor 2.048, 204.8 rounds half up to 205
    assert short_side_resize(torch.zeros(1, 3, 100, 1000), 448, 2048).shape[-2:] == (205, 2048)
    assert short_side_resize(torch.zeros(1, 3, 600, 300), 448, 2048).shape[-2:] == (896, 448)
    flat = short_side_resize(torch.full((2, 3, 4, 5), 7.0), short=6, max_long=20)
    assert flat.shape == (2, 3, 6, 8)
    assert torch.allclose(flat, torch.full_like(flat, 7.0))


def _three_region_image() -> torch.Tensor:
    """1×3×12×12: left third red (class 1), middle green (class 2), right dark (neither)."""
    image = torch.zeros(1, 3, 12, 12)
    image[0, 0, :, :4] = 230
    image[0, 1, :, 4:8] = 230
    image[0, :2, :, 8:] = 60
    return image


def _red_green_scores(window: torch.Tensor) -> torch.Tensor:
    return window[:, :2] / 255.0


def test_segment_background_threshold_adds_label_zero():
    cfg = SegmentationConfig(short_side=12, max_long_side=64, crop=12, stride=6, bg_threshold=0.5)
    labels = segment(
        _three_region_image(), _red_green_scores, 2, cfg, bg_threshold=cfg.bg_threshold
    )
    expected = torch.zeros(1, 12, 12, dtype=torch.long)
    expected[..., :4] = 1
    expected[..., 4:8] = 2
    assert torch.equal(labels, expected)
    # without a threshold the dark region goes to the larger of two equal scores: class 0
    no_bg = segment(_three_region_image(), _red_green_scores, 2, cfg, bg_threshold=None)
    assert torch.equal(no_bg[..., :8], expected[..., :8] - 1)


def test_segment_resizes_back_and_runs_pamr_per_window():
    image = F.interpolate(_three_region_image(), size=(20, 30), mode="nearest")
    cfg = SegmentationConfig(
        short_side=10, max_long_side=64, crop=8, stride=4, bg_threshold=0.5, pamr=True
    )
    labels = segment(image, _red_green_scores, 2, cfg, bg_threshold=0.5)
    assert labels.shape == (1, 20, 30)
    # region interiors survive downsizing, windows, PAMR and upsizing
    assert (labels[0, :, 2:8] == 1).all() and (labels[0, :, 12:18] == 2).all()
    assert (labels[0, :, 23:] == 0).all()


def test_config_rejects_gaps_between_windows():
    with pytest.raises(ValueError, match="stride"):
        SegmentationConfig(crop=8, stride=9)


def _write_folder_dataset(root: Path, labels: list[np.ndarray], images: list[np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("background\nred thing\ngreen thing\n")
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"img{i}.png")


def test_evaluate_segmentation_on_a_folder_dataset_and_saves_predictions(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = [], []
    for height, width in [(12, 16), (10, 9)]:
        label = rng.integers(0, 3, size=(height, width))
        image = np.zeros((height, width, 3), dtype=np.uint8)
        image[label == 1, 0] = 230  # red = class 1, green = class 2, black = background
        image[label == 2, 1] = 230
        # the GT disagrees with the colours on some pixels; others are ignored
        noisy = label.copy()
        flip = rng.random((height, width)) < 0.2
        noisy[flip] = (noisy[flip] + 1) % 3
        noisy[rng.random((height, width)) < 0.1] = 255
        images.append(image)
        labels.append(noisy)
        assert (noisy[noisy != 255] != label[noisy != 255]).any()
    _write_folder_dataset(tmp_path / "ds", labels, images)
    dataset = EVAL_DATASETS.build(
        "folder", str(tmp_path / "ds"), image_suffix=".png", has_background=True
    )
    cfg = SegmentationConfig(short_side=8, max_long_side=64, crop=8, stride=4, bg_threshold=0.5)
    assert scored_class_names(dataset, cfg) == ["red thing", "green thing"]
    predictor = make_predictor(_red_green_scores, dataset, cfg)
    result = evaluate_segmentation(dataset, predictor, save_dir=str(tmp_path / "pred"))

    predictions = [np.asarray(Image.open(tmp_path / "pred" / f"img{i}.png")) for i in range(2)]
    for pred, image in zip(predictions, images):
        assert pred.shape == image.shape[:2]
    # independent tally over both images
    tp, fp, fn = np.zeros(3), np.zeros(3), np.zeros(3)
    for pred, gt in zip(predictions, labels):
        keep = gt != 255
        for c in range(3):
            tp[c] += ((pred == c) & (gt == c) & keep).sum()
            fp[c] += ((pred == c) & (gt != c) & keep).sum()
            fn[c] += ((pred != c) & (gt == c) & keep).sum()
    iou = tp / (tp + fp + fn)
    assert result["per_class_iou"] == pytest.approx(dict(zip(dataset.class_names, iou)))
    assert result["mIoU"] == pytest.approx(iou.mean())
    assert 0.4 < result["mIoU"] < 0.95  # imperfect on purpose, far from chance
    assert result["chance_mIoU"] < 0.3
    assert result["num_images"] == 2
    only_first = evaluate_segmentation(dataset, predictor, max_images=1)
    assert only_first["num_images"] == 1


def test_calibrated_background_threshold_is_the_best_full_segmentation_on_the_grid(tmp_path):
    rng = np.random.default_rng(4)
    images, labels = [], []
    for height, width in [(12, 16), (10, 9), (14, 14)]:
        label = rng.integers(0, 3, size=(height, width))
        image = np.zeros((height, width, 3), dtype=np.uint8)
        # class evidence of varying strength: the best threshold is somewhere inside
        image[..., 0] = np.where(label == 1, 150, 60) + rng.integers(0, 90, (height, width))
        image[..., 1] = np.where(label == 2, 150, 60) + rng.integers(0, 90, (height, width))
        images.append(image)
        labels.append(label)
    _write_folder_dataset(tmp_path / "ds", labels, images)
    dataset = EVAL_DATASETS.build(
        "folder", str(tmp_path / "ds"), image_suffix=".png", has_background=True
    )
    cfg = SegmentationConfig(short_side=8, max_long_side=64, crop=8, stride=4, bg_threshold=0.5)
    best, grid = calibrate_bg_threshold(dataset, _red_green_scores, cfg, candidates=9)
    assert len(grid) == 9 and best in grid
    for threshold, miou in grid.items():  # the shortcut equals running segment() per threshold
        confusion = ConfusionMatrix(3)
        for image, label, _name in dataset:
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            confusion.update(segment(pixels, _red_green_scores, 2, cfg, threshold)[0], label)
        assert miou == pytest.approx(confusion.miou())
    assert grid[best] == max(grid.values()) and len(set(grid.values())) > 1
    with pytest.raises(ValueError, match="background class"):
        calibrate_bg_threshold(
            EVAL_DATASETS.build("folder", str(tmp_path / "ds"), image_suffix=".png"),
            _red_green_scores,
            cfg,
        )


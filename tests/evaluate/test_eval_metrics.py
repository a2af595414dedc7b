"""Metrics against by-hand computations (python loops) and chance levels against Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinoalign.evaluate.metrics import (
    ConfusionMatrix,
    chance_miou,
    chance_recall_at_k,
    chance_topk,
    mean_per_class_recall,
    positive_ranks,
    recall_at_k,
    topk_accuracy,
)


def _loop_iou(pairs: list[tuple[np.ndarray, np.ndarray]], k: int, ignore: int = 255) -> list[float]:
    tp, fp, fn = [0] * k, [0] * k, [0] * k
    for pred, gt in pairs:
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g == ignore:
                continue
            if p == g:
                tp[g] += 1
            else:
                fp[p] += 1
                fn[g] += 1
    return [
        tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(k)
    ]


def test_confusion_matrix_matches_loops_over_images_with_ignore_and_absent_class():
    rng = np.random.default_rng(0)
    k = 5
    pairs = []
    for shape in [(6, 7), (5, 9), (8, 3)]:
        # class 4 appears nowhere: its IoU must be NaN and left out of the mean
        gt = rng.integers(0, 4, size=shape)
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, 4, size=shape)
        pairs.append((pred, gt))
    cm = ConfusionMatrix(k)
    for pred, gt in pairs:
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    expected = _loop_iou(pairs, k)
    got = cm.iou().tolist()
    assert math.isnan(got[4]) and math.isnan(expected[4])
    assert got[:4] == pytest.approx(expected[:4], abs=1e-12)
    assert cm.miou() == pytest.approx(sum(expected[:4]) / 4, abs=1e-12)
    valid = [(p[g != 255], g[g != 255]) for p, g in pairs]
    correct = sum(int((p == g).sum()) for p, g in valid)
    total = sum(g.size for _, g in valid)
    assert cm.pixel_accuracy() == pytest.approx(correct / total)
    recall = [
        sum(int(((p == c) & (g == c)).sum()) for p, g in valid)
        / sum(int((g == c).sum()) for _, g in valid)
        for c in range(4)
    ]
    assert cm.mean_accuracy() == pytest.approx(sum(recall) / 4)
    assert cm.gt_pixel_counts().tolist() == [
        sum(int((g == c).sum()) for _, g in valid) for c in range(k)
    ]


def test_miou_small_worked_example():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 255]))
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 predicted only on an
    # ignored pixel -> absent -> NaN
    iou = cm.iou().tolist()
    assert iou[:2] == pytest.approx([0.5, 2 / 3])
    assert math.isnan(iou[2])
    assert cm.miou() == pytest.approx(7 / 12)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 1]), torch.tensor([0, 0]))
    assert cm.iou().tolist() == [0.0, 0.0]
    assert cm.miou() == 0.0


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (torch.tensor([0, 1]), torch.tensor([0, 7]), "outside"),
        (torch.tensor([0, 9]), torch.tensor([0, 1]), "predictions"),
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred, gt, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ConfusionMatrix(3).update(pred, gt)


def test_confusion_matrix_rejects_ignore_index_inside_classes():
    with pytest.raises(ValueError, match="ignore"):
        ConfusionMatrix(300, ignore_index=255)


def test_topk_accuracy_and_mean_per_class_recall_by_hand():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.3],  # label 0: rank 0
            [0.2, 0.8, 0.5, 0.1],  # label 2: rank 1
            [0.1, 0.2, 0.3, 0.4],  # label 0: rank 3
            [0.5, 0.6, 0.7, 0.1],  # label 2: rank 0
            [0.3, 0.2, 0.1, 0.0],  # label 1: rank 1
        ]
    )
    labels = torch.tensor([0, 2, 0, 2, 1])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 4))
    assert acc == {1: pytest.approx(2 / 5), 2: pytest.approx(4 / 5), 4: pytest.approx(1.0)}
    # class 0: 1/2, class 1: 0/1, class 2: 1/2; class 3 absent -> not averaged
    assert mean_per_class_recall(logits, labels) == pytest.approx((0.5 + 0.0 + 0.5) / 3)


def test_topk_ties_count_against_the_true_class():
    logits = torch.zeros(4, 3)
    assert topk_accuracy(logits, torch.tensor([0, 1, 2, 0]), ks=(1, 2, 3)) == {
        1: 0.0,
        2: 0.0,
        3: 1.0,
    }


def _brute_force_recall(sim: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    hits = 0
    for q in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda g: -float(sim[q, g]))
        hits += any(bool(positives[q, g]) for g in order[:k])
    return hits / sim.shape[0]


def test_recall_at_k_matches_brute_force_with_several_captions_per_image():
    gen = torch.Generator().manual_seed(1)
    n_images = 12
    caption_owner = torch.tensor([i for i in range(n_images) for _ in range(1 + i % 3)])
    image_emb = torch.randn(n_images, 8, generator=gen)
    text_emb = image_emb[caption_owner] + 1.5 * torch.randn(len(caption_owner), 8, generator=gen)
    sim = image_emb @ text_emb.T  # images × captions
    i2t_pos = caption_owner[None, :] == torch.arange(n_images)[:, None]
    for sim_q, pos_q in ((sim, i2t_pos), (sim.T, i2t_pos.T)):
        got = recall_at_k(sim_q, pos_q, ks=(1, 3, 5, 10))
        for k in (1, 3, 5, 10):
            assert got[k] == pytest.approx(_brute_force_recall(sim_q, pos_q, k))
    # not trivial: the noise keeps R@1 away from both 0 and 1
    assert 0 < recall_at_k(sim, i2t_pos, ks=(1,))[1] < 1


def test_positive_ranks_ties_and_errors():
    sim = torch.ones(2, 4)
    positives = torch.tensor([[True, False, False, False], [False, True, True, False]])
    assert positive_ranks(sim, positives).tolist() == [3, 2]
    with pytest.raises(ValueError, match="no positive"):
        positive_ranks(sim, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite"):
        positive_ranks(torch.full((2, 4), math.nan), positives)


def test_chance_recall_at_k_is_the_hypergeometric_tail_and_matches_monte_carlo():
    n, pos, k = 20, 3, 5
    assert chance_recall_at_k(n, pos, k) == pytest.approx(
        1 - math.comb(n - pos, k) / math.comb(n, k)
    )
    assert chance_recall_at_k(n, pos, 18) == 1.0
    assert chance_recall_at_k(10, 1, 3) == pytest.approx(0.3)
    trials = 20000
    gen = torch.Generator().manual_seed(0)
    order = torch.rand(trials, n, generator=gen).argsort(1)  # random rankings of the gallery
    hit = (order[:, :k] < pos).any(1).double().mean().item()  # items 0..pos-1 are the positives
    assert hit == pytest.approx(chance_recall_at_k(n, pos, k), abs=0.015)


def test_chance_topk_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    logits = torch.rand(20000, 7, generator=gen)
    labels = torch.randint(0, 7, (20000,), generator=gen)
    measured = topk_accuracy(logits, labels, ks=(1, 3))
    assert measured[1] == pytest.approx(chance_topk(7, 1), abs=0.012)
    assert measured[3] == pytest.approx(chance_topk(7, 3), abs=0.015)
    assert chance_topk(3, 5) == 1.0


def test_chance_miou_matches_a_random_uniform_predictor():
    gen = torch.Generator().manual_seed(0)
    freqs = torch.tensor([0.55, 0.3, 0.1, 0.05, 0.0])  # the last class never occurs in GT
    n_pixels = 400_000
    gt = torch.multinomial(freqs, n_pixels, replacement=True, generator=gen)
    pred = torch.randint(0, 5, (n_pixels,), generator=gen)
    cm = ConfusionMatrix(5)
    cm.update(pred, gt)
    analytic = chance_miou(cm.gt_pixel_counts())
    assert cm.miou() == pytest.approx(analytic, abs=0.003)
    # by hand from the frequencies: p / (1 + (K-1) p)
    assert chance_miou([55, 30, 10, 5, 0]) == pytest.approx(
        sum(p / (1 + 4 * p) for p in (0.55, 0.3, 0.1, 0.05, 0.0)) / 5
    )
    with pytest.raises(ValueError, match="zero"):
        chance_miou([0, 0])

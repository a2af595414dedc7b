"""Exact evaluation metrics and the chance level of each.

Segmentation follows mmseg: one confusion matrix accumulated over all pixels of all
images (ignore index excluded), IoU per class = TP / (TP + FP + FN), NaN for a class that
is absent from both ground truth and prediction, mIoU = mean over the non-NaN classes.

Ranking metrics (top-k accuracy, recall@k) count ties against the query: a target is
ranked below every competitor that scores at least as high. Without ties this equals the
usual ``torch.topk`` definition; with ties (e.g. a constant model) it never reports a
hit that a different tie-break would lose.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

# ----------------------------------------------------------------------------- segmentation


class ConfusionMatrix:
    """Pixel counts accumulated over images: ``matrix[g, p]`` = pixels of ground-truth
    class ``g`` predicted as ``p`` (K×K, int64). Pixels whose ground truth equals
    ``ignore_index`` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a valid class id for {num_classes} classes; "
                "pick an ignore index outside [0, num_classes) (255 by convention)"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add one image (or a batch): ``pred`` and ``target`` integer label maps of the
        same shape (H×W or B×H×W)."""
        pred_t = torch.as_tensor(pred).cpu()
        target_t = torch.as_tensor(target).cpu()
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"prediction shape {tuple(pred_t.shape)} != label shape {tuple(target_t.shape)}; "
                "resize predictions to the label size before scoring"
            )
        if pred_t.is_floating_point() or target_t.is_floating_point():
            raise TypeError("pred and target must be integer label maps (argmax the logits first)")
        valid = target_t != self.ignore_index
        gt = target_t[valid].long()
        pr = pred_t[valid].long()
        k = self.num_classes
        if gt.numel() and (gt.min() < 0 or gt.max() >= k):
            bad = sorted(set(gt[(gt < 0) | (gt >= k)].unique().tolist()))
            raise ValueError(
                f"ground truth has labels {bad[:10]} outside [0, {k}) that are not the ignore "
                f"index {self.ignore_index}; check the dataset's label mapping"
            )
        if pr.numel() and (pr.min() < 0 or pr.max() >= k):
            bad = sorted(set(pr[(pr < 0) | (pr >= k)].unique().tolist()))
            raise ValueError(f"predictions have labels {bad[:10]} outside [0, {k})")
        self.matrix += torch.bincount(gt * k + pr, minlength=k * k).view(k, k)

    def gt_pixel_counts(self) -> Tensor:
        """Ground-truth pixels per class (K, int64)."""
        return self.matrix.sum(1)

    def iou(self) -> Tensor:
        """IoU per class (K, float64); NaN where the class is in neither GT nor prediction."""
        m = self.matrix.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over classes present in GT or prediction (NaN if none is)."""
        return _nanmean(self.iou())

    def class_accuracy(self) -> Tensor:
        """Recall per class, TP / GT pixels (K, float64); NaN for classes absent from GT."""
        m = self.matrix.double()
        gt = m.sum(1)
        return torch.where(gt > 0, m.diagonal() / gt.clamp(min=1), torch.full_like(gt, math.nan))

    def mean_accuracy(self) -> float:
        """mmseg's mAcc: mean per-class recall over classes present in GT."""
        return _nanmean(self.class_accuracy())

    def pixel_accuracy(self) -> float:
        """Correct pixels / scored pixels (NaN before any pixel was scored)."""
        total = int(self.matrix.sum())
        return int(self.matrix.diagonal().sum()) / total if total else math.nan


def _nanmean(values: Tensor) -> float:
    keep = ~torch.isnan(values)
    return float(values[keep].mean()) if bool(keep.any()) else math.nan


def chance_miou(gt_pixel_counts: Sequence[int] | Tensor | np.ndarray) -> float:
    """Expected mIoU of a predictor that labels every pixel uniformly at random among the
    K classes, for a dataset whose ground truth has ``gt_pixel_counts[c]`` pixels of class c.

    With p_c the GT fraction of class c over N pixels: E[TP] = N·p_c/K, E[pred] = N/K,
    so IoU_c → (p_c/K) / (p_c + 1/K − p_c/K) = p_c / (1 + (K−1)·p_c) as N grows (the
    per-class ratio of expectations; exact in the limit of many pixels, which a dataset
    is). Every class is predicted, so classes absent from GT count as IoU 0, as mmseg
    would score them.
    """
    counts = np.asarray(gt_pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError("gt_pixel_counts must be a non-empty 1-D array of non-negative counts")
    total = counts.sum()
    if total == 0:
        raise ValueError("gt_pixel_counts sum to zero: no labelled pixel to score")
    p = counts / total
    k = counts.size
    return float(np.mean(p / (1.0 + (k - 1) * p)))


# ----------------------------------------------------------------------------- classification


def _true_class_rank(logits: Tensor, labels: Tensor) -> Tensor:
    """0-based rank of the true class per row: the number of other classes scoring at
    least as high (ties count against). logits N×C, labels N -> N (int64)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be N×C, got shape {tuple(logits.shape)}")
    labels = torch.as_tensor(labels, device=logits.device).long()
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    true_score = logits.gather(1, labels[:, None])
    return (logits >= true_score).sum(1) - 1


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose true class is among the k highest logits, per k.
    logits N×C, labels N."""
    rank = _true_class_rank(logits, labels)
    return {k: float((rank < k).double().mean()) for k in ks}


def mean_per_class_recall(logits: Tensor, labels: Tensor) -> float:
    """Top-1 recall of each class that occurs in ``labels``, averaged over those classes.
    logits N×C, labels N."""
    hit = (_true_class_rank(logits, labels) == 0).double()
    labels = torch.as_tensor(labels, device=logits.device).long()
    num_classes = logits.shape[1]
    per_class_hits = torch.zeros(num_classes, dtype=torch.float64, device=hit.device)
    per_class_hits.index_add_(0, labels, hit)
    per_class_count = torch.bincount(labels, minlength=num_classes).double()
    present = per_class_count > 0
    return float((per_class_hits[present] / per_class_count[present]).mean())


def chance_topk(n_classes: int, k: int) -> float:
    """Top-k accuracy of a uniformly random ranking of ``n_classes`` classes."""
    if n_classes < 1 or k < 1:
        raise ValueError("n_classes and k must be >= 1")
    return min(k, n_classes) / n_classes


# ----------------------------------------------------------------------------- retrieval


def positive_ranks(sim: Tensor, positives: Tensor) -> Tensor:
    """0-based rank of each query's best-scoring positive: the number of negatives that
    score at least as high (ties count against). sim Q×G, positives Q×G bool -> Q (int64)."""
    if sim.ndim != 2 or positives.shape != sim.shape:
        raise ValueError(
            f"sim must be Q×G and positives a bool mask of the same shape; got "
            f"{tuple(sim.shape)} and {tuple(positives.shape)}"
        )
    if not torch.isfinite(sim).all():
        raise ValueError("similarities must be finite (found NaN or inf)")
    positives = positives.to(device=sim.device, dtype=torch.bool)
    no_positive = ~positives.any(1)
    if bool(no_positive.any()):
        first = int(no_positive.nonzero()[0])
        raise ValueError(
            f"{int(no_positive.sum())} queries have no positive in the gallery (first: query "
            f"{first}); drop them or fix the query→gallery pairing"
        )
    lowest = torch.finfo(sim.dtype).min
    best_positive = sim.masked_fill(~positives, lowest).amax(1, keepdim=True)
    return ((sim >= best_positive) & ~positives).sum(1)


def recall_at_k(sim: Tensor, positives: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """CLIP-style recall@k: the fraction of queries with at least one positive among the
    top k gallery items. sim Q×G (higher = more similar), positives Q×G bool.

    Image→text: rows are images, positives mark each image's captions. Text→image: rows
    are captions, one positive each."""
    ranks = positive_ranks(sim, positives)
    return recall_from_ranks(ranks, ks)


def recall_from_ranks(ranks: Tensor, ks: Iterable[int]) -> dict[int, float]:
    """recall@k from the best-positive ranks of :func:`positive_ranks` (Q,)."""
    return {k: float((ranks < k).double().mean()) for k in ks}


def chance_recall_at_k(n_gallery: int, n_pos: int, k: int) -> float:
    """Probability that a uniformly random ranking of ``n_gallery`` items puts at least one
    of ``n_pos`` positives in the top k: 1 − C(n−pos, k) / C(n, k) (hypergeometric)."""
    if not 1 <= n_pos <= n_gallery or k < 1:
        raise ValueError(f"need 1 <= n_pos <= n_gallery and k >= 1, got {n_pos}, {n_gallery}, {k}")
    if k > n_gallery - n_pos:
        return 1.0
    # C(n−p, k)/C(n, k) = Π_{i<k} (n−p−i)/(n−i): exact ratio without huge binomials
    miss = 1.0
    for i in range(k):
        miss *= (n_gallery - n_pos - i) / (n_gallery - i)
    return 1.0 - miss

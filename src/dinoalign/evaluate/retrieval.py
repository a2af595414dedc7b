"""Image↔text retrieval, CLIP protocol: cosine similarity, an image has several captions,
a query hits at k if any of its positives is among the k most similar gallery items.
Similarities are computed in query chunks, so a COCO-5k test set (25k captions) never
needs the full 5k×25k matrix at once."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinoalign.evaluate.metrics import chance_recall_at_k, positive_ranks, recall_from_ranks


def _chunked_ranks(
    queries: Tensor, gallery: Tensor, positive_mask: Callable[[int, int], Tensor], chunk_size: int
) -> Tensor:
    """Best-positive rank (Q,) of every query of ``queries`` Q×E against ``gallery`` G×E
    (both unit-norm); ``positive_mask(start, stop)`` is the bool (stop−start)×G positives
    of that chunk of queries."""
    ranks = [
        positive_ranks(
            queries[start : start + chunk_size] @ gallery.T,
            positive_mask(start, start + chunk_size),
        )
        for start in range(0, queries.shape[0], chunk_size)
    ]
    return torch.cat(ranks)


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    caption_image_index: Tensor | np.ndarray,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k in both directions for images M×E and captions T×E, where caption t
    belongs to image ``caption_image_index[t]``; with the chance level of a random
    ranking next to each (``chance_i2t_R@k`` averages the hypergeometric chance over
    images, whose caption counts may differ)."""
    images = F.normalize(image_emb.float(), dim=-1)
    texts = F.normalize(text_emb.float(), dim=-1)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image and text embeddings differ in width: {images.shape[1]} vs {texts.shape[1]}"
        )
    owner, image_ids = _caption_owners(caption_image_index, images.shape[0], texts.shape[0])
    owner, image_ids = owner.to(texts.device), image_ids.to(texts.device)
    i2t = _chunked_ranks(
        images, texts, lambda a, b: owner[None, :] == image_ids[a:b, None], chunk_size
    )
    t2i = _chunked_ranks(
        texts, images, lambda a, b: image_ids[None, :] == owner[a:b, None], chunk_size
    )
    return _recall_summary(i2t, t2i, owner, images.shape[0], ks)


def retrieval_metrics_from_similarity(
    text_image_scores: Tensor,
    caption_image_index: Tensor | np.ndarray,
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """:func:`retrieval_metrics` from a model's own T×M caption-image scores (for models
    that do not score pairs by one cosine, e.g. talk2dino's best head per pair)."""
    if text_image_scores.ndim != 2:
        raise ValueError(f"scores must be T×M, got shape {tuple(text_image_scores.shape)}")
    scores = text_image_scores.float()
    n_texts, n_images = scores.shape
    owner, image_ids = _caption_owners(caption_image_index, n_images, n_texts)
    owner, image_ids = owner.to(scores.device), image_ids.to(scores.device)
    t2i = positive_ranks(scores, image_ids[None, :] == owner[:, None])
    i2t = positive_ranks(scores.T, owner[None, :] == image_ids[:, None])
    return _recall_summary(i2t, t2i, owner, n_images, ks)


def _caption_owners(
    caption_image_index: Tensor | np.ndarray, n_images: int, n_texts: int
) -> tuple[Tensor, Tensor]:
    """(owner image of each caption (T,), image ids 0..M−1), validated: every caption
    names an image, every image has a caption."""
    owner = torch.as_tensor(caption_image_index, dtype=torch.long)
    if owner.shape != (n_texts,):
        raise ValueError(
            f"caption_image_index needs one entry per caption ({n_texts}), got {tuple(owner.shape)}"
        )
    if n_texts and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError(f"caption_image_index must lie in [0, {n_images})")
    captions_per_image = torch.bincount(owner, minlength=n_images)
    if bool((captions_per_image == 0).any()):
        raise ValueError(
            f"{int((captions_per_image == 0).sum())} images have no caption; drop them before "
            "retrieval (they could never be found from text, nor find any)"
        )
    return owner, torch.arange(n_images)


def _recall_summary(
    i2t: Tensor, t2i: Tensor, owner: Tensor, n_images: int, ks: Iterable[int]
) -> dict[str, float]:
    """Recall@k per direction from best-positive ranks, with the chance levels."""
    ks = tuple(ks)
    n_texts = owner.shape[0]
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k, value in recall_from_ranks(ranks, ks).items():
            out[f"{direction}_R@{k}"] = value
    captions_per_image = torch.bincount(owner, minlength=n_images)
    counts, n_with_count = np.unique(captions_per_image.cpu().numpy(), return_counts=True)
    for k in ks:
        chance = sum(
            m * chance_recall_at_k(n_texts, int(c), k) for c, m in zip(counts, n_with_count)
        )
        out[f"chance_i2t_R@{k}"] = chance / n_images
        out[f"chance_t2i_R@{k}"] = chance_recall_at_k(n_images, 1, k)
    out["num_images"] = float(n_images)
    out["num_texts"] = float(n_texts)
    return out


def percent_of_reference(
    metrics: dict[str, float], reference: dict[str, float]
) -> dict[str, float]:
    """Each recall in ``metrics`` as a percentage of the same key in ``reference`` (e.g. a
    projector's retrieval against CLIP's own on the same split): ``<key>_pct``."""
    shared = [k for k in metrics if "_R@" in k and not k.startswith("chance") and k in reference]
    if not shared:
        raise ValueError("no recall keys in common between metrics and reference")
    return {
        f"{k}_pct": 100.0 * metrics[k] / reference[k] if reference[k] else float("nan")
        for k in shared
    }


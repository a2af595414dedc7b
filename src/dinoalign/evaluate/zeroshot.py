"""Zero-shot classification, CLIP protocol: class names × templates, per-template
normalisation, average over templates, re-normalisation; logits = 100·cos."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoalign.evaluate.metrics import chance_topk, mean_per_class_recall, topk_accuracy
from dinoalign.evaluate.templates import resolve_templates

LOGIT_SCALE = 100.0


def class_text_embeddings(
    encode_text_fn: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: str | Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """One unit-norm text embedding per class (N×E): every template filled with the class
    name is encoded (``encode_text_fn``: strings -> one embedding row each, ``batch_size``
    prompts per call) and L2-normalised, the T embeddings of a class are averaged, and the
    mean is normalised again."""
    if not class_names:
        raise ValueError("need at least one class name")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts_per_class = resolve_templates(templates)
    prompts = [t.replace("{}", name) for name in class_names for t in prompts_per_class]
    text_emb = torch.cat(
        [
            _encode_checked(encode_text_fn, prompts[start : start + batch_size])
            for start in range(0, len(prompts), batch_size)
        ]
    )
    text_emb = F.normalize(text_emb, dim=-1).view(len(class_names), len(prompts_per_class), -1)
    return F.normalize(text_emb.mean(1), dim=-1)


def _encode_checked(encode: Callable[[list[str]], Tensor], batch: list[str]) -> Tensor:
    with torch.no_grad():
        out = torch.as_tensor(encode(batch))
    if out.ndim != 2 or out.shape[0] != len(batch):
        raise ValueError(
            f"encoder returned shape {tuple(out.shape)} for a batch of {len(batch)}; "
            "it must return one embedding row per input (B×E)"
        )
    return out.detach().float().cpu()


def zeroshot_logits(image_emb: Tensor, class_emb: Tensor) -> Tensor:
    """100·cos between images B×E and classes N×E -> B×N."""
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"image embeddings B×E and class embeddings N×E must share E; got "
            f"{tuple(image_emb.shape)} and {tuple(class_emb.shape)}"
        )
    return (
        LOGIT_SCALE
        * F.normalize(image_emb.float(), dim=-1)
        @ F.normalize(class_emb.float(), dim=-1).T
    )


def zeroshot_classify(
    image_emb: Tensor, class_emb: Tensor, labels: Tensor
) -> dict[str, float | int]:
    """Top-1, top-5 and mean per-class recall of images B×E against classes N×E for integer
    ``labels`` (B,), with the chance level of a uniformly random ranking next to each."""
    return classification_metrics(zeroshot_logits(image_emb, class_emb), labels)


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float | int]:
    """Top-1, top-5, mean per-class recall and their chance levels from any class scores
    B×N (cosines, or a recipe's own pair scores such as talk2dino's best head) for integer
    ``labels`` (B,)."""
    n_classes = logits.shape[1]
    acc = topk_accuracy(logits, labels, ks=(1, 5))
    return {
        "top1": acc[1],
        "top5": acc[5],
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
        "chance_top1": chance_topk(n_classes, 1),
        "chance_top5": chance_topk(n_classes, 5),
        "num_images": int(logits.shape[0]),
        "num_classes": int(n_classes),
    }


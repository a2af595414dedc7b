"""Zero-shot classification, CLIP protocol: class names × templates, per-template
normalisation, average over templates, re-normalisation; logits = 100·cos."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinoalign.evaluate._embed import ImageEncoder, TextEncoder, embed_in_batches
from dinoalign.evaluate.datasets.base import ClassificationDataset
from dinoalign.evaluate.metrics import chance_topk, mean_per_class_recall, topk_accuracy
from dinoalign.evaluate.templates import resolve_templates

LOGIT_SCALE = 100.0


def class_text_embeddings(
    encode_text_fn: TextEncoder,
    class_names: Sequence[str],
    templates: str | Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """One unit-norm text embedding per class (N×E): every template filled with the class
    name is encoded and L2-normalised, the T embeddings of a class are averaged, and the
    mean is normalised again."""
    if not class_names:
        raise ValueError("need at least one class name")
    prompts_per_class = resolve_templates(templates)
    prompts = [t.replace("{}", name) for name in class_names for t in prompts_per_class]
    text_emb = embed_in_batches(prompts, encode_text_fn, batch_size)
    text_emb = F.normalize(text_emb, dim=-1).view(len(class_names), len(prompts_per_class), -1)
    return F.normalize(text_emb.mean(1), dim=-1)


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


def evaluate_zeroshot(
    dataset: ClassificationDataset,
    encode_images: ImageEncoder,
    encode_texts: TextEncoder,
    templates: str | Sequence[str] = "openai_imagenet",
    batch_size: int = 64,
) -> dict[str, float | int]:
    """Embed every image of ``dataset`` and its class names, then :func:`zeroshot_classify`."""
    labels: list[int] = []

    def images() -> Iterator[np.ndarray]:
        for image, label, _name in dataset:
            labels.append(int(label))
            yield image

    image_emb = embed_in_batches(images(), encode_images, batch_size)
    class_emb = class_text_embeddings(encode_texts, dataset.class_names, templates, batch_size)
    return zeroshot_classify(image_emb, class_emb, torch.tensor(labels))

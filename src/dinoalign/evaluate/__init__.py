"""Evaluation library: exact metrics, zero-shot classification, retrieval and
open-vocabulary segmentation over tensors; models come in as callables."""

from dinoalign.evaluate.datasets import EVAL_DATASETS
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
from dinoalign.evaluate.pamr import PAMR
from dinoalign.evaluate.retrieval import evaluate_retrieval, percent_of_reference, retrieval_metrics
from dinoalign.evaluate.segmentation import (
    SegmentationConfig,
    calibrate_bg_threshold,
    evaluate_segmentation,
    labels_from_scores,
    make_predictor,
    scored_class_names,
    segment,
    segment_scores,
    short_side_resize,
    sliding_window_logits,
    window_boxes,
)
from dinoalign.evaluate.templates import (
    OPENAI_IMAGENET_TEMPLATES,
    TALK2DINO_TEMPLATES,
    resolve_templates,
)
from dinoalign.evaluate.zeroshot import (
    class_text_embeddings,
    evaluate_zeroshot,
    zeroshot_classify,
    zeroshot_logits,
)

__all__ = [
    "EVAL_DATASETS",
    "OPENAI_IMAGENET_TEMPLATES",
    "PAMR",
    "TALK2DINO_TEMPLATES",
    "ConfusionMatrix",
    "SegmentationConfig",
    "calibrate_bg_threshold",
    "chance_miou",
    "chance_recall_at_k",
    "chance_topk",
    "class_text_embeddings",
    "evaluate_retrieval",
    "evaluate_segmentation",
    "evaluate_zeroshot",
    "labels_from_scores",
    "make_predictor",
    "mean_per_class_recall",
    "percent_of_reference",
    "positive_ranks",
    "recall_at_k",
    "resolve_templates",
    "retrieval_metrics",
    "scored_class_names",
    "segment",
    "segment_scores",
    "short_side_resize",
    "sliding_window_logits",
    "topk_accuracy",
    "window_boxes",
    "zeroshot_classify",
    "zeroshot_logits",
]

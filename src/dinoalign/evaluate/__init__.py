"""Evaluation library: exact metrics, zero-shot classification, retrieval and
open-vocabulary segmentation over tensors; models come in as callables."""

from __future__ import annotations

from dinoalign._lazy import lazy_exports

# name -> the submodule that defines it, imported on first access (PEP 562), so that
# ``dinoalign.evaluate.config`` (loaded with every params file) does not load torch
_LAZY = {
    "EVAL_DATASETS": "datasets",
    "ConfusionMatrix": "metrics",
    "chance_miou": "metrics",
    "chance_recall_at_k": "metrics",
    "chance_topk": "metrics",
    "mean_per_class_recall": "metrics",
    "positive_ranks": "metrics",
    "recall_at_k": "metrics",
    "topk_accuracy": "metrics",
    "PAMR": "pamr",
    "percent_of_reference": "retrieval",
    "retrieval_metrics": "retrieval",
    "SegmentationConfig": "config",
    "calibrate_bg_threshold": "segmentation",
    "evaluate_segmentation": "segmentation",
    "labels_from_scores": "segmentation",
    "make_predictor": "segmentation",
    "scored_class_names": "segmentation",
    "segment": "segmentation",
    "segment_scores": "segmentation",
    "short_side_resize": "segmentation",
    "sliding_window_logits": "segmentation",
    "window_boxes": "segmentation",
    "OPENAI_IMAGENET_TEMPLATES": "templates",
    "TALK2DINO_TEMPLATES": "templates",
    "resolve_templates": "templates",
    "class_text_embeddings": "zeroshot",
    "zeroshot_classify": "zeroshot",
    "zeroshot_logits": "zeroshot",
}

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
    "evaluate_segmentation",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)

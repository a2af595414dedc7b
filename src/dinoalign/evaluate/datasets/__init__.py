"""Evaluation datasets: ``EVAL_DATASETS.build(name, root, **options)``.

Segmentation: voc20, voc21, context59, context60, cocostuff164k, coco_object, cityscapes,
ade20k, folder. Classification: imagenet_folder. Retrieval: karpathy. Each built dataset
has a ``task`` attribute (``segmentation``, ``classification``, ``retrieval``).
"""

from dinoalign.evaluate.datasets import captions, classification, classnames, segmentation
from dinoalign.evaluate.datasets.base import (
    EVAL_DATASETS,
    IGNORE_INDEX,
    ClassificationDataset,
    DatasetFiles,
    RetrievalDataset,
    SegmentationDataset,
)

__all__ = [
    "EVAL_DATASETS",
    "IGNORE_INDEX",
    "ClassificationDataset",
    "DatasetFiles",
    "RetrievalDataset",
    "SegmentationDataset",
    "captions",
    "classification",
    "classnames",
    "segmentation",
]

"""Frozen backbones: the DINOv2/DINOv3 vision adapter and the text encoders."""

from dinoalign.backbones.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneOutput,
    DinoBackbone,
    build_backbone,
    build_backbone_from,
    convert_torchhub_state_dict,
    is_torchhub_state_dict,
    load_backbone_weights,
    read_state_dict,
    supported_backbones,
    timm_to_torchhub_state_dict,
)
from dinoalign.backbones.text import (
    TEXT_ENCODERS,
    HFSentenceEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    build_text_encoder,
    load_open_clip,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEXT_ENCODERS",
    "BackboneOutput",
    "DinoBackbone",
    "HFSentenceEncoder",
    "OpenCLIPTextEncoder",
    "TextEncoder",
    "build_backbone",
    "build_backbone_from",
    "build_text_encoder",
    "convert_torchhub_state_dict",
    "is_torchhub_state_dict",
    "load_backbone_weights",
    "load_open_clip",
    "read_state_dict",
    "supported_backbones",
    "timm_to_torchhub_state_dict",
]

"""Frozen text encoders behind one registry: ``open_clip`` text towers and ``hf`` sentence
encoders, plus :func:`load_open_clip` for the full CLIP (image + text) that the embed
stage and the projector recipe need.

``build_text_encoder("open_clip", "ViT-B-16")`` is a random-init CLIP text tower;
``model_kwargs`` override the open_clip config for tiny test models, e.g.
``dict(embed_dim=64, text_cfg=dict(width=64, layers=2, heads=2))`` (nested ``text_cfg`` /
``vision_cfg`` entries are merged into the named config, not replacing it).
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.transform import PreprocessCfg
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from dinoalign.backbones._frozen import FrozenModule
from dinoalign.errors import ConfigError, SetupError
from dinoalign.registry import Registry

TEXT_ENCODERS: Registry = Registry("text encoder")

_HF_HUB_PREFIX = "hf-hub:"
# model names that carry their own config and weights (open_clip ignores ``pretrained``)
_OPEN_CLIP_SCHEMAS = (_HF_HUB_PREFIX, "local-dir:")


class TextEncoder(FrozenModule, abc.ABC):
    """A frozen text encoder: ``tokenize`` strings to a LongTensor B×L, ``forward`` tokens
    to unnormalised features B×width, ``encode`` both in batches."""

    width: int  # output feature dimension

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Strings -> token ids B×L (LongTensor, on the CPU)."""

    @abc.abstractmethod
    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids B×L -> unnormalised features B×width."""

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Strings -> float32 features B×width on the encoder's device, ``batch_size``
        texts per forward."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string: wrap it as [text]")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        device = next(self.parameters()).device
        features = [torch.empty(0, self.width, device=device)]
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[start : start + batch_size]).to(device)
                features.append(self(tokens).float())
        return torch.cat(features)


# ----------------------------------------------------------------------------- open_clip


@TEXT_ENCODERS.register("open_clip")
class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip CLIP (token embedding, positional embedding,
    causal transformer, final LayerNorm, text projection): output = the EOT token's
    feature after the projection, as ``CLIP.encode_text``, B×embed_dim.

    ``name``: a built-in open_clip config (``ViT-B-16``, ``ViT-S-16-alt``...), or
    ``local-dir:PATH`` / ``hf-hub:org/repo`` holding config and weights together.
    ``pretrained`` (built-in configs only): None (random init), an open_clip tag (e.g.
    ``openai``, needs the download cache), ``hf-hub:org/repo`` or a local checkpoint of a
    full open_clip CLIP (loaded with ``weights_only=True``). The image tower is dropped
    after loading.
    """

    def __init__(
        self, name: str, pretrained: str | None = None, model_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        # the custom-text layout keeps the text tower as one module (.text) for any source
        clip = _create_open_clip(name, pretrained, model_kwargs, force_custom_text=True)
        if not isinstance(clip.text, TextTransformer):
            raise ConfigError(
                f"open_clip model {name!r} has a Hugging Face text tower; use text kind 'hf' for it"
            )
        self.tower: TextTransformer = clip.text
        self.width = int(
            self.tower.output_dim if self.tower.text_projection is not None else self.tower.width
        )
        self.context_length = int(self.tower.context_length)
        self._tokenizer = open_clip.get_tokenizer(name, context_length=self.context_length)
        self.freeze()

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Strings -> BPE ids B×context_length (SOT ... EOT, zero padded, truncated)."""
        return self._tokenizer(list(texts))

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids B×context_length -> EOT features after the projection, B×width."""
        return self.tower(tokens)


def load_open_clip(
    name: str, pretrained: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any], Callable[[Sequence[str]], Tensor]]:
    """The full open_clip CLIP (image and text towers) with its image preprocessing config
    (size, mean, std, interpolation, resize mode) and its tokenizer.

    Arguments as :class:`OpenCLIPTextEncoder`. The model is returned as open_clip builds
    it, trainable (the teacher stage trains one); freeze it where it is only used.
    """
    model = _create_open_clip(name, pretrained, model_kwargs)
    tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)
    return model, open_clip.get_model_preprocess_cfg(model), tokenizer


def _create_open_clip(
    name: str,
    pretrained: str | None,
    model_kwargs: dict[str, Any] | None,
    force_custom_text: bool = False,
) -> nn.Module:
    overrides = _open_clip_overrides(name, model_kwargs or {})
    weights = _resolve_open_clip_weights(name, pretrained)
    return open_clip.create_model(
        name, pretrained=weights, force_custom_text=force_custom_text, **overrides
    )


def _resolve_open_clip_weights(name: str, pretrained: str | None) -> str | None:
    """``pretrained`` -> what open_clip.create_model takes: a tag whose file is in the
    download cache, or a local file path."""
    if pretrained is None:
        return None
    if name.startswith(_OPEN_CLIP_SCHEMAS):
        raise ConfigError(
            f"open_clip model {name!r} already names its weights; leave pretrained empty "
            f"(got {pretrained!r})"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    try:
        if pretrained.startswith(_HF_HUB_PREFIX):
            return download_pretrained_from_hf(pretrained[len(_HF_HUB_PREFIX) :])
        if pretrained in tags:
            # fetch (or find in the cache) here, so that a failure gets the message below
            open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, pretrained))
            return pretrained
    except (OSError, ValueError, RuntimeError) as err:
        raise SetupError(
            f"could not fetch open_clip weights {pretrained!r} for {name!r} ({err}). Without "
            "network access, copy the checkpoint here and set text.pretrained to its path"
        ) from err
    if os.path.isfile(pretrained):
        return pretrained
    raise ConfigError(
        f"pretrained {pretrained!r} for open_clip model {name!r} is neither an existing file, "
        f"nor 'hf-hub:org/repo', nor one of its tags: {tags or 'none'}"
    )


def _open_clip_overrides(name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """model_kwargs -> create_model overrides, nested text/vision configs merged into the
    named config (create_model itself would replace them whole)."""
    if not model_kwargs:
        return {}
    base = None if name.startswith(_OPEN_CLIP_SCHEMAS) else open_clip.get_model_config(name)
    if base is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"model_kwargs need a built-in open_clip config; {name!r} is not one{hint}"
        )
    top_level = set(inspect.signature(open_clip.CLIP).parameters) - {"cast_dtype"}
    nested = {"text_cfg": open_clip.CLIPTextCfg, "vision_cfg": open_clip.CLIPVisionCfg}
    overrides: dict[str, Any] = {}
    for key, value in model_kwargs.items():
        _check_key(key, top_level, "open_clip model_kwargs")
        if key in nested and isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(nested[key])}
            for sub_key in value:
                _check_key(sub_key, fields, f"open_clip model_kwargs.{key}")
            overrides[key] = {**base.get(key, {}), **value}
        else:
            overrides[key] = value
    return overrides


def _check_key(key: str, valid: set[str], where: str) -> None:
    if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown key {key!r} in {where}{hint}; valid keys: {sorted(valid)}")


# ----------------------------------------------------------------------------- Hugging Face


@TEXT_ENCODERS.register("hf")
class HFSentenceEncoder(TextEncoder):
    """A Hugging Face sentence encoder (e.g. all-MiniLM-L6-v2) from a hub name or a local
    directory: mean of the last hidden states over the non-padding tokens, B×hidden_size.

    The weights come from ``name``; ``model_kwargs`` go to ``AutoModel.from_pretrained``.
    Needs the optional ``transformers`` package.
    """

    def __init__(
        self, name: str, pretrained: str | None = None, model_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if pretrained is not None:
            raise ConfigError(
                f"text kind 'hf' loads its weights from the name ({name!r}); leave pretrained empty"
            )
        transformers = _import_transformers()
        try:
            self.model = transformers.AutoModel.from_pretrained(name, **(model_kwargs or {}))
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise OSError(
                f"could not load the Hugging Face model {name!r} ({err}); without network access "
                "give the path of a local model directory"
            ) from err
        if self._tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer of {name!r} has no padding token; mean pooling needs one"
            )
        self.width = int(self.model.config.hidden_size)
        self.max_length = int(
            min(self._tokenizer.model_max_length, self.model.config.max_position_embeddings)
        )
        self.freeze()

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Strings -> ids B×L, padded to the longest text, truncated to ``max_length``."""
        batch = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"]

    def forward(self, tokens: Tensor) -> Tensor:
        """Ids B×L -> mean over the non-padding tokens of the last hidden states, B×width."""
        mask = (tokens != self._tokenizer.pad_token_id).to(torch.long)  # B×L
        hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state  # B×L×width
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            "text kind 'hf' needs the 'transformers' package (pip install transformers); "
            "or use text kind 'open_clip'"
        ) from err


# ----------------------------------------------------------------------------- building


def build_text_encoder(
    kind: str, name: str, pretrained: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> TextEncoder:
    """The frozen text encoder registered as ``kind`` (``open_clip``, ``hf``)."""
    return TEXT_ENCODERS.build(kind, name, pretrained=pretrained, model_kwargs=model_kwargs)


# ----------------------------------------------------------------------------- CLIP pixels


def resolve_clip_preprocess(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model's preprocess config (``open_clip.get_model_preprocess_cfg``, or
    a checkpoint's ``preprocess_cfg``) completed the way open_clip completes it: keys it
    lacks take open_clip's ``PreprocessCfg`` defaults. JSON-friendly: ``size`` [h, w],
    ``mean``/``std`` 3 floats, ``interpolation``, ``resize_mode``, ``fill_color``."""
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    cfg = dataclasses.asdict(PreprocessCfg(**{k: v for k, v in preprocess.items() if k in known}))
    size = cfg["size"]
    cfg["size"] = [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)] * 2
    cfg["mean"], cfg["std"] = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
    if len(cfg["mean"]) != 3 or len(cfg["std"]) != 3:
        raise ValueError(
            f"CLIP preprocess config has mean {cfg['mean']} and std {cfg['std']}: RGB images "
            "need 3 values each"
        )
    if cfg["interpolation"] not in _CLIP_INTERPOLATIONS:
        raise ValueError(
            f"CLIP preprocess interpolation {cfg['interpolation']!r} is not one of "
            f"{list(_CLIP_INTERPOLATIONS)} (open_clip's 'random' is for training only)"
        )
    if cfg["resize_mode"] not in _CLIP_RESIZE_MODES:
        raise ValueError(
            f"CLIP preprocess resize_mode {cfg['resize_mode']!r} is not one of {list(_CLIP_RESIZE_MODES)}"
        )
    return cfg


_CLIP_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


_CLIP_RESIZE_MODES = ("shortest", "longest", "squash")


def to_clip_input(
    images: np.ndarray, preprocess: Mapping[str, Any], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 B×H×W×3 -> float B×3×h×w on ``device`` with the CLIP's own preprocess config
    (see :func:`resolve_clip_preprocess`): resize to ``size`` by ``resize_mode`` with its
    ``interpolation`` (antialiased), then its ``mean``/``std``. On square images (what the
    pipeline passes: embed's crops) every resize mode is one resize to h×w; otherwise
    ``shortest`` resizes the short side and centre-crops, ``longest`` resizes the long
    side and pads with ``fill_color``, ``squash`` resizes both sides.
    The uint8 pixels cross to the device first; the work happens there."""
    cfg = resolve_clip_preprocess(preprocess)
    height, width = cfg["size"]
    mode = cfg["interpolation"]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)

    def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if t.shape[-2:] == size:
            return t
        return F.interpolate(t, size=size, mode=mode, antialias=mode != "nearest",
                             **({} if mode == "nearest" else {"align_corners": False}))

    h, w = x.shape[-2:]
    if cfg["resize_mode"] == "squash" or (h == w and height == width):
        x = resize(x, (height, width))
    elif cfg["resize_mode"] == "shortest":  # short side to the target's, centre crop
        scale = max(height / h, width / w)
        x = resize(x, (max(height, int(h * scale)), max(width, int(w * scale))))
        top, left = round((x.shape[-2] - height) / 2), round((x.shape[-1] - width) / 2)
        x = x[..., top : top + height, left : left + width]
    else:  # longest: long side to the target's, centred on a fill_color canvas
        scale = min(height / h, width / w)
        x = resize(x, (min(height, max(1, int(h * scale))), min(width, max(1, int(w * scale)))))
        canvas = x.new_full((x.shape[0], 3, height, width), cfg["fill_color"] / 255)
        top, left = (height - x.shape[-2]) // 2, (width - x.shape[-1]) // 2
        canvas[..., top : top + x.shape[-2], left : left + x.shape[-1]] = x
        x = canvas
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
    return (x.clamp_(0, 1) - mean) / std


def clip_image_size(pre: Any) -> int:
    """The square input side of a CLIP preprocess config (or transform with ``size``)."""
    size = pre["size"] if isinstance(pre, dict) else getattr(pre, "size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def clip_preprocessing(preprocess: Any) -> dict[str, Any]:
    """A CLIP's open_clip preprocess config as recorded in the spec: ``mean``, ``std``,
    ``interpolation``, ``resize_mode``, ``fill_color``, ``input_size`` [3, h, w]."""
    cfg = resolve_clip_preprocess(preprocess)
    cfg.pop("mode")  # always RGB (open_clip's PreprocessCfg allows nothing else)
    height, width = cfg.pop("size")
    return {**cfg, "input_size": [3, height, width]}

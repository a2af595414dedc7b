"""Import the authors' released Talk2DINO projection (lorebianchi98/Talk2DINO: the
``ProjectionLayer`` of src/model.py saved as ``weights/<name>.pth``, configured by
``configs/<name>.yaml``) into a :class:`~dinoalign.recipes.talk2dino.Talk2DINO` recipe,
strictly: every problem with the file is one error that names the file's own keys and
the expected shapes. ``dinoalign import-talk2dino`` is the command for it.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping

import torch
from torch import Tensor

from dinoalign.recipes._registry import build
from dinoalign.recipes.talk2dino import Talk2DINO, Talk2DINOConfig
from dinoalign.storage import read_bytes


# Key in the official Talk2DINO ``ProjectionLayer`` state dict -> key here.
_RELEASED_KEYS = {
    "linear_layer.weight": "proj_in.weight",  # W1 [D, T]
    "linear_layer.bias": "proj_in.bias",  # b1 [D]
    "hidden_layers.0.weight": "proj_out.weight",  # W2 [D, D]
    "hidden_layers.0.bias": "proj_out.bias",  # b2 [D]
}


# Their shapes: D = dino_embed_dim (DINOv2 width), T = clip_embed_dim (text width).
_RELEASED_SHAPES = {
    "linear_layer.weight": ("D", "T"),
    "linear_layer.bias": ("D",),
    "hidden_layers.0.weight": ("D", "D"),
    "hidden_layers.0.bias": ("D",),
}
# Older official checkpoints name the second layer ``linear_layer2`` (the official
# ``ProjectionLayer.load_state_dict`` renames it the same way).
_LEGACY_KEYS = {
    "linear_layer2.weight": "hidden_layers.0.weight",
    "linear_layer2.bias": "hidden_layers.0.bias",
}
# Keys of other ProjectionLayer variants, and why they cannot be imported.
_UNSUPPORTED_HINTS = {
    "attn_weights": "weight_attn_heads: static (a learned weighting of the attention heads)",
    "weight_layer": "weight_attn_heads: conditioned (a learned weighting of the attention heads)",
    "hidden_layers.": "more than one hidden layer (this recipe's mlp has one)",
}
# The ``model:`` fields of the official ``configs/<name>.yaml`` that decide ψ, with the
# defaults ``ProjectionLayer.from_config`` gives them when the yaml leaves them out.
_YAML_DEFAULTS: dict[str, object] = {
    "act": None,
    "hidden_layer": False,
    "dino_embed_dim": 1024,
    "clip_embed_dim": 512,
    "weight_attn_heads": None,
}
# Fields ``from_config`` also reads that only change training (the loss, the visual
# side, the starting point), not ψ: accepted and not used.
_YAML_UNUSED = (
    "cosine",
    "num_attn_head",
    "alignment_strategy",
    "alpha",
    "keep_cls",
    "keep_end_seq",
    "starting_checkpoint",
)
_YAML_ACTS = ("tanh", "relu", "sigmoid")
AUTO_CONFIG = "auto"


@dataclasses.dataclass(frozen=True)
class ReleasedConfig:
    """What an official Talk2DINO ``configs/<name>.yaml`` says about the projection."""

    source: str  # the yaml's path or URI
    projection: str  # "mlp" (hidden_layer: True) or "linear"
    vision_dim: int  # dino_embed_dim (D)
    text_dim: int  # clip_embed_dim (T)
    act: str | None
    defaulted: tuple[str, ...] = ()  # fields the yaml leaves to ProjectionLayer's defaults

    def describe(self) -> str:
        hidden = "True" if self.projection == "mlp" else "False"
        said = f"hidden_layer: {hidden}, act: {self.act}, dino_embed_dim: {self.vision_dim}, "
        said += f"clip_embed_dim: {self.text_dim}"
        if self.defaulted:
            said += f"; {', '.join(self.defaulted)} not set: ProjectionLayer's defaults"
        return f"{self.source} ({said})"


@dataclasses.dataclass(frozen=True)
class ReleasedImport:
    """The imported recipe and what was read: ``summary`` (weights, format, config,
    projection, projection_from, text_dim, vision_dim) is what ``dinoalign
    import-talk2dino`` prints."""

    model: Talk2DINO
    summary: dict[str, object]

    def save(self, out: str) -> None:
        """Write the recipe folder to ``out`` (path or URI); a folder that cannot be
        written (not a folder, no permission, disk full) is an
        :class:`~dinoalign.errors.InferenceError` with the OS's message."""
        from dinoalign.errors import InferenceError

        try:
            self.model.save(out)
        except OSError as e:
            raise InferenceError(" ".join(str(e).split()) or type(e).__name__) from None


def read_talk2dino_config(uri: str) -> ReleasedConfig:
    """The ``model:`` section of an official ``configs/<name>.yaml`` (path or URI), as
    ``ProjectionLayer.from_config`` reads it: ``hidden_layer`` (True: the mlp), ``act``,
    ``dino_embed_dim`` (default 1024), ``clip_embed_dim`` (default 512). A field it does
    not know, or a setting this recipe cannot reproduce (another activation, more hidden
    layers, head weighting), is an :class:`~dinoalign.errors.InferenceError`."""
    import yaml

    from dinoalign.errors import InferenceError

    def fail(problem: str) -> InferenceError:
        return InferenceError(f"{uri}: {problem}")

    try:
        doc = yaml.safe_load(read_bytes(uri).decode("utf-8"))
    except FileNotFoundError:
        raise fail("no such Talk2DINO config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise fail(f"not a readable YAML file ({_one_line(e)})") from None
    section = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise fail(
            "no `model:` mapping; the official configs/<name>.yaml holds the ProjectionLayer "
            "settings under `model:` (act, hidden_layer, dino_embed_dim, clip_embed_dim)"
        )
    known = (*_YAML_DEFAULTS, *_YAML_UNUSED)
    unknown = [str(k) for k in section if k not in known]
    if "proj_class" in section:
        raise fail(
            "an evaluation config (it names the projection in model.proj_class="
            f"{section['proj_class']!r}); pass the projection's configs/"
            f"{section['proj_class']}.yaml instead"
        )
    if unknown:
        raise fail(
            f"model.{unknown[0]} is not a ProjectionLayer setting this importer understands "
            f"(it reads {list(known)}); check that this is the projection's "
            "configs/<name>.yaml, or remove the field if it does not change the projection"
        )
    value = {k: section.get(k, default) for k, default in _YAML_DEFAULTS.items()}
    hidden = value["hidden_layer"] or False
    if not isinstance(hidden, int) or hidden < 0:
        raise fail(f"model.hidden_layer must be True or False, got {hidden!r}")
    if hidden > 1:
        raise fail(
            f"model.hidden_layer: {hidden} hidden layers; this recipe's mlp projection has "
            "one (hidden_layer: True)"
        )
    projection = "mlp" if hidden else "linear"
    act = value["act"]
    if act is not None and act not in _YAML_ACTS:
        raise fail(f"model.act must be one of {list(_YAML_ACTS)} or unset, got {act!r}")
    if projection == "mlp" and act != "tanh":
        what = f"act: {act}" if act else "act not set (ProjectionLayer then has no activation)"
        raise fail(
            f"{what}, but this recipe's mlp projection is W2·tanh(W1·t + b1) + b2: only "
            "act: tanh can be imported"
        )
    if value["weight_attn_heads"] is not None:
        raise fail(
            f"model.weight_attn_heads: {value['weight_attn_heads']!r} (a learned weighting "
            "of DINOv2's attention heads) is not part of this recipe; only configs without "
            "it can be imported"
        )
    for key in ("dino_embed_dim", "clip_embed_dim"):
        dim = value[key]
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise fail(f"model.{key} must be a positive integer, got {dim!r}")
    return ReleasedConfig(
        source=uri,
        projection=projection,
        vision_dim=int(value["dino_embed_dim"]),  # type: ignore[arg-type]
        text_dim=int(value["clip_embed_dim"]),  # type: ignore[arg-type]
        act=act,  # type: ignore[arg-type]
        defaulted=tuple(k for k in _YAML_DEFAULTS if k not in section and k != "weight_attn_heads"),
    )


def import_talk2dino_checkpoint(
    state_dict: Mapping[str, Tensor],
    config: ReleasedConfig | None = None,
    *,
    source: str = "the checkpoint",
) -> Talk2DINO:
    """A Talk2DINO recipe holding the official ``ProjectionLayer`` weights.

    With ``config`` (:func:`read_talk2dino_config`) its ``hidden_layer`` decides mlp or
    linear and its dims D, T must match the tensors; without it, ``hidden_layers.0.*``
    present means the ``mlp`` projection with tanh (the paper's), absent the ``linear``
    one, and D, T come from ``linear_layer.weight`` [D, T]. Missing, unknown or
    mis-shaped keys, non-float tensors and NaN/Inf values are refused with one
    :class:`~dinoalign.errors.InferenceError` that names ``source``, the file's keys and
    the expected shapes."""
    return _import_released(state_dict, config, source)[0]


def read_talk2dino_release(weights: str, config: str | None = AUTO_CONFIG) -> ReleasedImport:
    """Import the official weights file (path or URI): ``.safetensors`` read as
    safetensors, anything else with ``torch.load(weights_only=True)`` (tensors only, no
    pickled code is run). ``config``: the official yaml; ``"auto"`` (default) uses
    ``<stem>.yaml`` beside the weights or ``../configs/<stem>.yaml`` (the official
    layout ``weights/<name>.pth`` + ``configs/<name>.yaml``) if one exists, else infers
    the projection from the keys and says so in ``summary["projection_from"]``; ``None``
    always infers."""
    state, fmt = _read_released_state(weights)
    tried: list[str] = []
    if config == AUTO_CONFIG:
        tried = _config_candidates(weights)
        config = next((c for c in tried if _exists(c)), None)
    released = read_talk2dino_config(config) if config is not None else None
    model, basis = _import_released(state, released, weights)
    cfg = model.cfg
    if released is None:
        basis += (
            f"; no yaml found at {tried}" if tried else "; no yaml given"
        ) + " (pass the official configs/<name>.yaml to use its settings)"
    summary: dict[str, object] = {
        "weights": weights,
        "format": fmt,
        "config": released.source if released else None,
        "projection": cfg.projection,
        "projection_from": basis,
        "text_dim": cfg.text_dim,
        "vision_dim": cfg.vision_dim,
    }
    return ReleasedImport(model=model, summary=summary)


def load_talk2dino_checkpoint(uri: str, config: str | None = AUTO_CONFIG) -> Talk2DINO:
    """:func:`import_talk2dino_checkpoint` of a released weights file (path or URI) and
    its yaml: see :func:`read_talk2dino_release`."""
    return read_talk2dino_release(uri, config).model


def _import_released(
    state_dict: object, config: ReleasedConfig | None, source: str
) -> tuple[Talk2DINO, str]:
    """Check a released state dict (against ``config`` if given) and load it; returns
    the recipe and how the projection was decided."""
    from dinoalign.errors import InferenceError

    def fail(problem: str) -> InferenceError:
        return InferenceError(f"{source}: {problem}")

    if not isinstance(state_dict, Mapping):
        raise fail(
            f"holds a {type(state_dict).__name__}, not a state dict (parameter name -> tensor, "
            "as ProjectionLayer.state_dict() gives)"
        )
    nested = sorted(str(k) for k, v in state_dict.items() if isinstance(v, Mapping))
    if nested:
        raise fail(
            f"keys {nested} hold dicts, not tensors: a training checkpoint? Save the "
            f"ProjectionLayer's own state_dict() (keys {list(_RELEASED_KEYS)}) and import that"
        )
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state_dict.items()
                   if not isinstance(v, Tensor)]
    if not_tensors:
        raise fail(f"values that are not tensors: {not_tensors}")
    state = {str(k): v for k, v in state_dict.items()}
    file_key = {k: k for k in state}  # canonical key -> the file's own key
    for old, new in _LEGACY_KEYS.items():
        if old in state:
            if new in state:
                raise fail(f"holds both {old} and {new} (the same layer twice)")
            state[new] = state.pop(old)
            file_key[new] = file_key.pop(old)
    has = ", ".join(f"{file_key[k]} {list(v.shape)}" for k, v in list(state.items())[:12])
    has += f", ... ({len(state)} keys)" if len(state) > 12 else ""

    hidden_keys = [k for k in state if k.startswith("hidden_layers.0.")]
    if config is not None:
        projection, basis = config.projection, config.describe()
    else:
        projection = "mlp" if hidden_keys else "linear"
        basis = (
            "inferred from the keys: hidden_layers.0.* present, so mlp with tanh (the paper's)"
            if hidden_keys
            else "inferred from the keys: no hidden_layers.0.*, so linear"
        )
    expected = list(_RELEASED_KEYS) if projection == "mlp" else list(_RELEASED_KEYS)[:2]
    problems: list[str] = []
    unknown = [k for k in state if k not in _RELEASED_KEYS]
    if unknown:
        hints = sorted(
            {h for k in unknown for prefix, h in _UNSUPPORTED_HINTS.items() if k.startswith(prefix)}
        )
        problems.append(
            f"unsupported keys {[file_key[k] for k in unknown]}"
            + (f" (from {'; '.join(hints)})" if hints else "")
        )
    surplus = [file_key[k] for k in state if k in _RELEASED_KEYS and k not in expected]
    missing = [k for k in expected if k not in state]
    if config is not None and (surplus or any(k.startswith("hidden_layers.") for k in missing)):
        problems.append(
            f"{config.source} says hidden_layer: {projection == 'mlp'} ({projection}) but the "
            + (f"file has {surplus}" if surplus else f"file lacks {missing}")
        )
        missing = [k for k in missing if not k.startswith("hidden_layers.")]
    if missing:
        problems.append(f"missing keys {missing}")

    first = state.get("linear_layer.weight")
    if config is not None:
        dims: tuple[int, int] | None = (config.vision_dim, config.text_dim)
        dims_from = f"dino_embed_dim and clip_embed_dim of {config.source}"
        if config.defaulted:
            dims_from += f" ({', '.join(config.defaulted)}: ProjectionLayer's defaults)"
    elif first is not None and first.ndim == 2:
        dims, dims_from = (int(first.shape[0]), int(first.shape[1])), "linear_layer.weight"
    else:
        dims, dims_from = None, ""
        if first is not None:
            problems.append(f"linear_layer.weight must be 2-D [D, T], has {list(first.shape)}")
    for key, value in state.items():
        if key in _RELEASED_SHAPES and dims is not None and key in expected:
            want = [dims[0] if s == "D" else dims[1] for s in _RELEASED_SHAPES[key]]
            if list(value.shape) != want:
                problems.append(f"{file_key[key]} has shape {list(value.shape)}, expected {want}")
        if not value.is_floating_point():
            problems.append(f"{file_key[key]} holds {value.dtype}, not floating-point weights")
        elif not bool(torch.isfinite(value).all()):
            nan, inf = int(value.isnan().sum()), int(value.isinf().sum())
            problems.append(f"{file_key[key]} has {nan} NaN and {inf} Inf values")
    if problems:
        layout = ", ".join(f"{k} [{', '.join(_RELEASED_SHAPES[k])}]" for k in expected)
        if dims is not None:
            layout += f" with D={dims[0]}, T={dims[1]} (from {dims_from})"
        raise fail(
            f"not an importable Talk2DINO ProjectionLayer ({projection}) state dict: "
            f"{'; '.join(problems)}. Expected {layout}; the file has {has or 'no keys'}"
        )
    assert dims is not None  # no dims is a problem above
    cfg = Talk2DINOConfig(text_dim=dims[1], vision_dim=dims[0], projection=projection)
    model = build("talk2dino", cfg)
    model.load_state_dict({_RELEASED_KEYS[k]: v.float() for k, v in state.items()}, strict=True)
    return model, basis


def _read_released_state(uri: str) -> tuple[object, str]:
    """(what the file holds, "safetensors" | "pytorch"); anything else is one clear
    :class:`~dinoalign.errors.InferenceError`."""
    import pickle
    import re
    import warnings

    from dinoalign.errors import InferenceError

    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise InferenceError(f"{uri}: no such weights file") from None
    except OSError as e:
        raise InferenceError(f"{uri}: cannot read it ({_one_line(e)})") from None
    pickled = data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"  # torch.save zip / pickle
    if uri.lower().endswith(".safetensors") or (not pickled and _looks_like_safetensors(data)):
        import safetensors.torch

        try:
            return safetensors.torch.load(data), "safetensors"
        except Exception as e:  # safetensors raises its own SafetensorError
            raise InferenceError(
                f"{uri}: not a valid safetensors file ({_one_line(e)})"
            ) from None
    if not pickled:
        raise InferenceError(
            f"{uri}: neither a PyTorch checkpoint (torch.save) nor a safetensors file"
            + (" (it is empty)" if not data else "")
            + "; expected the ProjectionLayer state dict, e.g. the official "
            "weights/vitb_mlp_infonce.pth"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), "pytorch"
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise InferenceError(f"{uri}: a damaged PyTorch checkpoint ({_one_line(e)})") from None
        found = re.search(r"unsupported GLOBAL (\S+)", str(e))
        raise InferenceError(
            f"{uri}: holds pickled objects other than tensors"
            + (f" ({found.group(1)})" if found else "")
            + "; refused without running them (torch.load weights_only=True). Save only "
            "the ProjectionLayer's state_dict(), or convert it to .safetensors"
        ) from None
    except Exception as e:  # truncated zip, bad pickle opcodes, ...
        raise InferenceError(
            f"{uri}: a damaged PyTorch checkpoint ({type(e).__name__}: {_one_line(e)})"
        ) from None


def _looks_like_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length followed by a JSON object."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    return 0 < size <= len(data) - 8 and data[8:9] == b"{"


def _config_candidates(weights: str) -> list[str]:
    """``<stem>.yaml`` beside the weights, then ``../configs/<stem>.yaml``."""
    import posixpath

    from pathlib import Path

    if "://" in weights:
        here = posixpath.dirname(weights)
        stem = posixpath.splitext(posixpath.basename(weights))[0]
        return [f"{here}/{stem}.yaml", f"{posixpath.dirname(here)}/configs/{stem}.yaml"]
    path = Path(weights).absolute()
    return [
        str(path.with_suffix(".yaml")),
        str(path.parent.parent / "configs" / f"{path.stem}.yaml"),
    ]


def _exists(uri: str) -> bool:
    from dinoalign.storage import fs_for

    fs, path = fs_for(uri)
    return bool(fs.exists(path))


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"

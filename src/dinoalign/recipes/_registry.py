"""The one recipe registry: ``build(name, cfg)`` and ``load_recipe(directory)``.

Each recipe module registers its ``Recipe`` subclass with ``@RECIPES.register(name)``;
``dinoalign.recipes`` imports all of them, so the registry is full whenever this module
is importable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch

from dinoalign.config import from_dict
from dinoalign.recipes.base import (
    CONFIG_FILE,
    SAVE_FORMAT_VERSION,
    WEIGHTS_FILE,
    Recipe,
    join_uri,
)
from dinoalign.registry import Registry
from dinoalign.storage import read_bytes

RECIPES: Registry[type[Recipe]] = Registry("recipe")


def build(name: str, cfg: Any = None) -> Recipe:
    """A fresh recipe ``name`` from ``cfg``: its config dataclass, a mapping of its
    fields (checked like params.yaml), or None for the tiny demo defaults."""
    recipe_class = RECIPES.get(name)
    config_class = recipe_class.config_class
    if cfg is None:
        cfg = config_class()
    elif isinstance(cfg, Mapping):
        cfg = from_dict(config_class, dict(cfg), where=f"recipe {name}")
    elif not isinstance(cfg, config_class):
        raise TypeError(
            f"recipe {name!r} takes a {config_class.__name__} (or a mapping of its "
            f"fields), got {type(cfg).__name__}"
        )
    if cfg.name != name:
        raise ValueError(
            f"config {config_class.__name__} is named {cfg.name!r} but recipe {name!r} "
            f"was asked for; leave the name field at its default"
        )
    return recipe_class(cfg)


def load_recipe(directory: str) -> Recipe:
    """The recipe saved by ``Recipe.save(directory)`` (local path or URI), in eval mode.

    A missing, corrupt or mismatched ``config.json`` / ``model.safetensors`` is one
    :class:`~dinoalign.errors.InferenceError` naming the file and what is wrong with it."""
    from dinoalign.errors import InferenceError

    config_uri, weights_uri = join_uri(directory, CONFIG_FILE), join_uri(directory, WEIGHTS_FILE)
    try:
        config = json.loads(read_bytes(config_uri))
    except FileNotFoundError:
        raise InferenceError(
            f"{config_uri} does not exist: not a model folder written by the align stage "
            "(or dinoalign import-talk2dino)"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InferenceError(f"{config_uri} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(config, dict) or not {"recipe", "config"} <= set(config):
        raise InferenceError(
            f"{config_uri} lacks 'recipe' and 'config': not a dinoalign model config"
        )
    version = config.get("format_version")
    if version != SAVE_FORMAT_VERSION:
        raise InferenceError(
            f"{directory}/{CONFIG_FILE} has format_version {version!r}; this dinoalign "
            f"reads version {SAVE_FORMAT_VERSION}. Re-export the model with this version."
        )
    try:
        model = build(config["recipe"], config["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise InferenceError(f"{config_uri}: {e.args[0] if e.args else e}") from None
    try:
        state = safetensors.torch.load(read_bytes(weights_uri))
    except FileNotFoundError:
        raise InferenceError(f"{weights_uri} does not exist (the model's weights)") from None
    except Exception as e:  # safetensors raises its own SafetensorError on corrupt bytes
        raise InferenceError(
            f"{weights_uri} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt: re-run the align stage or re-download it"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InferenceError(
            f"{weights_uri} does not fit the {config['recipe']} config of {config_uri}: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from None
    return model.eval()

"""Prompt templates for zero-shot classification and open-vocabulary segmentation.

``{}`` is replaced by the class name. ``OPENAI_IMAGENET_TEMPLATES`` are the 80 prompts of
the CLIP paper's ImageNet evaluation; ``TALK2DINO_TEMPLATES`` the 7-prompt subset used by
TCL, ProxyCLIP and Talk2DINO for segmentation, string for string as TCL's
``sub_imagenet_template``.

Import-light: ``OPENAI_IMAGENET_TEMPLATES`` (and ``TEMPLATE_SETS``) are read from open_clip,
which loads torch, on first use; :func:`check_templates` validates a spec without it (the
``evaluate`` params section does, every time params load).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence


@functools.cache
def _openai_imagenet_templates() -> tuple[str, ...]:
    """open_clip's copy of the CLIP notebook's list (callables ``lambda c: f"... {c}."``),
    turned into ``{}`` strings: one maintained source instead of a copy here."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as template_fns

    return tuple(t("{}") for t in template_fns)


# TCL's ``sub_imagenet_template`` (datasets/templates.py), which Talk2DINO evaluates with
# (``get_template`` in src/open_vocabulary_segmentation, imported by its DINOText model):
# note "a bad photo of a {}." (not "of the").
TALK2DINO_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

_TEMPLATE_SETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "openai_imagenet": _openai_imagenet_templates,
    "talk2dino": lambda: TALK2DINO_TEMPLATES,
}


def __getattr__(name: str) -> Any:
    if name == "OPENAI_IMAGENET_TEMPLATES":
        return _openai_imagenet_templates()
    if name == "TEMPLATE_SETS":  # name -> templates
        return {key: load() for key, load in _TEMPLATE_SETS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (``openai_imagenet``, ``talk2dino``) or an explicit list;
    every template must contain exactly one ``{}``."""
    check_templates(spec)
    return _TEMPLATE_SETS[spec]() if isinstance(spec, str) else tuple(spec)


def check_templates(spec: str | Sequence[str]) -> None:
    """The checks of :func:`resolve_templates`, with the same errors, without loading a
    named set."""
    if isinstance(spec, str):
        if spec not in _TEMPLATE_SETS:
            raise KeyError(
                f"unknown template set {spec!r}; known: {sorted(_TEMPLATE_SETS)}, "
                "or pass a list of strings with one '{}' each"
            )
        return
    templates = tuple(spec)
    if not templates:
        raise ValueError("need at least one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(
            f"each template needs exactly one '{{}}' for the class name; bad: {bad[:3]}"
        )

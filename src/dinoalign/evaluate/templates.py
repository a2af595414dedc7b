"""Prompt templates for zero-shot classification and open-vocabulary segmentation.

``{}`` is replaced by the class name. ``OPENAI_IMAGENET_TEMPLATES`` are the 80 prompts of
the CLIP paper's ImageNet evaluation; ``TALK2DINO_TEMPLATES`` the 7-prompt subset used by
TCL, ProxyCLIP and Talk2DINO for segmentation, string for string as TCL's
``sub_imagenet_template``.
"""

from __future__ import annotations

from typing import Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as _OPENAI_TEMPLATE_FNS

# open_clip's copy of the CLIP notebook's list (callables ``lambda c: f"... {c}."``),
# turned into ``{}`` strings: one maintained source instead of a copy here.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in _OPENAI_TEMPLATE_FNS)

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

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "talk2dino": TALK2DINO_TEMPLATES,
}


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (``openai_imagenet``, ``talk2dino``) or an explicit list;
    every template must contain exactly one ``{}``."""
    if isinstance(spec, str):
        if spec not in TEMPLATE_SETS:
            raise KeyError(
                f"unknown template set {spec!r}; known: {sorted(TEMPLATE_SETS)}, "
                "or pass a list of strings with one '{}' each"
            )
        return TEMPLATE_SETS[spec]
    templates = tuple(spec)
    if not templates:
        raise ValueError("need at least one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(
            f"each template needs exactly one '{{}}' for the class name; bad: {bad[:3]}"
        )
    return templates

"""The three alignment recipes behind one registry.

``build("talk2dino" | "dinotxt" | "projector", cfg)`` gives a pure ``nn.Module`` with
``loss(batch)``, ``encode_image(batch)``, ``encode_text(...)``, ``dense_logits(...)``,
``param_groups(weight_decay)`` and ``save(dir)``; ``load_recipe(dir)`` reads one back.
"""

from dinoalign.recipes.base import Recipe
from dinoalign.recipes.dinotxt import DinoTxt, DinoTxtConfig
from dinoalign.recipes.projector import Projector, ProjectorConfig, ProjectorWithResiduals
from dinoalign.recipes._registry import RECIPES, build, load_recipe
from dinoalign.recipes.talk2dino import Talk2DINO, Talk2DINOConfig, background_cleaning
from dinoalign.recipes.talk2dino_release import (
    import_talk2dino_checkpoint,
    load_talk2dino_checkpoint,
)

__all__ = [
    "RECIPES",
    "DinoTxt",
    "DinoTxtConfig",
    "Projector",
    "ProjectorConfig",
    "ProjectorWithResiduals",
    "Recipe",
    "Talk2DINO",
    "Talk2DINOConfig",
    "background_cleaning",
    "build",
    "import_talk2dino_checkpoint",
    "load_recipe",
    "load_talk2dino_checkpoint",
]

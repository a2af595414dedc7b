"""Training of the alignment recipes: the shared Ray Train loop and the align stage.

- :mod:`.config`: the ``align`` params section (import-light; ``dinoalign.config`` uses it);
- :mod:`.data`: training samples of each recipe from the feature store, the sampler;
- :mod:`.optim`: optimisers and learning-rate schedules;
- :mod:`.loop`: :class:`~.loop.Trainer` (the loop, checkpoints) and the Ray Train driver;
- :mod:`.stage`: the align stage (MLflow run, export, registration).

Only the config is imported here, so that loading params stays free of torch and Ray.
"""

from dinoalign.train.config import (
    AlignConfig,
    DinoTxtTrainingConfig,
    ProjectorTrainingConfig,
    RecipeTrainingConfig,
    Talk2DINOTrainingConfig,
    recipe_names,
)

__all__ = [
    "AlignConfig",
    "DinoTxtTrainingConfig",
    "ProjectorTrainingConfig",
    "RecipeTrainingConfig",
    "Talk2DINOTrainingConfig",
    "recipe_names",
]

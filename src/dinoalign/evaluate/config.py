"""The ``evaluate:`` section of params.yaml (the evaluate and report stages, and the
inference commands' defaults).

Defaults are the demo profile: the synthetic world's test split, seen and held-out
compositions reported separately (params.yaml sets the segmentation window to the
demo's 112-pixel embed size). The papers' settings are in docs/reproduce.md (short
side 448, crop 448, stride 224, PAMR on for the "with refinement" rows, 80 ImageNet
templates for zero-shot, 7 for dense).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from dinoalign.errors import ConfigError
from dinoalign.evaluate.templates import check_templates
from dinoalign.train.config import recipe_names

DEMO_DATASET = "demo"
DEVICES = ("auto", "cpu", "cuda")

# Talk2DINO's background cleaning per dataset, as its official evaluation configs set it
# (lorebianchi98/Talk2DINO src/open_vocabulary_segmentation/configs/<dataset>/
# dinotext_<dataset>_vit{b,l}_mlp_infonce.yml, ``with_bg_clean``): on for VOC with
# background and COCO-Object, off for Pascal Context with background (threshold 0.55 on
# all three). The demo world, whose background is empty canvas, cleans as VOC does.
OFFICIAL_BACKGROUND_CLEANING: dict[str, bool] = {
    "voc21": True,
    "coco_object": True,
    "context60": False,
    DEMO_DATASET: True,
}


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    """Inference settings. Defaults are the demo size; the papers use short_side 448,
    max_long_side 2048, crop 448, stride 224, PAMR on for the "with refinement" rows and
    bg_threshold 0.55 (Talk2DINO ViT-B; 0.54 ViT-L) on datasets with a background class.

    The two bilinear resizes have their own corner setting, as in the official code:
    ``window_align_corners`` for the patch grid -> window upsampling (Talk2DINO's
    ``DINOText.generate_masks``: ``align_corners=True``) and ``output_align_corners`` for
    the resize back to the original image (mmseg's ``EncoderDecoder.align_corners``,
    False in the Talk2DINO/TCL evaluation configs)."""

    short_side: int = 224
    max_long_side: int = 1024
    crop: int = 224
    stride: int = 112
    window_align_corners: bool = True
    output_align_corners: bool = False
    bg_threshold: float | None = 0.55  # None: background must be a scored text class
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)

    def __post_init__(self) -> None:
        if min(self.short_side, self.max_long_side, self.crop, self.stride) < 1:
            raise ValueError("short_side, max_long_side, crop and stride must be positive")
        if self.stride > self.crop:
            raise ValueError(
                f"stride {self.stride} > crop {self.crop} would leave pixels no window covers; "
                "use stride <= crop"
            )


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What ``dinoalign evaluate`` measures and where it writes.

    - ``recipes``: the models to evaluate, each read from ``<paths.models>/<recipe>/``
      where the align stage writes it (DVC runs one ``evaluate@<recipe>`` per entry by
      overriding this list); the report compares the same recipes.
    - ``dataset``: ``demo`` (the synthetic world from ``paths.pairs``: zero-shot,
      retrieval and segmentation on ``split``) or a registered evaluation dataset
      (``voc21``, ``ade20k``, ``karpathy``, ``imagenet_folder``... see
      :data:`dinoalign.evaluate.datasets.EVAL_DATASETS`) read from ``root`` with
      ``dataset_options`` (``split``, ``json_file``...); its task decides the metrics.
    - ``zeroshot_templates`` / ``dense_templates``: a template set name
      (``openai_imagenet`` = the 80 CLIP prompts, ``talk2dino`` = the 7 TCL prompts) or
      a list of prompts with one ``{}``.
    - ``segmentation``: resize, sliding window, PAMR and the default background
      threshold; ``bg_thresholds`` overrides the threshold per recipe (their scores live
      on different scales: talk2dino a sigmoid of a cosine, dinotxt a cosine).
      ``bg_threshold_split`` (demo only): instead, pick each model's threshold with the
      best mIoU on up to ``bg_threshold_images`` images of that split (e.g. ``val``),
      never on the split evaluated; the metrics record the choice.
    - ``background_cleaning`` / ``cleaning_lambda``: talk2dino's cleaning (λ) on
      datasets with a background class: ``auto`` (default) as the official configs set
      it per dataset (:data:`OFFICIAL_BACKGROUND_CLEANING`: VOC21 and COCO-Object on,
      Context-60 off; other datasets with a background class on), or ``true``/``false``
      for every dataset. Never on datasets without a background class.
    - ``max_images``: evaluate only the first N images of each set (smoke runs).
    - ``save_predictions``: write every predicted label map as a PNG under
      ``<paths.plots>/<recipe>/predictions/``; ``num_examples`` overlays are always made.
    - ``mlflow_ui``: the
      address its run links use when runs are in the embedded store (``make mlflow-ui``).
    """

    recipes: list[str] = dataclasses.field(default_factory=lambda: list(recipe_names()))
    mlflow_ui: str = "http://127.0.0.1:5000"
    dataset: str = DEMO_DATASET
    root: str | None = None
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: str = "test"
    zeroshot_templates: str | list[str] = "openai_imagenet"
    dense_templates: str | list[str] = "talk2dino"
    ks: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 64
    max_images: int | None = None
    segmentation: SegmentationConfig = dataclasses.field(default_factory=SegmentationConfig)
    bg_thresholds: dict[str, float | None] = dataclasses.field(default_factory=dict)
    bg_threshold_split: str | None = None
    bg_threshold_images: int = 100
    background_cleaning: bool | str = "auto"
    cleaning_lambda: float = 0.2
    save_predictions: bool = False
    num_examples: int = 4
    device: str = "auto"
    torch_threads: int = 2

    def __post_init__(self) -> None:
        if not self.recipes or len(set(self.recipes)) != len(self.recipes):
            raise ConfigError(
                f"evaluate.recipes must be a non-empty list without repeats, got {self.recipes}"
            )
        unknown = [r for r in self.recipes if r not in recipe_names()]
        if unknown:
            raise ConfigError(
                f"evaluate.recipes names {unknown}, which are not recipes: use some of "
                f"{recipe_names()}"
            )
        if self.dataset != DEMO_DATASET:
            from dinoalign.evaluate.datasets import EVAL_DATASETS  # the adapters: numpy, PIL

            try:
                EVAL_DATASETS.get(self.dataset)
            except KeyError as e:
                raise ConfigError(f"evaluate.dataset: {e.args[0]} (or {DEMO_DATASET!r})") from None
            if not self.root:
                raise ConfigError(
                    f"evaluate.dataset={self.dataset!r} needs evaluate.root (its folder or URI)"
                )
            _check_dataset_options(self.dataset, self.dataset_options)
        for name in ("zeroshot_templates", "dense_templates"):
            try:
                check_templates(getattr(self, name))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"evaluate.{name}: {e.args[0]}") from None
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"evaluate.ks must be positive integers, got {self.ks}")
        if self.batch_size < 1 or self.num_examples < 0 or self.torch_threads < 1:
            raise ConfigError(
                "evaluate.batch_size and torch_threads must be >= 1, num_examples >= 0"
            )
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"evaluate.max_images must be >= 1 or null, got {self.max_images}")
        if self.device not in DEVICES:
            raise ConfigError(f"evaluate.device must be one of {DEVICES}, got {self.device!r}")
        if self.bg_threshold_split is not None and self.bg_threshold_split == self.split:
            raise ConfigError(
                f"evaluate.bg_threshold_split is the evaluated split {self.split!r}: the "
                "threshold must be chosen on other images (e.g. val)"
            )
        if self.bg_threshold_images < 1:
            raise ConfigError(
                f"evaluate.bg_threshold_images must be >= 1, got {self.bg_threshold_images}"
            )
        if self.background_cleaning not in ("auto", True, False):
            raise ConfigError(
                "evaluate.background_cleaning must be auto (as the official configs set it "
                f"per dataset), true or false, got {self.background_cleaning!r}"
            )
        if self.cleaning_lambda < 0:
            raise ConfigError(f"evaluate.cleaning_lambda must be >= 0, got {self.cleaning_lambda}")

    def cleans_background(self, has_background: bool, dataset: str | None = None) -> bool:
        """Whether talk2dino's background cleaning runs on ``dataset`` (default: this
        config's ``dataset``), one with a background class or not."""
        if not has_background or self.background_cleaning is False:
            return False
        if self.background_cleaning is True:
            return True
        return OFFICIAL_BACKGROUND_CLEANING.get(dataset or self.dataset, True)

    def segmentation_for(self, recipe: str) -> SegmentationConfig:
        """The segmentation settings of ``recipe``: its ``bg_thresholds`` entry, if any,
        replaces the shared background threshold."""
        if recipe in self.bg_thresholds:
            return dataclasses.replace(self.segmentation, bg_threshold=self.bg_thresholds[recipe])
        return self.segmentation


def _check_dataset_options(dataset: str, options: dict[str, Any]) -> None:
    """Unknown ``dataset_options`` keys fail when params load, naming the adapter's own."""
    from dinoalign.evaluate.datasets import EVAL_DATASETS

    accepted = [
        name
        for name, p in inspect.signature(EVAL_DATASETS.get(dataset)).parameters.items()
        if name != "root" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"evaluate.dataset_options: {dataset!r} takes {accepted or 'no options'}, not "
            f"{unknown}"
        )

"""What an align run trains on, and what it leaves behind (the stage itself:
:mod:`dinoalign.stages.align`).

:func:`plan_align` resolves one recipe against the features: its train uids (the curated
subset when ``<paths.curated>/uids.parquet`` exists and ``align.use_curated``), model widths from the feature spec, its training
samples, and the run name ``<recipe>-<hash>`` (the hash covers the model config, the
training section, the seed, the feature spec and the train uids), so re-running after a
crash resumes from the latest checkpoint in ``paths.checkpoints``, while any change that
would make other batches starts afresh. :func:`export_model` and :func:`write_curve` write
``<paths.models>/<recipe>/`` (``model.safetensors`` + ``config.json``, read by
``dinoalign.recipes.load_recipe``) and ``<paths.curves>/<recipe>/curve.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from dinoalign.data.prepare import read_pairs
from dinoalign.embed.store import FeatureStore
from dinoalign.recipes.base import CONFIG_FILE, WEIGHTS_FILE
from dinoalign.storage import atomic_path
from dinoalign.train.config import AlignConfig, RecipeTrainingConfig
from dinoalign.train.data import (
    FeatureSource,
    TrainingData,
    TrainSelection,
    build_training_data,
    model_config,
    read_spec,
    train_uids,
    uids_digest,
)

CURVE_FILE = "curve.csv"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class AlignPlan:
    """What one align run trains on and where its checkpoints go."""

    recipe: str
    training: RecipeTrainingConfig
    model_config: Any
    data: TrainingData
    selection: TrainSelection
    spec_hash: str
    run_name: str
    storage_path: str  # absolute local path or s3:// URI


def plan_align(
    cfg: AlignConfig, seed: int, limits: dict[str, Any], features: str, pairs_dir: str,
    curated: str | None, checkpoints: str, root: Path,
) -> AlignPlan:
    """Resolve ``cfg.recipe`` against the features at ``features`` and the pairs manifest
    in ``pairs_dir``: train uids (those ``curated``, the curate stage's uids.parquet, keeps
    when given), model dims, samples (images read within ``limits``); checkpoints go to
    ``checkpoints`` (a local path or URI). ``root``: the checkout, against which the
    manifest's relative image paths are read."""
    training = cfg.training
    recipe = cfg.recipe
    assert recipe is not None  # cfg.training raised otherwise
    spec = read_spec(features)
    manifest = read_pairs(pairs_dir)
    content = FeatureStore(features).digest()  # the features' bytes, not only their spec
    selection = train_uids(manifest, curated, content)
    model_cfg = model_config(recipe, training, spec)
    source = FeatureSource(features, spec, manifest, selection.uids, root)
    data = build_training_data(recipe, training, model_cfg, source, image_limits=limits, seed=seed)
    identity = {
        "recipe": recipe,
        "model": dataclasses.asdict(model_cfg),
        "training": dataclasses.asdict(training),
        "seed": seed,
        "features": spec["spec_hash"],
        # edited captions or replaced images under the same uids (retrain) change the
        # content: a new run, never a "resume" of the finished run on the old features
        "content": content,
        "uids": uids_digest(selection.uids),
    }
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=6).hexdigest()
    return AlignPlan(
        recipe=recipe,
        training=training,
        model_config=model_cfg,
        data=data,
        selection=selection,
        spec_hash=spec["spec_hash"],
        run_name=cfg.run_name or f"{recipe}-{digest}",
        storage_path=checkpoints,
    )


def export_model(checkpoint: Any, model_dir: Path) -> None:
    """Copy the model files of a Ray Train checkpoint (local or S3) to ``model_dir``,
    replacing what was there."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    with checkpoint.as_directory() as directory:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copyfile(Path(directory) / name, model_dir / name)


def write_curve(curve: list[dict[str, float]], path: Path) -> None:
    """The curve rows as CSV: step, epoch, loss, lr, samples_per_s, then the recipe's
    other statistics (the DVC plot of the stage)."""
    first = ["step", "epoch", "loss", "lr", "samples_per_s"]
    columns = first + sorted(set(curve[0]) - set(first))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in curve:
            writer.writerow({k: (int(row[k]) if k == "step" else f"{row[k]:.6g}") for k in columns})

"""What limits the demo's segmentation mIoU (issue #15: "if a target is out of reach, find
what limits it: patch resolution? attention? the text tower?").

    python benchmarks/dense_limits.py                 # in a checkout after `make demo`
    python benchmarks/dense_limits.py --out docs/benchmarks/dense_limits.json
    python benchmarks/dense_limits.py --weights other/model.safetensors   # another pretraining

Three upper bounds on the demo world's test images, each scored the way the evaluate stage
scores segmentation (one confusion matrix over all pixels, mIoU over background + the
classes present; patch scores bilinearly upsampled to the image, ``align_corners=True`` as
Talk2DINO's ``generate_masks``), next to what the recipes reach (``metrics/<recipe>.json``):

1. **patch grid**: each patch scored by the true share of every class inside it (the mask
   average-pooled to the 8×8 grid at 112 px / patch 14), upsampled and argmaxed. No model
   that scores patches can beat it at this resolution: what patch size alone costs.
2. **linear probe on the patch tokens**: a softmax classifier per patch (background + the
   30 compositions) trained on the true class shares of train-split patches, applied to
   test patches; for the pretrained backbone (``backbone.weights``) and its random init.
   What the frozen features carry about "which class is here" when a supervised linear
   head (not text) reads them. Held-out compositions never occur in train, so the probe is
   scored on the *seen* subset only; the recipes' seen mIoU is the comparison.
3. **linear probe on colour and shape separately** (two softmax heads: 6 colours + bg, 5
   shapes + bg, a patch's composition = its best colour × best shape), which can name
   held-out compositions: a linear model of the features that composes as the captions
   do, on both subsets.

The recipes' gap to (2)/(3) is what the text side (alignment, the text tower, the
vocabulary) loses; the gap from (2) to (1) is what the features lose; (1) itself is the
resolution's cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoalign.backbones.dinov2 import build_backbone_from
from dinoalign.config import load_params
from dinoalign.data.synthetic import CLASSES, COLOURS, SHAPES, is_heldout_image, render
from dinoalign.evaluate.metrics import ConfusionMatrix
from dinoalign.tracking import git_commit

IGNORE = 255


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (params.yaml, metrics/)")
    p.add_argument("--n-train", type=int, default=1500, help="train images for the probes")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the whole test split)")
    p.add_argument("--epochs", type=int, default=150, help="probe epochs (5 full-batch Adam steps each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=Path, default=None,
                   help="probe this checkpoint as 'pretrained' instead of backbone.weights (e.g. a pretrain run "
                        "with other settings: dinoalign pretrain pretrain.ibot_loss_weight=1 paths.pretrained=DIR)")
    p.add_argument("--label", default=None,
                   help="what the probed backbone is, for the report's table (default: backbone.weights of --root, "
                        "or the --weights file)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def _render(world: Any, split: str, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images N×S×S×3 uint8, masks N×S×S (0 background, c+1 composition c), held-out flags."""
    samples = [render(world, split, i) for i in range(count)]
    return (np.stack([s.image for s in samples]), np.stack([s.mask for s in samples]),
            np.array([is_heldout_image(world, split, i) for i in range(count)]))


def _shares(masks: np.ndarray, num: int, patch: int, lut: np.ndarray | None = None) -> torch.Tensor:
    """Class share per patch: N×num×h×w (``lut`` maps mask values to the ``num`` classes)."""
    values = torch.from_numpy(lut[masks] if lut is not None else masks).long()
    one_hot = F.one_hot(values, num).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch)


def _upsampled_labels(scores: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=True).argmax(1)


def _miou(pred: torch.Tensor, masks: np.ndarray) -> float:
    confusion = ConfusionMatrix(len(CLASSES) + 1, IGNORE)
    confusion.update(pred, torch.from_numpy(masks).long())
    return float(confusion.miou())


@torch.no_grad()
def _patch_tokens(backbone: Any, images: np.ndarray, batch: int = 100) -> tuple[torch.Tensor, tuple[int, int]]:
    out, grid = [], None
    for i in range(0, len(images), batch):
        o = backbone(backbone.normalize(torch.from_numpy(images[i : i + batch])))
        out.append(o.patches)
        grid = o.grid
    return torch.cat(out), grid  # N×P×D


def _fit_softmax(x: torch.Tensor, target: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Linear:
    """A linear softmax head on standardised features, soft targets (class shares), Adam."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], target.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(epochs):
        for _inner in range(5):
            opt.zero_grad()
            loss = -(target * F.log_softmax(head(x), -1)).sum(-1).mean()
            loss.backward()
            opt.step()
    return head


def _probe(train_x: torch.Tensor, train_masks: np.ndarray, test_x: torch.Tensor, grid: tuple[int, int],
           patch: int, size: int, epochs: int) -> dict[str, torch.Tensor]:
    """Label maps of the test images from (a) the composition probe, (b) the colour × shape probe."""
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)) + 1e-6
    flat = lambda t: ((t - mean) / std).reshape(-1, t.shape[-1])  # noqa: E731
    h, w = grid
    n_test = test_x.shape[0]

    def scores(head: torch.nn.Linear) -> torch.Tensor:
        with torch.no_grad():
            return head(flat(test_x)).softmax(-1).reshape(n_test, h, w, -1).permute(0, 3, 1, 2)

    def target(num: int, lut: np.ndarray | None = None) -> torch.Tensor:
        return _shares(train_masks, num, patch, lut).permute(0, 2, 3, 1).reshape(-1, num)

    composition = scores(_fit_softmax(flat(train_x), target(len(CLASSES) + 1), epochs))
    colours, shapes = list(COLOURS), list(SHAPES)
    colour_lut = np.array([0] + [colours.index(c.split()[0]) + 1 for c in CLASSES])
    shape_lut = np.array([0] + [shapes.index(c.split()[1]) + 1 for c in CLASSES])
    colour = scores(_fit_softmax(flat(train_x), target(len(colours) + 1, colour_lut), epochs))
    shape = scores(_fit_softmax(flat(train_x), target(len(shapes) + 1, shape_lut), epochs))
    # composition c = (colour i, shape j): p(c) ∝ p(colour i)·p(shape j); background: both say so
    pairs = torch.stack([colour[:, colours.index(c.split()[0]) + 1] * shape[:, shapes.index(c.split()[1]) + 1]
                         for c in CLASSES], 1)
    factored = torch.cat([(colour[:, :1] * shape[:, :1]).sqrt(), pairs.sqrt()], 1)
    return {"composition": _upsampled_labels(composition, size), "colour_x_shape": _upsampled_labels(factored, size)}


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    params = load_params(args.root / "params.yaml")
    world = params.data.synthetic
    size = world.image_size
    n_test = args.n_test or world.n_test
    started = time.perf_counter()
    train_images, train_masks, _ = _render(world, "train", min(args.n_train, world.n_train))
    test_images, test_masks, heldout = _render(world, "test", n_test)
    subsets = {"seen": ~heldout, "heldout": heldout}

    pretrained_cfg = params.backbone.at_root(args.root)
    if args.weights is not None:
        pretrained_cfg = dataclasses.replace(pretrained_cfg, weights=str(args.weights.resolve()))
    if pretrained_cfg.weights and "://" not in pretrained_cfg.weights and not Path(pretrained_cfg.weights).is_file():
        raise SystemExit(f"{pretrained_cfg.weights} does not exist: run `make demo` (or `dvc repro pretrain`) first")
    random_cfg = dataclasses.replace(pretrained_cfg, weights=None, pretrained=False)
    label = args.label or ("the demo backbone (backbone.weights)" if args.weights is None else str(args.weights))
    result: dict[str, Any] = {"n_train": len(train_images), "n_test": {k: int(v.sum()) for k, v in subsets.items()},
                              "image_size": size, "weights": pretrained_cfg.weights, "label": label,
                              "date": time.strftime("%Y-%m-%d"), "commit": git_commit(Path(__file__).resolve().parents[1]),
                              "root_commit": git_commit(args.root), "metrics": {}}
    patch = None
    for name, cfg in (("pretrained", pretrained_cfg), ("random_init", random_cfg)):
        backbone = build_backbone_from(cfg, params.seed)
        patch = backbone.patch_size
        train_x, grid = _patch_tokens(backbone, train_images)
        test_x, _ = _patch_tokens(backbone, test_images)
        labels = _probe(train_x, train_masks, test_x, grid, patch, size, args.epochs)
        for probe, pred in labels.items():
            for subset, keep in subsets.items():
                if probe == "composition" and subset == "heldout":
                    continue  # held-out compositions never reach a supervised composition head
                result["metrics"][f"probe_{probe}.{name}.{subset}"] = _miou(pred[keep], test_masks[keep])
    for subset, keep in subsets.items():
        grid_scores = _shares(test_masks[keep], len(CLASSES) + 1, patch)
        result["metrics"][f"patch_grid.{subset}"] = _miou(_upsampled_labels(grid_scores, size), test_masks[keep])
    for recipe in ("talk2dino", "dinotxt"):
        path = args.root / params.paths.metrics / f"{recipe}.json"
        if path.is_file():  # the headline: the seen subset at the top, the held-out one under "heldout"
            headline = json.loads(path.read_text())
            for subset, block in (("seen", headline), ("heldout", headline.get("heldout") or {})):
                value = (block.get("segmentation") or {}).get("miou")
                if value is not None:
                    result["metrics"][f"{recipe}.{subset}"] = value
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                         "torch": torch.__version__, "threads": args.threads}

    print(f"{'what':48s} {'seen':>7s} {'held-out':>9s}")
    rows = [("patch grid (true class shares per patch)", "patch_grid")]
    rows += [(f"linear probe, compositions, {b}", f"probe_composition.{b}") for b in ("pretrained", "random_init")]
    rows += [(f"linear probe, colour x shape, {b}", f"probe_colour_x_shape.{b}") for b in ("pretrained", "random_init")]
    rows += [(f"{r} (evaluate stage)", r) for r in ("talk2dino", "dinotxt")]
    for label, key in rows:
        cells = [result["metrics"].get(f"{key}.{s}") for s in ("seen", "heldout")]
        print(f"{label:48s} " + " ".join(f"{100 * c:7.1f}" if c is not None else f"{'—':>7s}" for c in cells))
    print(f"({result['seconds']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

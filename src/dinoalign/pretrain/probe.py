"""Is a backbone self-supervised in fact? Two probes on held-out single-object images:

- :func:`attention_mass`: the share of the last block's CLS->patch attention (softmax over
  the patches, per head) that falls inside the object mask, against the object's area
  share (what a uniform attention puts there);
- :func:`knn_top1`: k-NN classification of CLS features, facebookresearch/dino
  ``eval_knn.py`` ``knn_classifier`` (cosine similarity of L2-normalised features, the k
  nearest vote with weight exp(sim / T), k = 20, T = 0.07).

:func:`probe_images` renders the demo world's single-object images with their masks,
compositions, colours and background kinds (in memory; use splits the pretraining pool
did not draw from). k-NN by colour and by background kind tells what the CLS encodes.
:func:`compare_backbones` runs both probes on a pretrained backbone and its random init
(the pretrain stage's ``metrics.json``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinoalign.backbones.dinov2 import DinoBackbone


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """Single-object demo images: ``images`` uint8 n×S×S×3, ``masks`` bool n×S×S (the
    object), and per image the index of its composition in ``CLASSES`` (``labels``), of its
    colour in ``COLOURS`` (``colours``) and of its background kind (``backgrounds``)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    colours: np.ndarray
    backgrounds: np.ndarray


def probe_images(
    world: Any, split: str, n: int, start: int = 0, seen_only: bool = False
) -> ProbeSet:
    """The first ``n`` single-object images of ``split`` from index ``start`` of the demo
    world (a ``SyntheticWorldConfig``), rendered in memory. ``seen_only`` skips held-out
    compositions."""
    from dinoalign.data.synthetic import (
        BACKGROUNDS,
        CLASSES,
        COLOURS,
        heldout_compositions,
        rasterise,
        sample_scene,
    )

    held = set(heldout_compositions(world))
    images, masks, labels, colours, backgrounds = [], [], [], [], []
    index = start
    while len(images) < n:
        scene = sample_scene(world, split, index)
        index += 1
        if scene.label is None or (seen_only and scene.label in held):
            continue
        image, mask = rasterise(scene, world.image_size)
        images.append(image)
        masks.append(mask > 0)
        labels.append(CLASSES.index(scene.label))
        colours.append(list(COLOURS).index(scene.objects[0].colour))
        backgrounds.append(list(BACKGROUNDS).index(scene.background))
    return ProbeSet(np.stack(images), np.stack(masks), np.asarray(labels), np.asarray(colours),
                    np.asarray(backgrounds))


@torch.no_grad()
def features(
    backbone: DinoBackbone, images: np.ndarray, batch_size: int = 128
) -> tuple[Tensor, Tensor]:
    """CLS features N×D and last-block CLS->patch attention N×H×P (softmax over patches)
    of uint8 images N×S×S×3 (S a multiple of the patch size)."""
    cls, attn = [], []
    for i in range(0, len(images), batch_size):
        out = backbone(backbone.normalize(torch.from_numpy(images[i : i + batch_size])))
        cls.append(out.cls)
        attn.append(out.attn_logits.softmax(-1))
    return torch.cat(cls), torch.cat(attn)


def patch_coverage(masks: np.ndarray, patch_size: int) -> Tensor:
    """Share of each patch covered by the mask: bool N×S×S -> N×P (row-major grid)."""
    m = torch.from_numpy(masks).float()[:, None]
    return F.avg_pool2d(m, patch_size).flatten(1)


def attention_mass(attn: Tensor, coverage: Tensor) -> Tensor:
    """Attention mass inside the mask per image and head: Σ_p a_hp·cover_p, N×H."""
    return torch.einsum("nhp,np->nh", attn, coverage)


def knn_top1(
    train_feats: Tensor, train_labels: np.ndarray, test_feats: Tensor, test_labels: np.ndarray,
    k: int = 20, temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of DINO's weighted k-NN classifier (``eval_knn.knn_classifier``)."""
    train = F.normalize(train_feats, dim=1)
    test = F.normalize(test_feats, dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims, idx = (test @ train.T).topk(min(k, len(train)), dim=1)
    neighbours = torch.from_numpy(train_labels)[idx]  # Q×k
    votes = torch.zeros(len(test), num_classes)
    votes.scatter_add_(1, neighbours, (sims / temperature).exp())
    return float((votes.argmax(1).numpy() == test_labels).mean())


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(X >= wins) for X ~ Binomial(n, 1/2)."""
    return float(sum(math.comb(n, j) for j in range(wins, n + 1)) / 2**n)


def attention_report(backbone: DinoBackbone, images: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """Attention-mass probe of ``backbone``: ``per_image`` N×H masses, ``area_per_image``
    (N object area shares: the mass of a uniform attention), ``best_head`` (the head with
    the highest mean), ``best`` and ``mean_heads`` (mean over images of that head / of the
    mean over heads), ``best_above_area`` (share of images where that head puts more mass
    on the object than uniform attention would) and ``area`` (mean area share)."""
    _, attn = features(backbone, images)
    coverage = patch_coverage(masks, backbone.patch_size)
    mass = attention_mass(attn, coverage)
    per_head = mass.mean(0)
    best = int(per_head.argmax())
    area = coverage.mean(1)
    return {
        "per_image": mass,
        "area_per_image": area,
        "best_above_area": float((mass[:, best] > area).float().mean()),
        "best_head": best,
        "best": float(per_head[best]),
        "mean_heads": float(per_head.mean()),
        "area": float(area.mean()),
    }


KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's eval_knn (knn_top1's defaults)


def _knn_block(ref: ProbeSet, query: ProbeSet, feats: dict[str, tuple[Tensor, Tensor]],
               attribute: str) -> dict[str, float]:
    """k-NN top-1 of each backbone on one attribute, with the majority share of the
    queries and the chance of a uniform guess over the values present among them."""
    ref_labels, query_labels = getattr(ref, attribute), getattr(query, attribute)
    block = {name: knn_top1(r, ref_labels, q, query_labels, KNN_K, KNN_TEMPERATURE) for name, (r, q) in feats.items()}
    block["majority"] = float(np.bincount(query_labels).max() / len(query_labels))
    block["chance"] = 1.0 / len(np.unique(query_labels))
    return block


def paired_permutation_p(
    differences: np.ndarray, permutations: int = 10000, seed: int = 0, two_sided: bool = False
) -> float:
    """Paired permutation (sign-flip) test of mean(``differences``): one-sided (> 0) by
    default, or two-sided (|mean| at least the observed |mean|). With 2^n <= ``permutations``
    (n differences: a handful of seeds) every sign vector is enumerated and p is exact;
    otherwise ``permutations`` random flips with the observed counted as one of them, so
    p >= 1 / (permutations + 1). Unlike the sign test it weighs how much each pair differs,
    which matters when one model's masses are bimodal. All-zero differences give p = 1."""
    d = np.asarray(differences, dtype=np.float64)
    if not np.any(d):
        return 1.0
    if 2 ** len(d) <= permutations:
        signs = 1.0 - 2.0 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        extra = 0
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(permutations, len(d)))
        extra = 1
    flipped = (signs * d).mean(1)
    observed = d.mean()
    hits = (np.abs(flipped) >= abs(observed) - 1e-12) if two_sided else (flipped >= observed - 1e-12)
    return float((extra + hits.sum()) / (len(signs) + extra))


def _paired(a: Tensor, b: Tensor) -> dict[str, float]:
    """Per-image masses ``a`` (pretrained) vs ``b`` (random init): means, mean difference,
    wins of ``a``, and both one-sided tests."""
    diff = (a - b).numpy()
    wins = int((diff > 0).sum())
    return {"pretrained": float(a.mean()), "random_init": float(b.mean()), "difference": float(diff.mean()),
            "wins": wins, "n": len(diff), "sign_test_p": sign_test_p(wins, len(diff)),
            "permutation_p": paired_permutation_p(diff)}


def compare_backbones(
    pretrained: DinoBackbone, random_init: DinoBackbone, world: Any, n: int = 300
) -> dict[str, Any]:
    """Both probes on ``pretrained`` and on ``random_init`` (the init it started from),
    on held-out images of the demo world ``world`` (a ``SyntheticWorldConfig``), JSON-ready:

    - ``attention``: each backbone's best head is chosen on ``n`` single-object val images
      (``selected_head``: the highest mean mass in the object) and measured on ``n``
      single-object test images, so that the choice does not flatter it; per backbone the
      test :func:`attention_report` numbers (``best_head``: best on test, ``best``,
      ``mean_heads``, ``best_above_area``) and ``selected``: the val-selected head's mean
      test mass; ``area_share`` (what uniform attention puts on the object); paired
      comparisons over the test images, pretrained vs random init: ``selected_head``
      (each model's val-selected head) and ``mean_of_heads``, each with the mean
      difference, ``wins``, the one-sided sign test and paired permutation test p;
    - ``knn``: top-1 of :func:`knn_top1` on CLS features by ``class`` (composition),
      ``colour`` and ``background``, per backbone, with ``majority`` and ``chance``
      beside; references: ``n`` single-object val images, queries: ``n`` single-object
      test images of seen compositions.
    """
    attn_set = probe_images(world, "test", n)
    ref = probe_images(world, "val", n)
    query = probe_images(world, "test", n, seen_only=True)
    backbones = {"pretrained": pretrained, "random_init": random_init}
    reports = {name: attention_report(b, attn_set.images, attn_set.masks) for name, b in backbones.items()}
    selected = {name: attention_report(b, ref.images, ref.masks)["best_head"] for name, b in backbones.items()}
    at_selected = {name: reports[name]["per_image"][:, selected[name]] for name in backbones}
    mean_heads = {name: r["per_image"].mean(1) for name, r in reports.items()}
    attention: dict[str, Any] = {
        "images": len(attn_set.images),
        "split": "test",
        "head_selection": {"split": "val", "images": len(ref.images)},
        "area_share": reports["pretrained"]["area"],
        **{name: {**{k: r[k] for k in ("best_head", "best", "mean_heads", "best_above_area")},
                  "selected_head": selected[name], "selected": float(at_selected[name].mean())}
           for name, r in reports.items()},
        "selected_head": _paired(at_selected["pretrained"], at_selected["random_init"]),
        "mean_of_heads": _paired(mean_heads["pretrained"], mean_heads["random_init"]),
    }
    feats = {name: (features(b, ref.images)[0], features(b, query.images)[0]) for name, b in backbones.items()}
    knn: dict[str, Any] = {
        "k": KNN_K,
        "temperature": KNN_TEMPERATURE,
        "references": {"split": "val", "images": len(ref.images)},
        "queries": {"split": "test", "images": len(query.images), "compositions": "seen"},
        "class": _knn_block(ref, query, feats, "labels"),
        "colour": _knn_block(ref, query, feats, "colours"),
        "background": _knn_block(ref, query, feats, "backgrounds"),
    }
    return {"attention": attention, "knn": knn}

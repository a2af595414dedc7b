"""DINO pretraining (dinoalign.pretrain): the official formulas on hand values, the
augmentation's promises (no flip, no hue change), a tiny pretraining that learns without
collapsing, and its checkpoint loaded the way the pipeline loads ``backbone.weights``.

Reference: facebookresearch/dino ``main_dino.py`` (``DINOLoss``, ``DataAugmentationDINO``,
the EMA update in ``train_one_epoch``), ``utils.py`` (``cosine_scheduler``) and
``vision_transformer.py`` (``DINOHead``); for the iBOT term, facebookresearch/dinov2
``dinov2/loss/ibot_patch_loss.py`` (``iBOTPatchLoss.softmax_center_teacher``,
``forward_masked``, ``reduce_center_update``/``apply_center_update``),
``dinov2/data/collate.py`` (``collate_data_and_cast``'s masks) and ``dinov2/data/masking.py``
(``MaskingGenerator``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors
import torch

from dinoalign.backbones import build_backbone
from dinoalign.config import BackboneConfig
from dinoalign.data.config import SyntheticWorldConfig
from dinoalign.data.synthetic import COLOURS
from dinoalign.pretrain.config import PretrainConfig
from dinoalign.pretrain.dino import (
    DINOHead,
    DINOLoss,
    IBOTPatchLoss,
    MultiCrop,
    block_mask,
    cosine_schedule,
    ema_update,
    sample_masks,
    teacher_temp_schedule,
)
from dinoalign.pretrain.train import CHECKPOINT, DESCRIPTION, DinoNet, demo_pool, pretrain

TINY = BackboneConfig(
    name="vit_small_patch14_reg4_dinov2", img_size=56,
    model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 3, "init_values": 1.0,
                  "weight_init": "jax"},
)


# ----------------------------------------------------------------------------- formulas


def _official_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """main_dino.py DINOLoss.forward, written out in numpy with loops."""

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    b = len(teacher) // 2
    q = softmax((teacher - center) / teacher_temp)
    s = student / student_temp
    log_p = s - s.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    terms = []
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            qi = q[iq * b : (iq + 1) * b]
            lv = log_p[v * b : (v + 1) * b]
            terms.append(np.mean(np.sum(-qi * lv, -1)))
    return float(np.mean(terms))


def test_dino_loss_matches_the_official_formula_and_moves_the_centre() -> None:
    rng = np.random.default_rng(0)
    ncrops, b, k = 4, 3, 5
    student = rng.normal(size=(ncrops * b, k)).astype(np.float32)
    teacher = rng.normal(size=(2 * b, k)).astype(np.float32)
    loss_fn = DINOLoss(k, ncrops, student_temp=0.1, center_momentum=0.9)

    first = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), teacher_temp=0.04)
    assert first.item() == pytest.approx(
        _official_dino_loss(student, teacher, np.zeros((1, k)), ncrops, 0.1, 0.04), rel=1e-5)
    # centre c <- 0.9 c + 0.1 mean(teacher): from 0, one tenth of the batch mean
    centre = 0.1 * teacher.mean(0, keepdims=True)
    np.testing.assert_allclose(loss_fn.center.numpy(), centre, rtol=1e-5, atol=1e-7)
    # the second call centres the teacher with the updated centre
    second = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), teacher_temp=0.07)
    assert second.item() == pytest.approx(
        _official_dino_loss(student, teacher, centre, ncrops, 0.1, 0.07), rel=1e-5)
    np.testing.assert_allclose(loss_fn.center.numpy(), 0.9 * centre + 0.1 * teacher.mean(0),
                               rtol=1e-5, atol=1e-7)


def test_dino_loss_hand_values() -> None:
    # a uniform student (all logits 0) has log-probabilities -log K whatever the teacher:
    # every cross-entropy term is log K
    k = 4
    loss_fn = DINOLoss(k, ncrops=3)
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])  # B = 1
    assert loss_fn(torch.zeros(3, k), teacher, 0.04).item() == pytest.approx(math.log(k))
    # a one-hot teacher and a student with logits (0.1, 0) (B = 1, 2 crops): each term is
    # -log softmax([0.1, 0] / 0.1)[0] = log(1 + e^-1)
    loss_fn = DINOLoss(2, ncrops=2, student_temp=0.1)
    teacher = torch.tensor([[100.0, 0.0], [100.0, 0.0]])
    student = torch.tensor([[0.1, 0.0], [0.1, 0.0]])
    assert loss_fn(student, teacher, 0.04).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    # monitors: that teacher is one-hot (entropy ~0)
    assert loss_fn.last["teacher_entropy"] < 1e-6


def _official_ibot_loss(student, teacher, masks, center, student_temp, teacher_temp):
    """dinov2 iBOTPatchLoss: softmax_center_teacher, then forward_masked with the collate's
    masks_weight (1 / masked patches of the crop) and the division by the number of crops,
    written out in numpy with a loop over the masked patches."""

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    q = softmax((teacher - center) / teacher_temp)
    log_p = np.log(softmax(student / student_temp))
    crop_of = np.nonzero(masks)[0]  # the crop of each masked patch, in masks[masks] order
    total = 0.0
    for i, crop in enumerate(crop_of):
        total += np.sum(q[i] * log_p[i]) / masks[crop].sum()
    return float(-total / masks.shape[0])


def test_ibot_patch_loss_matches_the_official_formula_and_moves_the_centre() -> None:
    rng = np.random.default_rng(1)
    k = 6
    masks = np.zeros((4, 9), bool)  # 4 global crops of 3×3 patches: 3, 0, 1 and 5 masked
    masks[0, [0, 1, 2]] = True
    masks[2, 4] = True
    masks[3, [1, 3, 5, 7, 8]] = True
    m = int(masks.sum())
    student = rng.normal(size=(m, k)).astype(np.float32)
    teacher = rng.normal(size=(m, k)).astype(np.float32)
    loss_fn = IBOTPatchLoss(k, student_temp=0.1, center_momentum=0.9)
    loss = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(masks), 0.04)
    assert loss.item() == pytest.approx(
        _official_ibot_loss(student, teacher, masks, np.zeros((1, k)), 0.1, 0.04), rel=1e-5)
    # the centre moves to the mean of the masked teacher outputs (one process)
    centre = 0.1 * teacher.mean(0, keepdims=True)
    np.testing.assert_allclose(loss_fn.center.numpy(), centre, rtol=1e-5, atol=1e-7)
    second = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(masks), 0.07)
    assert second.item() == pytest.approx(_official_ibot_loss(student, teacher, masks, centre, 0.1, 0.07),
                                          rel=1e-5)
    assert 0 < loss_fn.last["teacher_patch_entropy"] < math.log(k)
    # no masked patch at all: zero, and the centre stays
    before = loss_fn.center.clone()
    empty = torch.zeros(0, k)
    assert loss_fn(empty, empty, torch.zeros(4, 9, dtype=torch.bool), 0.04).item() == 0.0
    assert torch.equal(loss_fn.center, before)


def test_block_masks_and_the_collate_share_of_masked_crops() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (0, 3, 4, 10, 18):
        mask = block_mask(6, 6, n, gen, max_patches=18)
        # never more than asked; upstream can fall short when no block fits what is left
        assert mask.shape == (6, 6) and int(mask.sum()) <= n
        if n >= 4:
            assert int(mask.sum()) >= 4  # at least one block of min_num_patches
    # the collate: int(16·0.5) = 8 crops masked, the i-th with int(36·u) patches, u in the
    # i-th of 8 equal bins of [0.1, 0.5]: every count <= int(36·0.5) = 18, most > 0
    masks = sample_masks(16, 6, 6, 0.5, (0.1, 0.5), torch.Generator().manual_seed(3))
    counts = masks.sum(1)
    assert masks.shape == (16, 36) and masks.dtype == torch.bool
    assert int((counts > 0).sum()) == 8 and int(counts.max()) <= 18
    assert int(counts.sum()) >= 0.7 * 36 * 0.3 * 8  # about 30 % of a masked crop on average
    again = sample_masks(16, 6, 6, 0.5, (0.1, 0.5), torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)  # seeded: the same masks
    assert not sample_masks(4, 6, 6, 0.0, (0.1, 0.5), gen).any()


def test_masked_forward_replaces_patch_embeddings_with_the_mask_token() -> None:
    backbone = build_backbone(TINY.name, img_size=TINY.img_size, model_kwargs=TINY.model_kwargs)
    net = DinoNet(backbone.vit, DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8), masked=True).eval()
    with torch.no_grad():
        net.mask_token.normal_()
    torch.manual_seed(0)
    crops = [torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56), torch.randn(4, 3, 28, 28)]
    none = torch.zeros(4, 16, dtype=torch.bool)
    with torch.no_grad():
        plain, no_patches = net(crops)
        unmasked, selected = net(crops, masks=none, select=none)
    assert no_patches is None and selected is not None and selected.shape == (0, 32)
    torch.testing.assert_close(plain, unmasked, rtol=0, atol=0)  # = timm's forward_features
    masks = none.clone()
    masks[1, [0, 5, 6]] = True
    with torch.no_grad():
        masked_cls, masked_patches = net(crops, masks=masks, select=masks)
        _, teacher_patches = net(crops, select=masks)
    assert masked_patches.shape == teacher_patches.shape == (3, 32)
    # only crop 1 (global crop 1's second image) changes; the local crops never see masks
    changed = (masked_cls - plain).abs().amax(1) > 1e-6
    assert changed.tolist() == [False, True, False, False] + [False] * 4
    # the same crop's patch outputs differ once masked (the mask token replaced them)
    assert not torch.allclose(masked_patches, teacher_patches)
    # masked crops with a DinoNet built without the token are refused
    with pytest.raises(ValueError, match="masked=True"):
        DinoNet(backbone.vit, DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8))(crops, masks=masks)


def test_schedules_match_hand_values() -> None:
    # utils.cosine_scheduler(1, 0, epochs=2, niter_per_ep=2, warmup_epochs=1):
    # warm-up linspace(0, 1, 2) = [0, 1], then 0.5·(1 + cos(π·i/2)) for i = 0, 1
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 2, 2, warmup_epochs=1), [0, 1, 1, 0.5])
    # the teacher momentum: 0.99 -> 1 over 4 iterations: 1 - 0.005·(1 + cos(π·i/4))
    np.testing.assert_allclose(cosine_schedule(0.99, 1.0, 1, 4),
                               [0.99, 1 - 0.005 * (1 + math.sqrt(0.5)), 0.995, 1 - 0.005 * (1 - math.sqrt(0.5))])
    # DINOLoss.teacher_temp_schedule: linspace(0.04, 0.07, 3), then 0.07
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 3, 5), [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 2), [0.04, 0.04])


def test_ema_update_hand_values() -> None:
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(-2.0)
        student.weight.fill_(3.0), student.bias.fill_(2.0)
    ema_update(teacher, student, 0.9)
    assert teacher.weight.flatten().tolist() == pytest.approx([1.2, 1.2])  # 0.9·1 + 0.1·3
    assert teacher.bias.tolist() == pytest.approx([-1.6])  # 0.9·-2 + 0.1·2
    assert student.weight.tolist() == [[3.0, 3.0]]


def test_dino_head_shapes_and_frozen_weight_norm() -> None:
    head = DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16)
    out = head(torch.randn(5, 48))
    assert out.shape == (5, 64)
    assert not head.weight_g.requires_grad  # norm_last_layer: g stays 1
    # weight-normalised rows of norm 1 on an L2-normalised input: |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5
    assert DINOHead(48, 64, 32, 16, norm_last_layer=False).weight_g.requires_grad


# ----------------------------------------------------------------------------- augmentation


def _hue(x: torch.Tensor) -> torch.Tensor:
    """Hue angle of B×3×H×W RGB: atan2(√3·(G-B), 2R-G-B), unchanged by a·x + b (a > 0)."""
    r, g, b = x.unbind(1)
    return torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)


def _augment_everything() -> PretrainConfig:
    # every photometric step on for every crop, the widest scales
    return PretrainConfig(pool_size=8, batch_size=8, jitter_prob=1.0, blur_prob=(1.0, 1.0, 1.0),
                          global_crops_scale=(0.05, 1.0), local_crops_scale=(0.02, 0.5),
                          local_crops_number=3, global_crop_size=56, local_crop_size=28)


def test_multicrop_keeps_the_hue_of_every_demo_colour() -> None:
    colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # 6×3
    images = colours[:, :, None, None].expand(-1, -1, 112, 112).contiguous()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        crops = MultiCrop(_augment_everything())(images, gen)
        assert [c.shape[-1] for c in crops] == [56, 56, 28, 28, 28]
        for crop in crops:
            diff = torch.remainder(_hue(crop) - _hue(images)[:, :1, :1] + math.pi, 2 * math.pi) - math.pi
            assert diff.abs().max() < 1e-4
            assert not torch.allclose(crop, images[:, :, : crop.shape[2], : crop.shape[3]])  # jittered


def test_multicrop_never_flips() -> None:
    # red left / blue right, and green top / yellow bottom: after any crop, blur and jitter
    # R-B never increases left to right (red 180 -> blue -185), and G-B never decreases
    # top to bottom (green 110 -> yellow 185)
    red, blue, green, yellow = (torch.tensor(COLOURS[c], dtype=torch.float32) / 255
                                for c in ("red", "blue", "green", "yellow"))
    lr = torch.empty(3, 112, 112)
    lr[:, :, :56], lr[:, :, 56:] = red[:, None, None], blue[:, None, None]
    tb = torch.empty(3, 112, 112)
    tb[:, :56], tb[:, 56:] = green[:, None, None], yellow[:, None, None]
    images = torch.stack([lr, tb]).repeat(8, 1, 1, 1)
    gen = torch.Generator().manual_seed(1)
    for crop in MultiCrop(_augment_everything())(images, gen):
        horizontal = crop[0::2, 0] - crop[0::2, 2]  # R - B of the left/right images
        assert (horizontal.diff(dim=-1) <= 1e-5).all()
        vertical = crop[1::2, 1] - crop[1::2, 2]  # G - B of the top/bottom images
        assert (vertical.diff(dim=-2) >= -1e-5).all()
    # and a crop that spans the boundary shows both colours in the right order
    full = MultiCrop(PretrainConfig(pool_size=8, batch_size=8, global_crops_scale=(1.0, 1.0),
                                    local_crops_number=0, jitter_prob=0.0, blur_prob=(0, 0, 0)))
    crop = full(images[:1], gen)[0][0]
    assert (crop[0, :, 0] > crop[2, :, 0]).all() and (crop[0, :, -1] < crop[2, :, -1]).all()


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    cfg = PretrainConfig(pool_size=64, epochs=6, batch_size=16, lr=1e-3, warmup_epochs=1,
                         out_dim=256, head_hidden_dim=128, head_bottleneck_dim=64,
                         global_crop_size=56, local_crops_number=2, local_crop_size=28,
                         momentum_teacher=0.95, seed=0)
    images = demo_pool(SyntheticWorldConfig(image_size=56), cfg.pool_size)
    out = tmp_path_factory.mktemp("pretrain")
    rows: list[dict] = []
    result = pretrain(TINY, cfg, images, out_dir=out, log=rows.append)
    return cfg, result, rows


def test_tiny_pretraining_lowers_its_loss_without_collapse(tiny_run) -> None:
    cfg, result, rows = tiny_run
    assert rows == result.curve and len(rows) == cfg.epochs
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses
    log_k = math.log(cfg.out_dim)
    assert result.log_k == pytest.approx(log_k)
    for r in rows:
        # not collapsed to uniform (entropy log K) nor to one dimension for every image
        # (marginal entropy 0)
        assert 0.05 * log_k < r["teacher_entropy"] < 0.95 * log_k, r
        assert r["teacher_marginal_entropy"] > 0.3 * log_k, r
        assert r["center_norm"] > 0 and r["crops_per_s"] > 0
    assert rows[-1]["momentum"] == pytest.approx(1.0, abs=1e-3)  # the cosine ends at 1


@pytest.fixture(scope="module")
def tiny_ibot_run(tmp_path_factory: pytest.TempPathFactory):
    cfg = PretrainConfig(pool_size=64, epochs=6, batch_size=16, lr=1e-3, warmup_epochs=1,
                         out_dim=256, head_hidden_dim=128, head_bottleneck_dim=64,
                         global_crop_size=56, local_crops_number=2, local_crop_size=28,
                         momentum_teacher=0.95, seed=0, ibot_loss_weight=1.0)
    images = demo_pool(SyntheticWorldConfig(image_size=56), cfg.pool_size)
    out = tmp_path_factory.mktemp("pretrain-ibot")
    return cfg, pretrain(TINY, cfg, images, out_dir=out)


def test_tiny_pretraining_with_ibot_lowers_both_losses_without_collapse(tiny_run, tiny_ibot_run) -> None:
    cfg, result = tiny_ibot_run
    rows = result.curve
    log_k = math.log(cfg.out_dim)
    for key in ("loss", "dino_loss", "ibot_loss"):
        assert rows[-1][key] < rows[0][key] - 0.1, (key, [r[key] for r in rows])
    for r in rows:
        assert r["loss"] == pytest.approx(r["dino_loss"] + r["ibot_loss"], rel=1e-5)
        # neither the CLS nor the patch distributions collapse
        assert 0.05 * log_k < r["teacher_entropy"] < 0.95 * log_k, r
        assert 0.05 * log_k < r["teacher_patch_entropy"] < 0.95 * log_k, r
        assert r["patch_center_norm"] > 0
    assert "ibot_loss" not in tiny_run[1].curve[0]  # off by default: DINO alone
    # the mask token is not a timm weight: the file holds the backbone's keys only and
    # loads through the pipeline's strict path
    with safetensors.safe_open(str(result.checkpoint), "pt") as f:
        keys = set(f.keys())
    init = build_backbone(TINY.name, img_size=TINY.img_size, model_kwargs=TINY.model_kwargs)
    assert keys == set(init.vit.state_dict())
    build_backbone(TINY.name, weights=str(result.checkpoint), img_size=TINY.img_size,
                   model_kwargs=TINY.model_kwargs)


def test_checkpoint_loads_through_backbone_weights(tiny_run) -> None:
    cfg, result, _ = tiny_run
    path = result.checkpoint
    assert path is not None and path.name == CHECKPOINT
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["description"] == DESCRIPTION and meta["architecture"] == TINY.name
    # the pipeline's path: build_backbone(..., weights=<file>) (strict load, timm filter)
    loaded = build_backbone(TINY.name, weights=str(path), img_size=TINY.img_size,
                            model_kwargs=TINY.model_kwargs)
    torch.manual_seed(123)
    images = torch.randn(3, 3, 56, 56)
    a, b = result.backbone(images), loaded(images)
    for name in ("cls", "registers", "patches", "attn_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    # and it differs from the random init it started from
    torch.manual_seed(cfg.seed)
    init = build_backbone(TINY.name, img_size=TINY.img_size, model_kwargs=TINY.model_kwargs)
    assert not torch.allclose(init(images).cls, b.cls)


def test_pool_refuses_test_images_and_odd_crop_sizes() -> None:
    with pytest.raises(ValueError, match="test split"):
        demo_pool(SyntheticWorldConfig(image_size=56), 2, split="test")
    images = np.zeros((4, 56, 56, 3), np.uint8)
    cfg = PretrainConfig(pool_size=4, batch_size=4, epochs=1, warmup_epochs=0, global_crop_size=50)
    with pytest.raises(ValueError, match="multiple of the backbone's patch size 14"):
        pretrain(TINY, cfg, images)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        PretrainConfig(pool_size=8, batch_size=16)
    with pytest.raises(ValueError, match="local_crops_scale"):
        PretrainConfig(local_crops_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="hue|invert"):
        PretrainConfig(brightness=1.0)
    assert PretrainConfig(global_crops_scale=[0.3, 1]).global_crops_scale == (0.3, 1.0)
    assert PretrainConfig(local_crops_number=6).n_crops == 8
    with pytest.raises(ValueError, match="mask_ratio"):
        PretrainConfig(mask_ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_probability"):
        PretrainConfig(mask_probability=1.5)
    with pytest.raises(ValueError, match="ibot_loss_weight"):
        PretrainConfig(ibot_loss_weight=-1)
    with pytest.raises(ValueError, match="no crop would ever be masked"):
        PretrainConfig(ibot_loss_weight=1.0, mask_probability=0.0)
    with pytest.raises(ValueError, match="mask_min_patches"):
        PretrainConfig(mask_min_patches=0)
    assert PretrainConfig(mask_probability=0.0).ibot_loss_weight == 0  # iBOT off: masks unused


def test_paired_permutation_test_sees_a_bimodal_gain_the_sign_test_misses() -> None:
    """The attention probe's case: one model's masses are bimodal (far ahead on some images,
    a little behind on most), so it wins on fewer than half the images but is ahead on
    average. The sign test misses it; the permutation test on the mean difference does not,
    and for no difference it is not fooled."""
    from dinoalign.pretrain.probe import paired_permutation_p, sign_test_p

    rng = np.random.default_rng(0)
    differences = np.where(rng.random(300) < 0.4, 0.5, -0.05) + rng.normal(0, 0.02, 300)
    wins = int((differences > 0).sum())
    assert wins < 150 and sign_test_p(wins, 300) > 0.5
    assert paired_permutation_p(differences) < 0.001
    null = [paired_permutation_p(rng.normal(0, 1, 100), permutations=2000, seed=s) for s in range(40)]
    assert 0.2 < float(np.mean(null)) < 0.8  # p is uniform under the null: mean about 0.5
    assert min(paired_permutation_p(-np.abs(rng.normal(0, 1, 50))), 1.0) > 0.99


def test_paired_permutation_test_is_exact_over_a_few_seeds() -> None:
    """The ablations' case (a handful of seeds): every one of the 2^n sign vectors is
    enumerated, so p is exact, two-sided on request, and bounded below by 2 / 2^n."""
    from itertools import product

    from dinoalign.pretrain.probe import paired_permutation_p

    d = np.array([0.03, 0.01, -0.005, 0.02, 0.04])
    # by hand: the share of the 32 sign vectors whose |mean| reaches the observed |mean|
    means = [np.mean(np.array(s) * d) for s in product([-1, 1], repeat=len(d))]
    expected = sum(abs(m) >= abs(d.mean()) - 1e-12 for m in means) / 32
    assert paired_permutation_p(d, two_sided=True) == pytest.approx(expected)
    assert paired_permutation_p(d) == pytest.approx(sum(m >= d.mean() - 1e-12 for m in means) / 32)
    assert paired_permutation_p(np.full(3, -0.1), two_sided=True) == 0.25  # 3 seeds: never below 2/8
    assert paired_permutation_p(np.full(10, 0.1), two_sided=True) == pytest.approx(2 / 1024)
    assert paired_permutation_p(np.zeros(4), two_sided=True) == 1.0

"""Talk2DINO: ψ, released-checkpoint import, best-head InfoNCE, dense map, background
cleaning, and a learning sanity check — each against a by-hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinoalign.recipes import (
    Talk2DINO,
    Talk2DINOConfig,
    background_cleaning,
    build,
    import_talk2dino_checkpoint,
    load_talk2dino_checkpoint,
)
from dinoalign.recipes.talk2dino import select_best_heads
from talk2dino_release_testing import psi_by_hand as _psi_by_hand
from talk2dino_release_testing import released_state as _released_state


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(a: list[float]) -> list[float]:
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a]


@pytest.mark.parametrize("mlp", [True, False])
def test_released_key_layout_gives_the_by_hand_psi(mlp: bool) -> None:
    state = _released_state(text_dim=5, vision_dim=4, mlp=mlp)
    model = import_talk2dino_checkpoint(state)
    assert model.cfg == Talk2DINOConfig(
        text_dim=5, vision_dim=4, projection="mlp" if mlp else "linear"
    )
    texts = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    projected = model.project_text(texts)
    encoded = model.encode_text(texts)
    for i, t in enumerate(texts.tolist()):
        expected = _psi_by_hand(state, t)
        assert projected[i].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert encoded[i].tolist() == pytest.approx(_unit(expected), rel=1e-5, abs=1e-6)


def test_released_checkpoint_file_loads_weights_only(tmp_path) -> None:
    state = _released_state(text_dim=6, vision_dim=4, mlp=True)
    path = tmp_path / "vitb_mlp_infonce.pth"
    torch.save(state, path)
    model = load_talk2dino_checkpoint(str(path))
    t = torch.randn(1, 6)
    assert model.project_text(t)[0].tolist() == pytest.approx(
        _psi_by_hand(state, t[0].tolist()), abs=1e-5
    )


def test_import_rejects_other_layouts() -> None:
    state = _released_state(6, 4, mlp=True) | {"attn_weights": torch.zeros(12)}
    with pytest.raises(ValueError, match=r"unsupported keys \['attn_weights'\]"):
        import_talk2dino_checkpoint(state)


def _loss_by_hand(
    t_hat: list[list[float]], v_hat: list[list[list[float]]], tau: float
) -> tuple[float, list[int]]:
    """Best head per pair; column j uses image j's own selected head for every text."""
    b, h = len(t_hat), len(v_hat[0])
    best = [max(range(h), key=lambda k, i=i: _dot(t_hat[i], v_hat[i][k])) for i in range(b)]
    s = [[_dot(t_hat[i], v_hat[j][best[j]]) / tau for j in range(b)] for i in range(b)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(x) for x in s[i])) for i in range(b)) / b
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(b))) for j in range(b)) / b
    return 0.5 * (rows + cols), best


def _identity_psi(dim: int) -> Talk2DINO:
    """Linear ψ = identity, so t̂ = norm(t) and test cases can be written in D space."""
    model = build("talk2dino", Talk2DINOConfig(text_dim=dim, vision_dim=dim, projection="linear"))
    with torch.no_grad():
        model.proj_in.weight.copy_(torch.eye(dim))
        model.proj_in.bias.zero_()
    return model


def test_best_head_differs_per_row_and_loss_matches_hand_loop() -> None:
    # Text i points along axis i; image i holds that direction in head (i + 1) % 3 only,
    # so the selected head differs per row.
    text = torch.eye(3, 4) + 0.3
    heads = 0.3 * torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        heads[i, (i + 1) % 3] += 0.6 * torch.eye(3, 4)[i]
    model = _identity_psi(4)
    loss, stats = model.loss({"text": text, "head_embeddings": heads})

    t_hat = [_unit(t) for t in text.tolist()]
    v_hat = [[_unit(v) for v in image] for image in heads.tolist()]
    expected, best = _loss_by_hand(t_hat, v_hat, tau=0.07)
    assert best == [1, 2, 0]
    _, chosen = select_best_heads(F.normalize(text, dim=-1), F.normalize(heads, dim=-1))
    assert chosen.tolist() == best
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["distinct_heads"] == 3.0 and stats["logit_scale"] == pytest.approx(1 / 0.07)


def test_columns_use_each_images_own_selected_head() -> None:
    """Against the other reading (column j uses the head that text i picks in image j),
    which gives a different loss here: the by-hand loop must be the one matched."""
    g = torch.Generator().manual_seed(4)
    text, heads = torch.randn(5, 6, generator=g), torch.randn(5, 4, 6, generator=g)
    model = _identity_psi(6)
    t_hat = F.normalize(text, dim=-1)
    v_hat = F.normalize(heads, dim=-1)
    per_text_choice = torch.einsum("id,jhd->ijh", t_hat, v_hat).amax(dim=-1) / 0.07
    other_reading = 0.5 * (
        F.cross_entropy(per_text_choice, torch.arange(5))
        + F.cross_entropy(per_text_choice.T, torch.arange(5))
    )
    expected, _ = _loss_by_hand(t_hat.tolist(), v_hat.tolist(), tau=0.07)
    loss = model.loss({"text": text, "head_embeddings": heads})[0].item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(loss - other_reading.item()) > 1e-3


def test_mlp_loss_matches_hand_loop_and_grads_reach_only_psi(tiny) -> None:
    model = tiny.model("talk2dino")
    batch = tiny.batch("talk2dino", batch_size=6)
    loss, _ = model.loss(batch)
    state = {
        "linear_layer.weight": model.proj_in.weight,
        "linear_layer.bias": model.proj_in.bias,
        "hidden_layers.0.weight": model.proj_out.weight,
        "hidden_layers.0.bias": model.proj_out.bias,
    }
    t_hat = [_unit(_psi_by_hand(state, t)) for t in batch["text"].tolist()]
    v_hat = [[_unit(v) for v in image] for image in batch["head_embeddings"].tolist()]
    assert loss.item() == pytest.approx(_loss_by_hand(t_hat, v_hat, tau=0.07)[0], rel=1e-4)
    loss.backward()
    assert {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    } == {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"}


def test_learnable_temperature_is_a_trained_parameter(tiny) -> None:
    model = build(
        "talk2dino",
        Talk2DINOConfig(text_dim=12, vision_dim=8, learnable_temperature=True, temperature=0.5),
    )
    loss, stats = model.loss(tiny.batch("talk2dino"))
    loss.backward()
    assert stats["logit_scale"] == pytest.approx(2.0)
    assert (
        model.logit_scale.log_scale.grad is not None and model.logit_scale.log_scale.grad.abs() > 0
    )


def test_encode_image_is_normalised_mean_of_normalised_heads(tiny) -> None:
    model = tiny.model("talk2dino")
    batch = tiny.batch("talk2dino")
    image = model.encode_image(batch)
    for b, heads in enumerate(batch["head_embeddings"].tolist()):
        units = [_unit(v) for v in heads]
        mean = [sum(col) / len(units) for col in zip(*units)]
        assert image[b].tolist() == pytest.approx(_unit(mean), abs=1e-6)


def test_encode_text_rejects_strings(tiny) -> None:
    with pytest.raises(TypeError, match="text encoder"):
        tiny.model("talk2dino").encode_text(["a cat"])


def test_dense_logits_are_sigmoid_cosines_on_the_grid(tiny) -> None:
    model = tiny.model("talk2dino")
    batch = tiny.batch("talk2dino", batch_size=2)
    class_text = model.encode_text(tiny.class_texts("talk2dino", n=2))
    dense = model.dense_logits(batch, class_text)
    assert dense.shape == (2, 2, 3, 3)
    for b in range(2):
        for n in range(2):
            for p in range(9):
                cos = _dot(_unit(batch["patches"][b, p].tolist()), class_text[n].tolist())
                assert dense[b, n, p // 3, p % 3].item() == pytest.approx(
                    1 / (1 + math.exp(-cos)), abs=1e-6
                )
    assert model.dense_logits(batch, class_text, grid=(1, 9)).shape == (2, 2, 1, 9)


def _cleaning_by_hand(patches, attn, text_hat, lam):
    """One image: lists P×D, H×P, N×D -> N×P cleaned map."""
    heads, num_patches, classes = len(attn), len(patches), len(text_hat)
    m = [[1 / (1 + math.exp(-_dot(_unit(x), t))) for x in patches] for t in text_hat]
    u = [
        _unit(
            [
                sum(attn[h][p] * patches[p][d] for p in range(num_patches))
                for d in range(len(patches[0]))
            ]
        )
        for h in range(heads)
    ]
    c = []
    for t in text_hat:
        e = [math.exp(_dot(t, u[h])) for h in range(heads)]
        w = [x / sum(e) for x in e]
        mixed = [sum(w[h] * attn[h][p] for h in range(heads)) for p in range(num_patches)]
        z = [math.exp(x) for x in mixed]
        c.append([x / sum(z) for x in z])
    # Official normalisation: (c - min) / max(max, max - min) over all classes and patches.
    c_lo, c_hi = min(map(min, c)), max(map(max, c))
    divisor = max(c_hi, c_hi - c_lo)
    m_lo, m_hi = min(map(min, m)), max(map(max, m))
    rescaled = [[(x - c_lo) / divisor * (m_hi - m_lo) + m_lo for x in row] for row in c]
    return [
        [(m[n][p] + lam * rescaled[n][p]) / (1 + lam) for p in range(num_patches)]
        for n in range(classes)
    ]


def test_background_cleaning_matches_hand_loop_per_image_in_a_batch() -> None:
    g = torch.Generator().manual_seed(7)
    patches, attn = torch.randn(3, 5, 4, generator=g), 2 * torch.randn(3, 2, 5, generator=g)
    text_hat = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    cleaned = background_cleaning(patches, attn, text_hat, lam=0.2)
    assert cleaned.shape == (3, 3, 5)
    for b in range(3):
        expected = _cleaning_by_hand(patches[b].tolist(), attn[b].tolist(), text_hat.tolist(), 0.2)
        for n in range(3):
            assert cleaned[b, n].tolist() == pytest.approx(expected[n], abs=1e-6)
    # Each image is cleaned on its own: its result does not depend on the rest of the batch.
    alone = background_cleaning(patches[1:2], attn[1:2], text_hat, lam=0.2)
    torch.testing.assert_close(alone[0], cleaned[1])
    half = background_cleaning(patches.half(), attn.half(), text_hat, lam=0.2)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, cleaned, atol=5e-3, rtol=0)


def _official_cleaning_one_image(patches, attn_logits, text_hat, lam):
    """Written from lorebianchi98/Talk2DINO src/open_vocabulary_segmentation/models/
    dinotext/dinotext.py, ``DINOText.generate_masks`` (mask = sigmoid of the cosine of
    the DINOTextMasker, ``forward_seg``) and ``similarity_assignment_weighted``, for one
    image (the official evaluation runs batch size 1), with the same order of operations:
    head embeddings as the patch mean weighted by raw CLS attention logits, softmax over
    heads of their cosines with each class, the head-weighted logits (divided by the
    weights' sum) softmaxed over patches, ``(x - min) / max(max, max - min)`` with min and
    max over the whole tensor, mapped onto the mask's [min, max], then (m + λx)/(1 + λ).

    patches P×C, attn_logits M×P, text_hat N×C -> N×P."""
    feat = patches.T[None]  # [1, C, P], like image_feat.reshape(bs, c, hw)
    maps = attn_logits[None]  # [1, M, P]
    mask = torch.sigmoid(text_hat @ F.normalize(patches, dim=-1).T)[None]  # [1, N, P]
    head = (maps.unsqueeze(2) * feat.unsqueeze(1)).mean(dim=-1)  # [1, M, C]
    head = head / head.norm(dim=-1, keepdim=True)
    weights = (text_hat.unsqueeze(0) @ head.permute(0, 2, 1)).softmax(dim=-1)  # [1, N, M]
    per_class = (maps.unsqueeze(1) * weights.unsqueeze(-1)).sum(dim=2) / weights.sum(-1)[..., None]
    per_class = per_class.softmax(dim=-1)
    lo, hi = per_class.min().item(), per_class.max().item()
    per_class = (per_class - lo) / max(hi, hi - lo)
    per_class = per_class * (mask.max() - mask.min()) + mask.min()
    return ((mask + lam * per_class) / (1 + lam))[0]


@pytest.mark.parametrize("flat", [False, True])
def test_background_cleaning_matches_the_official_formula_on_a_batch(flat: bool) -> None:
    """Random batch at a realistic size (12 heads, 16×16 patches, 5 classes): max abs
    difference to the official computation <= 1e-5 for every image. ``flat``: nearly
    uniform attention, where the old (c - min)/(max - min) normalisation differed most."""
    g = torch.Generator().manual_seed(11)
    batch, heads, num_patches, dim, classes = 3, 12, 256, 48, 5
    patches = torch.randn(batch, num_patches, dim, generator=g)
    scale = 0.01 if flat else 3.0
    attn = scale * torch.randn(batch, heads, num_patches, generator=g)
    text_hat = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    cleaned = background_cleaning(patches, attn, text_hat, lam=0.2)
    for b in range(batch):
        official = _official_cleaning_one_image(patches[b], attn[b], text_hat, 0.2)
        assert (cleaned[b] - official).abs().max().item() <= 1e-5
    # The test can tell the formulas apart: plain min-max gives another map.
    c_like = torch.rand(classes, num_patches, generator=g) * 0.01 + 0.5
    official_unit = (c_like - c_like.min()) / max(c_like.max(), c_like.max() - c_like.min())
    minmax_unit = (c_like - c_like.min()) / (c_like.max() - c_like.min())
    assert (official_unit - minmax_unit).abs().max() > 0.5


def test_background_cleaning_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same B and P"):
        background_cleaning(torch.randn(2, 5, 4), torch.randn(2, 3, 6), torch.randn(1, 4))


def _clusters(
    num_classes: int, per_class: int, g: torch.Generator, centres
) -> dict[str, torch.Tensor]:
    """Captions near their class's text centre; each image holds its class's visual
    centre in one random head of four, the other heads being noise."""
    text_centres, vision_centres = centres
    labels = torch.arange(num_classes).repeat(per_class)
    text = text_centres[labels] + 0.3 * torch.randn(len(labels), text_centres.shape[1], generator=g)
    heads = torch.randn(len(labels), 4, vision_centres.shape[1], generator=g)
    object_head = torch.randint(4, (len(labels),), generator=g)
    heads[torch.arange(len(labels)), object_head] = vision_centres[labels] + 0.3 * torch.randn(
        len(labels), vision_centres.shape[1], generator=g
    )
    return {"text": text, "head_embeddings": heads}


def test_learns_to_match_gaussian_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    num_classes = 16
    centres = (torch.randn(num_classes, 24, generator=g), torch.randn(num_classes, 32, generator=g))
    model = build("talk2dino", Talk2DINOConfig(text_dim=24, vision_dim=32))
    optimiser = torch.optim.Adam(model.param_groups(), lr=3e-3)
    for _ in range(200):
        loss, _ = model.loss(_clusters(num_classes, 1, g, centres))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    held_out = _clusters(num_classes, 4, g, centres)
    labels = torch.arange(num_classes).repeat(4)
    with torch.no_grad():
        text = model.encode_text(held_out["text"])
        best_head_scores = model.similarity(text, held_out)
        head_mean_scores = text @ model.encode_image(held_out).T
    # Text -> image R@1 over 64 held-out images, 4 per class: chance 1/16.
    best_head_r1 = (labels[best_head_scores.argmax(dim=1)] == labels).float().mean().item()
    head_mean_r1 = (labels[head_mean_scores.argmax(dim=1)] == labels).float().mean().item()
    assert best_head_r1 > 0.75 and head_mean_r1 > 0.5


def test_similarity_scores_pairs_by_their_best_head(tiny) -> None:
    model = tiny.model("talk2dino")
    batch = tiny.batch("talk2dino", batch_size=3)
    text = model.encode_text(tiny.class_texts("talk2dino", n=2))
    scores = model.similarity(text, batch)
    for n in range(2):
        for b in range(3):
            cosines = [
                _dot(text[n].tolist(), _unit(v)) for v in batch["head_embeddings"][b].tolist()
            ]
            assert scores[n, b].item() == pytest.approx(max(cosines), abs=1e-6)


@pytest.mark.parametrize(("image_feature", "column"), [("averaged_attention", "head_mean_embedding"), ("cls", "cls")])
def test_a_single_image_vector_is_one_head_and_the_loss_is_plain_infonce(image_feature: str, column: str) -> None:
    """The paper's ablation rows (lorebianchi98/Talk2DINO: ``avg_self_attn_token``, or
    neither flag = the CLS token): one B×D embedding per image, trained with the same
    symmetric InfoNCE as the official ``Contrastive.compute_contrastive_loss`` (src/loss.py)."""
    torch.manual_seed(0)
    model = build("talk2dino", Talk2DINOConfig(text_dim=5, vision_dim=4, image_feature=image_feature))
    assert model.image_columns == (column,)
    features = {column: torch.randn(6, 4), "head_embeddings": torch.randn(6, 3, 4)}
    batch = model.batch_from_features(features)
    assert set(batch) == {"head_embeddings"} and batch["head_embeddings"].shape == (6, 1, 4)
    text = torch.randn(6, 5)
    loss, stats = model.loss({"text": text, **batch})
    t_hat = model.encode_text(text).tolist()
    v_hat = [[_unit(v)] for v in features[column].tolist()]
    expected, best = _loss_by_hand(t_hat, v_hat, tau=0.07)
    assert best == [0] * 6 and stats["distinct_heads"] == 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Zero-shot scores are the plain cosines with that vector.
    scores = model.similarity(model.encode_text(text), batch)
    assert scores[2, 3].item() == pytest.approx(_dot(t_hat[2], v_hat[3][0]), abs=1e-6)
    with pytest.raises(ValueError, match="image_feature must be one of"):
        Talk2DINOConfig(image_feature="mean")

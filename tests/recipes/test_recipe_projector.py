"""Projector: the ProjectorWithResiduals layer order, the unit-norm MSE loss, the text
side, and a learning sanity check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinoalign.recipes import ProjectorConfig, build


def _unit(a: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in a))
    return [x / n for x in a]


def _forward_by_hand(params: dict[str, torch.Tensor], x: torch.Tensor, depth: int) -> torch.Tensor:
    """Linear; depth × [x + LN(Linear(GELU(LN(Linear(x)))))]; LN; Linear; GELU; Linear; LN,
    written from the named parameters in the order of RECIPES.md."""

    def linear(i: str, h: torch.Tensor) -> torch.Tensor:
        return h @ params[f"{i}.weight"].T + params[f"{i}.bias"]

    def layer_norm(i: str, h: torch.Tensor) -> torch.Tensor:
        centred = h - h.mean(dim=-1, keepdim=True)
        std = torch.sqrt((centred**2).mean(dim=-1, keepdim=True) + 1e-5)
        return centred / std * params[f"{i}.weight"] + params[f"{i}.bias"]

    def gelu(h: torch.Tensor) -> torch.Tensor:
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))

    h = linear("projector.layers.0", x)
    for k in range(1, depth + 1):
        block = f"projector.layers.{k}.branch"
        r = linear(f"{block}.3", gelu(layer_norm(f"{block}.1", linear(f"{block}.0", h))))
        h = h + layer_norm(f"{block}.4", r)
    n = depth + 1
    h = layer_norm(f"projector.layers.{n}", h)
    h = linear(f"projector.layers.{n + 3}", gelu(linear(f"projector.layers.{n + 1}", h)))
    return layer_norm(f"projector.layers.{n + 4}", h)


def test_architecture_follows_the_recipe(tiny) -> None:
    model = tiny.model("projector")
    cfg = model.cfg
    with torch.no_grad():  # LayerNorm affine off its (1, 0) init so its placement matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = dict(model.named_parameters())
    assert params["projector.layers.0.weight"].shape == (cfg.hidden_dim, cfg.vision_dim)
    assert params[f"projector.layers.{cfg.depth + 2}.weight"].shape == (
        cfg.bottleneck_dim,
        cfg.hidden_dim,
    )
    assert params[f"projector.layers.{cfg.depth + 4}.weight"].shape == (
        cfg.embed_dim,
        cfg.bottleneck_dim,
    )
    x = torch.randn(5, cfg.vision_dim)
    torch.testing.assert_close(model.projector(x), _forward_by_hand(params, x, cfg.depth))


def test_depth_is_a_param() -> None:
    shallow = build("projector", ProjectorConfig(depth=0))
    deep = build("projector", ProjectorConfig(depth=6, hidden_dim=32))
    assert len(shallow.projector.layers) == 6 and len(deep.projector.layers) == 12


def test_loss_is_mse_of_unit_vectors(tiny) -> None:
    model = tiny.model("projector")
    batch = tiny.batch("projector", batch_size=3)
    loss, stats = model.loss(batch)
    predicted = model.projector(batch["token_mean"]).tolist()
    squares = [
        (a - b) ** 2
        for y_hat, y in zip(predicted, batch["clip_image"].tolist())
        for a, b in zip(_unit(y_hat), _unit(y))
    ]
    assert loss.item() == pytest.approx(sum(squares) / len(squares), rel=1e-5)
    cosines = [
        sum(a * b for a, b in zip(_unit(y_hat), _unit(y)))
        for y_hat, y in zip(predicted, batch["clip_image"].tolist())
    ]
    assert stats["cosine"] == pytest.approx(sum(cosines) / 3, abs=1e-6)


def test_encoders(tiny) -> None:
    model = tiny.model("projector")
    batch = tiny.batch("projector")
    torch.testing.assert_close(
        model.encode_image(batch), F.normalize(model.projector(batch["token_mean"]), dim=-1)
    )
    text = torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    assert model.encode_text(text)[0].tolist() == pytest.approx([0.6, 0.8, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match="teacher's text tower"):
        model.encode_text(["a cat"])


def test_has_no_dense_head(tiny) -> None:
    model = tiny.model("projector")
    assert not model.has_dense_head
    with pytest.raises(NotImplementedError, match="no dense head"):
        model.dense_logits(tiny.batch("projector"), torch.randn(2, 6))


def test_learns_a_teacher_mapping() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = torch.randn(16, 12, generator=g)

    def pairs(n: int) -> dict[str, torch.Tensor]:
        x = torch.randn(n, 12, generator=g)
        return {"token_mean": x, "clip_image": torch.tanh(x @ teacher.T)}

    model = build(
        "projector",
        ProjectorConfig(vision_dim=12, embed_dim=16, hidden_dim=64, depth=2, bottleneck_dim=32),
    )
    optimiser = torch.optim.Adam(model.param_groups(), lr=3e-3)
    for _ in range(200):
        loss, _ = model.loss(pairs(64))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    held_out = pairs(64)
    with torch.no_grad():
        scores = model.encode_image(held_out) @ model.encode_text(held_out["clip_image"]).T
        final_loss = model.loss(held_out)[0].item()
    recall_at_1 = (scores.argmax(dim=1) == torch.arange(64)).float().mean().item()
    assert recall_at_1 > 0.6  # chance: 1/64
    assert final_loss < 0.2 * 2 / 16  # 2/E is the loss of unrelated unit vectors

"""dino.txt: vision head, text tower pooling, CLIP loss and logit-scale clamp, dense
head, frozen backbone, the cross-rank gather (2 gloo processes) and learning."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import LayerScale
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinoalign.recipes import DinoTxtConfig, build, load_recipe

SOT, EOT = 49406, 49407


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(a: list[float]) -> list[float]:
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a]


def _clip_loss_by_hand(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    b = len(image)
    s = [[scale * _dot(text[i], image[j]) for j in range(b)] for i in range(b)]  # texts × images
    t2i = sum(-s[i][i] + math.log(sum(math.exp(x) for x in s[i])) for i in range(b)) / b
    i2t = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(b))) for j in range(b)) / b
    return 0.5 * (t2i + i2t)


def test_tokenize_is_clip_bpe_with_context_from_config(tiny) -> None:
    model = tiny.model("dinotxt")
    tokens = model.tokenize(["a red circle", "a blue square above a green triangle"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    assert tokens[:, 0].tolist() == [SOT, SOT] and tokens[0, :5].tolist()[-1] == EOT
    torch.testing.assert_close(model.encode_text(["a red circle"]), model.encode_text(tokens[:1]))


def test_text_is_causal_and_pooled_at_eot(tiny) -> None:
    model = tiny.model("dinotxt").eval()
    tokens = model.tokenize(["a red circle", "a red circle"])
    tokens[1, 5:] = torch.arange(100, 111)  # change only what follows EOT (position 4)
    embeddings = model.encode_text(tokens)
    torch.testing.assert_close(embeddings[0], embeddings[1])
    tokens[1, 2] = 500  # a token before EOT changes the embedding
    assert not torch.allclose(model.encode_text(tokens)[1], embeddings[0])
    assert embeddings.shape == (2, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


def test_encode_text_rejects_ids_outside_the_vocabulary(tiny) -> None:
    with pytest.raises(ValueError, match=r"token ids in \[0, 49408\)"):
        tiny.model("dinotxt").encode_text(torch.full((1, 16), 49408))


def test_vision_head_layout_and_g(tiny) -> None:
    model = tiny.model("dinotxt")
    cfg = model.cfg
    assert len(model.vision_blocks) == 2 and all(isinstance(b, Block) for b in model.vision_blocks)
    gammas = [m.gamma for m in model.vision_blocks.modules() if isinstance(m, LayerScale)]
    assert len(gammas) == 4 and all(torch.all(g == 1e-5) for g in gammas)
    assert model.vision_blocks[0].attn.num_heads == cfg.vision_heads
    # With LayerScale 1e-5 the new blocks start near identity, so at init
    # g ≈ concat(LN(CLS), mean over patches (not registers) of LN(patch)).
    tokens = tiny.batch("dinotxt", batch_size=2)["tokens_vision"]
    g, patches = model.vision_features(tokens)
    assert g.shape == (2, 32) and patches.shape == (2, 9, 16)

    def layer_norm(v: list[float]) -> list[float]:
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v) + 1e-6)
        return [(x - mean) / std for x in v]

    for b in range(2):
        rows = [layer_norm(v) for v in tokens[b].tolist()]
        patch_rows = rows[1 + cfg.num_registers :]
        expected = rows[0] + [sum(col) / len(patch_rows) for col in zip(*patch_rows)]
        assert g[b].tolist() == pytest.approx(expected, abs=1e-3)


def test_loss_matches_hand_computation_and_scale_clamps(tiny) -> None:
    model = tiny.model("dinotxt")
    batch = tiny.batch("dinotxt", batch_size=5)
    image = model.encode_image(batch).tolist()
    text = model.encode_text(batch["tokens"]).tolist()
    loss, stats = model.loss(batch)
    assert stats["logit_scale"] == pytest.approx(1 / 0.07)
    assert loss.item() == pytest.approx(_clip_loss_by_hand(image, text, 1 / 0.07), rel=1e-5)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(1000.0))  # beyond the clamp at ln 100
    loss, stats = model.loss(batch)
    assert stats["logit_scale"] == pytest.approx(100.0)
    assert loss.item() == pytest.approx(_clip_loss_by_hand(image, text, 100.0), rel=1e-5)


def test_dense_logits_use_the_second_half_of_the_text_embedding(tiny) -> None:
    model = tiny.model("dinotxt")
    batch = tiny.batch("dinotxt", batch_size=2)
    text = model.encode_text(tiny.class_texts("dinotxt", n=3))
    dense = model.dense_logits(batch, text)
    assert dense.shape == (2, 3, 3, 3)
    patches = model.vision_features(batch["tokens_vision"])[1]
    for b in range(2):
        for n in range(3):
            second_half = _unit(text[n, 16:].tolist())
            for p in range(9):
                cosine = _dot(_unit(patches[b, p].tolist()), second_half)
                assert dense[b, n, p // 3, p % 3].item() == pytest.approx(cosine, abs=1e-5)


class TinyBackbone(nn.Module):
    """A tiny random timm ViT with 2 registers, returning what the DINOv2 adapter returns."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=28,
            patch_size=14,
            embed_dim=16,
            depth=1,
            num_heads=2,
            reg_tokens=2,
            no_embed_class=True,
            num_classes=0,
        )

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        x = self.vit.forward_features(images)
        return SimpleNamespace(cls=x[:, 0], registers=x[:, 1:3], patches=x[:, 3:])


def test_gradients_reach_the_recipe_but_not_the_backbone(tiny) -> None:
    model = tiny.model("dinotxt")
    backbone = TinyBackbone()  # deliberately left trainable: forward_images must still not train it
    images = torch.randn(3, 3, 28, 28)
    batch = {
        "tokens_vision": model.forward_images(images, backbone),
        "tokens": tiny.batch("dinotxt", 3)["tokens"],
    }
    assert batch["tokens_vision"].shape == (3, 1 + 2 + 4, 16)
    loss, _ = model.loss(batch)
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    assert not any(k.startswith("vit.") or "backbone" in k for k in model.state_dict())
    assert model.dense_logits(batch, model.encode_text(["a red circle"])).shape == (3, 1, 2, 2)


def test_forward_images_checks_the_register_count(tiny) -> None:
    model = build("dinotxt", {**vars(tiny.configs["dinotxt"]), "num_registers": 4})
    with pytest.raises(ValueError, match=r"gives 2 register tokens but cfg\.num_registers=4"):
        model.forward_images(torch.randn(1, 3, 28, 28), TinyBackbone())


def _gather_worker(rank: int, world_size: int, directory: str) -> None:
    """One rank of a DDP run: its half of the batch, loss with the gather, backward
    (DDP averages the gradients); results written for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        model = DistributedDataParallel(load_recipe(f"{directory}/model"))
        batch = torch.load(f"{directory}/batch.pt")
        per_rank = batch["tokens"].shape[0] // world_size
        local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        loss, _ = model(local)
        loss.backward()
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        torch.save({"loss": loss.item(), "grads": grads}, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tiny, tmp_path: Path) -> None:
    model = tiny.model("dinotxt", seed=5)
    with torch.no_grad():
        for block in model.vision_blocks:  # let the vision blocks matter in the gradients
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    batch = tiny.batch("dinotxt", batch_size=6, seed=2)
    model.save(str(tmp_path / "model"))
    torch.save(batch, tmp_path / "batch.pt")
    reference = load_recipe(str(tmp_path / "model"))
    global_loss, _ = reference.loss(batch)
    global_loss.backward()
    local_only = reference.loss({k: v[:3] for k, v in batch.items()})[0].item()

    # fork: the ranks inherit the imported torch/timm/open_clip; "spawn" re-imports
    # them in each child, 20-35 s on the shared 2-core test machine instead of < 1 s.
    mp.start_processes(_gather_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(global_loss.item(), rel=1e-5)
    assert abs(ranks[0]["loss"] - local_only) > 1e-3  # rank 0 did see rank 1's columns
    for name, p in reference.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-5, rtol=1e-4)


def test_learns_to_caption_synthetic_classes() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = DinoTxtConfig(
        vision_dim=16,
        vision_heads=2,
        num_registers=1,
        text_width=32,
        text_layers=1,
        text_heads=2,
        context_length=12,
        drop_path=0.0,
    )
    model = build("dinotxt", cfg)
    words = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "arrow"]
    templates = ["a photo of a {}", "a {}", "an image showing one {}"]
    prototypes = torch.randn(len(words), 1 + 1 + 4, 16, generator=g)

    def images() -> torch.Tensor:
        return prototypes + 0.5 * torch.randn(prototypes.shape, generator=g)

    optimiser = torch.optim.AdamW(model.param_groups(weight_decay=1e-4), lr=3e-3, betas=(0.9, 0.99))
    for step in range(150):
        captions = [templates[step % 3].format(w) for w in words]
        loss, _ = model.loss({"tokens_vision": images(), "tokens": model.tokenize(captions)})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        image = model.encode_image({"tokens_vision": torch.cat([images() for _ in range(4)])})
        labels = torch.arange(len(words)).repeat(4)
        for template in templates:
            scores = model.encode_text([template.format(w) for w in words]) @ image.T
            accuracy = (scores.argmax(dim=0) == labels).float().mean().item()
            assert accuracy > 0.8  # zero-shot over 8 classes: chance 1/8


def test_without_patch_tokens_g_is_the_class_token_alone(tiny) -> None:
    """The paper's [CLS] vs [CLS ; patch mean] ablation, as the official ``VisionTower``
    builds g from ``use_class_token`` / ``use_patch_tokens`` (facebookresearch/dinov3,
    dinov3/eval/text/vision_tower.py): CLS′ alone, D wide, and the text tower projects to D."""
    cfg = dataclasses.replace(tiny.configs["dinotxt"], use_patch_tokens=False)
    torch.manual_seed(0)
    model = build("dinotxt", cfg)
    full = tiny.model("dinotxt")
    full.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("text.")}, strict=False)
    batch = tiny.batch("dinotxt", batch_size=3)
    g, patches = model.vision_features(batch["tokens_vision"])
    g_full, _ = full.vision_features(batch["tokens_vision"])
    assert model.embed_dim == 16 and g.shape == (3, 16)
    torch.testing.assert_close(g, g_full[:, :16])  # the same CLS′, without the patch mean
    text = model.encode_text(tiny.class_texts("dinotxt", n=2))
    assert text.shape == (2, 16) and model.encode_image(batch).shape == (3, 16)
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss)
    dense = model.dense_logits(batch, text)  # the whole (CLS-trained) text embedding
    cosine = _dot(_unit(patches[1, 4].tolist()), _unit(text[0].tolist()))
    assert dense[1, 0, 1, 1].item() == pytest.approx(cosine, abs=1e-5)

"""The DINOv2/DINOv3 backbone adapter on tiny random-init timm models."""

from __future__ import annotations

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from pipeline_testing import TINY_VIT
from pipeline_testing import tiny_backbone as build_tiny_backbone
from timm.layers import apply_rot_embed_cat

from dinoalign.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoBackbone,
    build_backbone,
    convert_torchhub_state_dict,
    is_torchhub_state_dict,
    timm_to_torchhub_state_dict,
)

DINOV2 = "vit_small_patch14_dinov2"
DINOV2_REG = "vit_small_patch14_reg4_dinov2"
DINOV3 = "vit_small_patch16_dinov3"
DINOV3_QKV_BIAS = "vit_small_patch16_dinov3_qkvb"


def tiny_backbone(name: str, seed: int = 0, **model_kwargs: object) -> DinoBackbone:
    """A tiny backbone with O(1) random weights: matrices with std fan_in^-0.5 and 1-D
    parameters (norms, biases, LayerScale) randomised too, so that no block is close to
    the identity, the attention logits are far from uniform and every bias and norm matters."""
    torch.manual_seed(seed)
    backbone = build_tiny_backbone(name, **model_kwargs)
    with torch.no_grad():
        for param_name, param in backbone.vit.named_parameters():
            if param.ndim == 2:
                param.normal_(std=param.shape[1] ** -0.5)
            elif param.ndim == 1:
                scale_like = param_name.endswith("weight") or "gamma" in param_name
                param.normal_(mean=1.0 if scale_like else 0.0, std=0.5)
    return backbone


def images_for(
    backbone: DinoBackbone, grid: tuple[int, int], batch: int = 2, seed: int = 1
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    p = backbone.patch_size
    return torch.randn(batch, 3, grid[0] * p, grid[1] * p, generator=generator)


def last_block_input(
    vit: torch.nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the embedding and every block but the last by hand: tokens B×N×D and the
    RoPE table of the patch grid (None for DINOv2)."""
    x = vit.patch_embed(images)
    if isinstance(vit, timm.models.eva.Eva):
        x, rope = vit._pos_embed(x)
    else:
        x, rope = vit._pos_embed(x), None
    x = vit.norm_pre(x)
    for block in vit.blocks[:-1]:
        x = block(x) if rope is None else block(x, rope=rope)
    return x, rope


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "registers", "patch"), [(DINOV2, 0, 14), (DINOV2_REG, 4, 14), (DINOV3, 4, 16)]
)
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_output_shapes(name: str, registers: int, patch: int, grid: tuple[int, int]) -> None:
    backbone = tiny_backbone(name)
    images = images_for(backbone, grid)
    out = backbone(images)
    num_patches = grid[0] * grid[1]
    assert (
        backbone.embed_dim,
        backbone.num_heads,
        backbone.num_registers,
        backbone.patch_size,
    ) == (
        48,
        3,
        registers,
        patch,
    )
    assert out.cls.shape == (2, 48)
    assert out.registers.shape == (2, registers, 48)
    assert out.patches.shape == (2, num_patches, 48)
    assert out.attn_logits.shape == (2, 3, num_patches)
    assert out.attn_logits.dtype == torch.float32
    assert out.grid == grid
    # token order of timm: [CLS, registers, patches], all after the final norm
    tokens = backbone.vit.forward_features(images)
    torch.testing.assert_close(torch.cat([out.cls[:, None], out.registers, out.patches], 1), tokens)


def test_giant2_alias_builds_the_swiglu_giant() -> None:
    backbone = build_backbone("vit_giant2_patch14_dinov2", model_kwargs=TINY_VIT)
    mlp = backbone.vit.blocks[0].mlp  # SwiGLU: fc1 packs gate and value, twice fc2's input
    assert isinstance(mlp.act, torch.nn.SiLU) and mlp.fc1.out_features == 2 * mlp.fc2.in_features
    assert backbone(torch.zeros(1, 3, 28, 28)).patches.shape == (1, 4, 48)


# ----------------------------------------------------------------------------- attention logits


@pytest.mark.parametrize(
    ("name", "model_kwargs"),
    [
        (DINOV2, {}),
        (DINOV2_REG, {}),
        (DINOV2_REG, {"qk_norm": True}),
        (DINOV3, {}),
        (DINOV3_QKV_BIAS, {}),
    ],
    ids=["dinov2", "dinov2-reg", "dinov2-reg-qknorm", "dinov3", "dinov3-qkv-bias"],
)
def test_attn_logits_match_by_hand_recomputation(name: str, model_kwargs: dict) -> None:
    backbone = tiny_backbone(name, **model_kwargs)
    vit = backbone.vit
    images = images_for(backbone, (3, 4))
    out = backbone(images)

    with torch.no_grad():
        x, rope = last_block_input(vit, images)
        block = vit.blocks[-1]
        attn = block.attn
        heads, width = backbone.num_heads, backbone.embed_dim
        head_dim = width // heads
        prefix = 1 + backbone.num_registers
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros(width), attn.v_bias])
        else:
            bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(3 * width)
        h = block.norm1(x)
        qkv = h @ attn.qkv.weight.T + bias  # B×N×3D laid out as [q | k | v], heads inside each
        batch, tokens = h.shape[:2]
        q = qkv[..., :width].reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        k = qkv[..., width : 2 * width].reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        patch_keys = k[:, :, prefix:]
        if rope is not None:
            patch_keys = apply_rot_embed_cat(patch_keys, rope, half=True)
        expected = (q[:, :, :1] @ patch_keys.transpose(-1, -2)).squeeze(2) / head_dim**0.5
        # the by-hand run reaches the same final tokens as the model
        final = block(x) if rope is None else block(x, rope=rope)
        torch.testing.assert_close(vit.norm(final)[:, 0], out.cls)

    assert out.attn_logits.shape == (2, heads, 12)
    torch.testing.assert_close(out.attn_logits, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.5  # randomised weights give non-degenerate logits


@pytest.mark.parametrize("name", [DINOV2, DINOV2_REG, DINOV3])
def test_patch_softmax_matches_unfused_attention_probabilities(name: str) -> None:
    """The unfused attention softmaxes over ALL keys (CLS, registers, patches); restricted
    to the patch keys and renormalised it must equal softmax of our patch-only logits."""
    backbone = tiny_backbone(name)
    attn = backbone.vit.blocks[-1].attn
    attn.fused_attn = False
    captured: list[torch.Tensor] = []
    attn.attn_drop.register_forward_hook(lambda module, args, probs: captured.append(probs))
    out = backbone(images_for(backbone, (4, 3)))

    probs = captured[0]  # B×H×N×N, rows sum to one over all keys
    prefix = 1 + backbone.num_registers
    cls_to_patches = probs[:, :, 0, prefix:]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    torch.testing.assert_close(
        cls_to_patches / cls_to_patches.sum(-1, keepdim=True),
        out.attn_logits.softmax(-1),
        rtol=1e-4,
        atol=1e-6,
    )


# ----------------------------------------------------------------------------- frozen, inputs


def test_backbone_is_frozen() -> None:
    backbone = tiny_backbone(DINOV2_REG)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    assert not any(m.training for m in backbone.modules())
    images = images_for(backbone, (2, 2)).requires_grad_(True)
    out = backbone(images)
    assert not out.patches.requires_grad and not out.attn_logits.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_runs_in_bf16_and_returns_float32() -> None:
    backbone = tiny_backbone(DINOV2_REG)
    images = images_for(backbone, (4, 4))
    on_cpu = backbone(images)
    qkv_dtypes: list[torch.dtype] = []
    backbone.vit.blocks[-1].attn.qkv.register_forward_hook(
        lambda m, a, out: qkv_dtypes.append(out.dtype)
    )
    on_gpu = backbone.cuda()(images.cuda())
    assert qkv_dtypes == [torch.bfloat16]
    assert on_gpu.attn_logits.dtype == on_gpu.patches.dtype == torch.float32
    agreement = F.cosine_similarity(
        on_gpu.attn_logits.cpu().flatten(), on_cpu.attn_logits.flatten(), dim=0
    )
    assert agreement > 0.99


def test_normalize_both_layouts_by_hand() -> None:
    backbone = tiny_backbone(DINOV2)
    hwc = torch.randint(0, 256, (2, 28, 42, 3), dtype=torch.uint8)
    chw = hwc.permute(0, 3, 1, 2).contiguous()
    from_hwc, from_chw = backbone.normalize(hwc), backbone.normalize(chw)
    assert from_hwc.shape == (2, 3, 28, 42) and from_hwc.dtype == torch.float32
    torch.testing.assert_close(from_hwc, from_chw)
    pixel = hwc[1, 5, 7].tolist()
    expected = [(pixel[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)]
    torch.testing.assert_close(from_hwc[1, :, 5, 7], torch.tensor(expected))
    assert backbone(from_hwc).grid == (2, 3)


def test_bad_inputs_raise_clear_errors() -> None:
    backbone = tiny_backbone(DINOV2)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        backbone(torch.zeros(1, 3, 30, 28))
    with pytest.raises(TypeError, match="normalize"):
        backbone(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        backbone.normalize(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="channel axis"):
        backbone.normalize(torch.zeros(1, 3, 28, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="Did you mean 'vit_small_patch14_dinov2'"):
        build_backbone("vit_smal_patch14_dinov2")
    with pytest.raises(ValueError, match="img_size argument"):
        build_backbone(DINOV2, model_kwargs={"img_size": 98})
    with pytest.raises(FileNotFoundError, match="hf-hub:org/repo"):
        build_backbone(DINOV2, weights="/nonexistent/dinov2.pth", model_kwargs=TINY_VIT)


def test_none_model_kwargs_are_dropped() -> None:
    backbone = build_backbone(DINOV2, model_kwargs={**TINY_VIT, "drop_path_rate": None})
    assert backbone.embed_dim == 48


def test_hub_weights_offline_give_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="set backbone.weights to its path"):
        build_backbone(DINOV2, weights="timm/vit_small_patch14_dinov2.lvd142m", model_kwargs=TINY_VIT)


# ----------------------------------------------------------------------------- checkpoints


def assert_same_outputs(a: DinoBackbone, b: DinoBackbone) -> None:
    images = images_for(a, (3, 2))
    out_a, out_b = a(images), b(images)
    for field in ("cls", "registers", "patches", "attn_logits"):
        torch.testing.assert_close(getattr(out_a, field), getattr(out_b, field), rtol=0, atol=0)


@pytest.mark.parametrize("name", [DINOV2, DINOV2_REG, "vit_giant_patch14_reg4_dinov2"])
@pytest.mark.parametrize("chunked", [False, True])
def test_torchhub_round_trip(name: str, chunked: bool, tmp_path) -> None:
    source = tiny_backbone(name)
    timm_sd = source.vit.state_dict()
    official = timm_to_torchhub_state_dict(timm_sd)

    assert "mask_token" in official and official["mask_token"].shape == (1, 48)
    if source.num_registers:
        assert "register_tokens" in official and "reg_token" not in official
        assert official["pos_embed"].shape[1] == timm_sd["pos_embed"].shape[1] + 1  # + CLS position
    if "giant" in name:
        assert "blocks.0.mlp.w12.weight" in official and "blocks.1.mlp.w3.bias" in official
    if chunked:  # some official checkpoints nest blocks in chunks: blocks.<chunk>.<index>.*
        official = {k.replace("blocks.", "blocks.0.", 1): v for k, v in official.items()}
    assert is_torchhub_state_dict(official) and not is_torchhub_state_dict(timm_sd)

    converted = convert_torchhub_state_dict(official)
    assert converted.keys() == timm_sd.keys()
    for key, value in timm_sd.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)

    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    loaded = build_backbone(name, weights=str(path), img_size=56, model_kwargs=TINY_VIT)
    assert_same_outputs(source, loaded)


def test_torchhub_cls_position_is_folded_into_cls_token() -> None:
    """Official register models add pos_embed[:, 0] to the CLS token; timm's keep no CLS
    position, so conversion must add it into cls_token."""
    timm_sd = tiny_backbone(DINOV2_REG).vit.state_dict()
    official = timm_to_torchhub_state_dict(timm_sd)
    cls_position = torch.randn(1, 48)
    official["pos_embed"][:, 0] = cls_position
    official["cls_token"] = timm_sd["cls_token"] - cls_position
    converted = convert_torchhub_state_dict(official)
    torch.testing.assert_close(converted["cls_token"], timm_sd["cls_token"])


def test_torchhub_file_at_518_is_resampled_to_img_size(tmp_path) -> None:
    torch.manual_seed(0)
    vit518 = timm.create_model(DINOV2_REG, num_classes=0, img_size=518, **TINY_VIT)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(timm_to_torchhub_state_dict(vit518.state_dict()), path)
    loaded = build_backbone(DINOV2_REG, weights=str(path), img_size=56, model_kwargs=TINY_VIT)
    assert loaded.vit.pos_embed.shape == (1, 16, 48)  # 37×37 grid interpolated to 4×4
    torch.testing.assert_close(loaded.vit.reg_token, vit518.reg_token)


@pytest.mark.parametrize("name", [DINOV2_REG, DINOV3])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_local_timm_file(name: str, suffix: str, tmp_path) -> None:
    source = tiny_backbone(name)
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.vit.state_dict(), path)
    else:
        torch.save({"state_dict": source.vit.state_dict()}, path)  # wrapped, as trainers save
    loaded = build_backbone(name, weights=str(path), img_size=56, model_kwargs=TINY_VIT)
    assert_same_outputs(source, loaded)

    with pytest.raises(ValueError, match="do not fit the model vit_small_patch14_dinov2"):
        build_backbone(DINOV2, weights=str(path), img_size=56, model_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="pretrained"):
        build_backbone(name, pretrained=True, weights=str(path), model_kwargs=TINY_VIT)

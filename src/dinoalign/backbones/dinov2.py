"""The frozen DINOv2 / DINOv3 vision backbone: CLS, register and patch tokens plus the
last block's CLS-to-patch attention logits, for any image size that is a multiple of the
patch size.

Notation: B batch, D width, H heads, R register tokens, P = h·w patches on an h×w grid.

``build_backbone("vit_small_patch14_reg4_dinov2", model_kwargs=dict(embed_dim=96, depth=2,
num_heads=3))`` gives a tiny random-init model; ``weights=`` loads a hub name
(``hf-hub:org/repo`` or ``timm/<model>.<tag>``), a timm-layout file, or an official
torch-hub ``dinov2_vit*14*_pretrain.pth`` file (keys converted on the fly).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from collections.abc import Callable
from typing import Any

import safetensors.torch
import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import apply_rot_embed_cat
from timm.models import eva, vision_transformer
from torch import Tensor, nn

from dinoalign.backbones._frozen import FrozenModule
from dinoalign.errors import ConfigError, DataError, DataFileMissing, SetupError
from dinoalign.storage import fs_for, open_uri, read_bytes

# DINOv2's (and most timm models') normalisation; the backbone itself reads its model's
# own data config (DINOv3's satellite weights use other values), see DinoBackbone.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Arguments that build_backbone sets itself; model_kwargs may not override them.
_ADAPTER_KWARGS = ("img_size", "dynamic_img_size", "num_classes")

# Per timm model family: the function that maps a checkpoint onto the model (pos-embed
# resampling to img_size, upstream DINOv3 key names for Eva).
_CHECKPOINT_FILTERS: dict[
    type[nn.Module], Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
] = {
    vision_transformer.VisionTransformer: vision_transformer.checkpoint_filter_fn,
    eva.Eva: eva.checkpoint_filter_fn,
}

_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.")


@dataclasses.dataclass
class BackboneOutput:
    """Token features of one batch, all float32, tokens after the final norm.

    ``cls`` B×D, ``registers`` B×R×D (R may be 0), ``patches`` B×P×D in row-major grid
    order, ``attn_logits`` B×H×P: last block, CLS query against the patch keys only,
    q·kᵀ·head_dim^-0.5 before softmax. ``grid`` = (h, w) with h·w = P.
    """

    cls: Tensor
    registers: Tensor
    patches: Tensor
    attn_logits: Tensor
    grid: tuple[int, int]


class _ClsPatchLogitsProbe:
    """Reads the CLS-query/patch-key logits of one attention module from its fused qkv
    projection output, while fused attention (which never materialises them) runs.

    Handles timm's qkv layout (B×N×(3·H·hd), q|k|v then heads), q/k norms, EVA's q/v bias
    kept outside the Linear, and the RoPE that DINOv3 applies to patch tokens.
    """

    def __init__(self, attn: nn.Module, num_prefix_tokens: int) -> None:
        self.attn = attn
        self.num_prefix_tokens = num_prefix_tokens
        self.logits: Tensor | None = None
        self._rope: Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _ClsPatchLogitsProbe:
        self._handles = [
            self.attn.register_forward_pre_hook(self._capture_rope, with_kwargs=True),
            self.attn.qkv.register_forward_hook(self._on_qkv),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._rope = None

    def _capture_rope(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._rope = kwargs.get("rope")

    def _on_qkv(self, module: nn.Module, args: tuple, qkv: Tensor) -> None:
        attn = self.attn
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is not None:  # EVA adds its q/v bias (k bias fixed at 0) after the Linear
            qkv = qkv + torch.cat((q_bias, attn.k_bias, attn.v_bias))
        batch, tokens, _ = qkv.shape
        q, k, _ = (
            qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        q, k = attn.q_norm(q), attn.k_norm(k)  # B×H×N×hd
        cls_query = q[:, :, 0]  # B×H×hd
        patch_keys = k[:, :, self.num_prefix_tokens :]  # B×H×P×hd
        if self._rope is not None:  # RoPE rotates patch tokens only, never the prefix
            patch_keys = apply_rot_embed_cat(patch_keys, self._rope, half=attn.rotate_half)
        self.logits = (
            torch.einsum("bhd,bhpd->bhp", cls_query.float(), patch_keys.float()) * attn.scale
        )


class DinoBackbone(FrozenModule):
    """A frozen timm DINOv2/DINOv3 ViT (``.vit``) that returns :class:`BackboneOutput`.

    ``forward`` takes B×3×H×W float images already normalised with ``mean``/``std``
    (``normalize`` does it for uint8 images); H and W must be multiples of ``patch_size``.
    On CUDA the forward runs under bf16 autocast.

    ``data_config`` is timm's ``resolve_model_data_config`` of the model (its pretrained
    config: ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode`` and the
    pretraining ``input_size``); the ``mean``/``std`` buffers (3,) come from it.
    """

    mean: Tensor
    std: Tensor
    data_config: dict[str, Any]

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if getattr(vit, "cls_token", None) is None:
            raise ValueError(
                f"{type(vit).__name__} has no CLS token; the backbone adapter needs one"
            )
        attn = vit.blocks[-1].attn
        qkv = getattr(attn, "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * attn.num_heads * attn.head_dim:
            raise ValueError(
                f"the last block's attention ({type(attn).__name__}) has no fused qkv projection "
                "with q, k and v for every head; use a DINOv2 or DINOv3 timm model"
            )
        if getattr(attn, "q_bias", None) is not None:
            # EVA otherwise calls F.linear with qkv.weight directly, so the qkv hook would
            # never fire; its separate-bias path computes the same sum through the module.
            attn.qkv_bias_separate = True
        patch_size = vit.patch_embed.patch_size
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"non-square patches {patch_size} are not supported")
        self.vit = vit
        self.data_config = dict(resolve_model_data_config(vit))
        mean, std = self.data_config["mean"], self.data_config["std"]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(
                f"{type(vit).__name__}'s data config has mean {mean} and std {std}; the adapter "
                "takes RGB images and needs 3 values each"
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.freeze()

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.vit.blocks[-1].attn.num_heads)

    @property
    def num_registers(self) -> int:
        return int(self.vit.num_prefix_tokens) - 1

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    def preprocessing(self, img_size: int, interpolation: str | None = None) -> dict[str, Any]:
        """The image preprocessing of this model fed img_size×img_size crops, JSON-friendly:
        ``mean``, ``std``, ``interpolation`` (``interpolation`` when given, else the model's),
        ``crop_pct``, ``crop_mode``, ``input_size`` [3, img_size, img_size] and the data
        config's own (pretraining) ``config_input_size``."""
        cfg = self.data_config
        return {
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "interpolation": interpolation or str(cfg.get("interpolation", "bicubic")),
            "crop_pct": float(cfg.get("crop_pct", 1.0)),
            "crop_mode": str(cfg.get("crop_mode", "center")),
            "input_size": [3, int(img_size), int(img_size)],
            "config_input_size": [int(v) for v in cfg.get("input_size", ())],
        }

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images B×H×W×3 or B×3×H×W (0..255) -> float32 B×3×H×W, (x/255 - mean)/std
        with the model's own ``mean``/``std`` (see ``data_config``)."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"normalize expects uint8 images (0..255), got {images.dtype}; "
                "float images are taken as already normalised: pass them to forward directly"
            )
        if images.ndim != 4:
            raise ValueError(
                f"expected a batch B×H×W×3 or B×3×H×W, got shape {tuple(images.shape)}"
            )
        channels_first, channels_last = images.shape[1] == 3, images.shape[-1] == 3
        if channels_first == channels_last:
            raise ValueError(
                f"cannot tell the channel axis of shape {tuple(images.shape)}: "
                "give B×H×W×3 or B×3×H×W with exactly one axis of size 3 (RGB)"
            )
        if channels_last:
            images = images.permute(0, 3, 1, 2)
        # uint8 crosses to the device, then converts there: a blocking host-to-device copy
        # that also changes dtype converts on the host first (4x the bytes over PCIe).
        x = images.to(self.mean.device).to(torch.float32) / 255.0
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def forward(self, images: Tensor) -> BackboneOutput:
        """B×3×H×W normalised float images -> :class:`BackboneOutput` (float32)."""
        grid = self._check_images(images)
        num_prefix = int(self.vit.num_prefix_tokens)
        probe = _ClsPatchLogitsProbe(self.vit.blocks[-1].attn, num_prefix)
        with (
            torch.no_grad(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda),
            probe,
        ):
            tokens = self.vit.forward_features(images).float()  # B×(1+R+P)×D
        if probe.logits is None:
            raise RuntimeError(
                f"the last block of {type(self.vit).__name__} did not call its qkv projection; "
                "this timm model is not supported by the backbone adapter"
            )
        return BackboneOutput(
            cls=tokens[:, 0],
            registers=tokens[:, 1:num_prefix],
            patches=tokens[:, num_prefix:],
            attn_logits=probe.logits,
            grid=grid,
        )

    def _check_images(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images B×3×H×W, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"expected normalised float images, got {images.dtype}; use normalize() first"
            )
        height, width = images.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}×{width} is not a multiple of the patch size {p}; "
                f"resize or crop to e.g. {max(p, height // p * p)}×{max(p, width // p * p)}"
            )
        return height // p, width // p


# ----------------------------------------------------------------------------- checkpoints


def convert_torchhub_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official DINOv2 torch-hub keys -> timm keys (a new dict; the input is not changed).

    Removes the block-chunk level (``blocks.C.N.*`` -> ``blocks.N.*``), drops
    ``mask_token``, renames ``register_tokens`` -> ``reg_token`` (folding the CLS position
    embedding into ``cls_token``, as timm's register models keep no CLS position) and the
    SwiGLU ``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2``. Pos-embed resampling to the
    model's grid happens at load time.
    """
    unchunked = {_CHUNKED_BLOCK_KEY.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}
    # timm's own DINOv2 conversion; it pops from its input and ignores its model argument
    return vision_transformer._convert_dinov2(unchunked, model=None)


def timm_to_torchhub_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm DINOv2 keys -> official torch-hub keys, the inverse of
    :func:`convert_torchhub_state_dict` (used to export and to test the conversion).

    Register models get a zero CLS position embedding in front of ``pos_embed`` (so that
    cls_token + pos_embed[:, 0] is unchanged), a zero ``mask_token`` (1×D) is added and
    SwiGLU MLPs (fc1 twice as wide as fc2's input) are renamed to ``w12``/``w3``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif key == "pos_embed" and "reg_token" in state_dict:
            cls_position = value.new_zeros(value.shape[0], 1, value.shape[2])
            out[key] = torch.cat([cls_position, value], dim=1)
        elif (
            match := re.match(r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", key)
        ) and _is_swiglu(state_dict, match.group(1)):
            block, fc, kind = match.groups()
            out[f"blocks.{block}.mlp.{'w12' if fc == '1' else 'w3'}.{kind}"] = value
        else:
            out[key] = value
    out["mask_token"] = state_dict["cls_token"].new_zeros(1, state_dict["cls_token"].shape[-1])
    return out


def _is_swiglu(state_dict: dict[str, Tensor], block: str) -> bool:
    # SwiGLU packs gate and value into fc1: its output is twice fc2's input
    fc1 = state_dict[f"blocks.{block}.mlp.fc1.weight"]
    fc2 = state_dict[f"blocks.{block}.mlp.fc2.weight"]
    return fc1.shape[0] == 2 * fc2.shape[1]


def is_torchhub_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """True for an official DINOv2 torch-hub checkpoint (mask token, registers under their
    official name, or chunked blocks)."""
    return (
        "mask_token" in state_dict
        or "register_tokens" in state_dict
        or any(_CHUNKED_BLOCK_KEY.match(k) for k in state_dict)
    )


def read_state_dict(uri: str) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.bin``/``.pt`` file (loaded with
    ``weights_only=True``) at a local path or any URI that :mod:`dinoalign.storage` opens."""
    fs, path = fs_for(uri)
    if not fs.exists(path):
        raise DataFileMissing(
            f"backbone weights {uri!r} not found; give a local or s3:// .safetensors/.pth file, "
            "or a hub name 'hf-hub:org/repo' or 'timm/<model>.<tag>'"
        )
    if uri.endswith(".safetensors"):
        return safetensors.torch.load(read_bytes(uri))
    with open_uri(uri, "rb") as f:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise DataError(f"{uri} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def load_backbone_weights(vit: nn.Module, uri: str) -> None:
    """Load a timm-layout or official torch-hub checkpoint file into ``vit`` (strict)."""
    state_dict = read_state_dict(uri)
    # DINOv2 only: upstream DINOv3 files (also with a mask token) are Eva's filter's job
    if isinstance(vit, vision_transformer.VisionTransformer) and is_torchhub_state_dict(state_dict):
        state_dict = convert_torchhub_state_dict(state_dict)
    checkpoint_filter = _CHECKPOINT_FILTERS.get(type(vit))
    try:
        if checkpoint_filter is not None:
            state_dict = checkpoint_filter(state_dict, vit)
        vit.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # missing/unexpected keys, shapes, pos-embed grids
        raise ConfigError(
            f"weights {uri} do not fit the model {vit.default_cfg.get('architecture')}: check that "
            f"backbone.name (size, registers) and model_kwargs match the checkpoint. {err}"
        ) from err


# ----------------------------------------------------------------------------- building


def supported_backbones() -> list[str]:
    """timm architectures the adapter is made for (DINOv2 with/without registers, DINOv3)."""
    return timm.list_models("*dinov2") + timm.list_models("*dinov3*")


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    img_size: int = 224,
    model_kwargs: dict[str, Any] | None = None,
) -> DinoBackbone:
    """Build a frozen :class:`DinoBackbone` from a timm model name (optionally ``.tag``).

    ``weights``: None (random init, or timm's default hub weights when ``pretrained``);
    ``hf-hub:org/repo`` or ``timm/<model>.<tag>`` (timm downloads from that hub repo);
    otherwise a checkpoint file (timm layout or official torch-hub DINOv2), which cannot
    be combined with ``pretrained``. ``model_kwargs`` go to timm (``None`` values
    dropped), e.g. ``dict(embed_dim=96, depth=2, num_heads=3)`` for tests.
    ``img_size`` sizes the learned position embedding; other sizes are interpolated.
    """
    arch = _resolve_arch(name)
    kwargs = _timm_kwargs(img_size, model_kwargs)
    hub_id = _hub_id(weights)
    if hub_id is not None:
        vit = _create_from_hub(arch, hub_id, kwargs)
    elif weights is not None:
        if pretrained:
            raise ConfigError(
                f"pretrained=True would download timm's weights that the file {weights!r} "
                "replaces; set pretrained to false when weights is a file"
            )
        vit = timm.create_model(arch, pretrained=False, **kwargs)
        load_backbone_weights(vit, weights)
    else:
        vit = (
            _create_from_hub(arch, None, kwargs)
            if pretrained
            else timm.create_model(arch, **kwargs)
        )
    return DinoBackbone(vit)


def _resolve_arch(name: str) -> str:
    # DINOv2's own code calls ViT-g "vit_giant2"; timm calls it "vit_giant"
    arch = name.replace("vit_giant2_", "vit_giant_", 1)
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown timm backbone {name!r}.{hint} Made for: {', '.join(supported_backbones())}"
        )
    return arch


def _timm_kwargs(img_size: int, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    user = {k: v for k, v in (model_kwargs or {}).items() if v is not None}
    clash = sorted(set(user) & set(_ADAPTER_KWARGS))
    if clash:
        raise ConfigError(
            f"model_kwargs may not set {clash}: the adapter sets them (use build_backbone's "
            "img_size argument; dynamic image size and no classifier head are always on)"
        )
    return {"img_size": img_size, "dynamic_img_size": True, "num_classes": 0, **user}


def _hub_id(weights: str | None) -> str | None:
    if weights is None:
        return None
    if weights.startswith("hf-hub:"):
        return weights[len("hf-hub:") :]
    if weights.startswith("timm/"):
        return weights
    return None


def _create_from_hub(arch: str, hub_id: str | None, kwargs: dict[str, Any]) -> nn.Module:
    overlay = {} if hub_id is None else {"hf_hub_id": hub_id, "source": "hf-hub"}
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        where = hub_id or f"timm's default source for {arch}"
        raise SetupError(
            f"could not load pretrained backbone weights from {where} "
            f"({type(err).__name__}: {err}). Without network access, download the file elsewhere "
            "and set backbone.weights to its path (timm .safetensors or the official "
            "dinov2_*_pretrain.pth)"
        ) from err


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): identifies the weights used."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def build_backbone_from(cfg: Any, seed: int) -> DinoBackbone:
    """The frozen backbone of a ``backbone:`` params section (a ``BackboneConfig``), with
    the torch seed set first so that random-init backbones are the same in every process."""
    torch.manual_seed(seed)  # random-init backbones are identical in every actor
    return build_backbone(
        cfg.name, pretrained=cfg.pretrained, weights=cfg.weights, img_size=cfg.img_size,
        model_kwargs=cfg.model_kwargs,
    )


def backbone_preprocessing(backbone: Any, embed: Any) -> dict[str, Any]:
    """How the embed stage feeds ``backbone`` (a :class:`~dinoalign.backbones.DinoBackbone`):
    its model's data config at ``embed.img_size``, ``embed.interpolation`` (when set)
    overriding the model's interpolation. JSON-friendly; recorded in the spec."""
    return backbone.preprocessing(embed.img_size, embed.interpolation)

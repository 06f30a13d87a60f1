"""stepkit's ViT under timm's and Hugging Face's names, and back; position embeddings resized to another grid.

timm's ``vision_transformer.py`` (and DINO's and I-JEPA's released
checkpoints, which share its layout) differ from stepkit's ViT only in a
few names: the patch embedding is ``patch_embed.proj`` and the MLP's
layers ``fc1`` / ``fc2`` instead of ``mlp.0`` / ``mlp.2``. Shapes are the
same, including ``pos_embed`` ``(1, 1 + N, dim)`` with the class token's
position first. I-JEPA's encoder has no class token: its ``pos_embed`` is
``(1, N, dim)``.

DINOv2's releases: the original state dicts share these names (``ls1.gamma``,
``register_tokens``, ``mask_token``, SwiGLU's ``mlp.w12`` / ``mlp.w3``; training
checkpoints nest blocks in chunks, ``blocks.C.N.``); timm's DINOv2 ViTs with
registers call them ``reg_token`` and add no position to the class and register
tokens (the class token's position folded into the token); Hugging Face's
``Dinov2Model`` / ``Dinov2WithRegistersModel`` name everything anew and split
the attention's query, key and value (``from_hf_dinov2`` / ``to_hf_dinov2``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TIMM_NAMES", "from_hf_dinov2", "from_timm", "hf_dinov2_config", "resize_pos_embed",
           "timm_model_name", "to_hf_dinov2", "to_timm", "vit_names"]

_TO_TIMM = ((r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
            (r"^(blocks\.\d+\.mlp)\.0\.", r"\1.fc1."),
            (r"^(blocks\.\d+\.mlp)\.2\.", r"\1.fc2."))
_FROM_TIMM = ((r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),
              (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # DINOv2's block chunks: the inner index is global
              (r"^(blocks\.\d+\.mlp)\.fc1\.", r"\1.0."),
              (r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.2."))
_SWIGLU = ((r"^(blocks\.\d+\.mlp)\.0\.", r"\1.w12."), (r"^(blocks\.\d+\.mlp)\.2\.", r"\1.w3."))
_SWIGLU_TO_TIMM = ((r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1."), (r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2."))

# timm's names for the standard widths: (dim, depth, heads) -> the name's stem
TIMM_NAMES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
              (1024, 24, 16): "vit_large", (1280, 32, 16): "vit_huge"}


def _renamed(state: dict[str, Tensor], rules: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    out = {}
    for name, value in state.items():
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        out[name] = value
    return out


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``VisionTransformer`` state dict under timm's names.

    Registers go out as timm's DINOv2 ViTs with registers hold them (``no_embed_class``): ``reg_token``,
    the class token's position added to the class token, ``pos_embed`` the patches' alone. The mask
    token has no place in timm's ViT and is left out; SwiGLU's ``w12`` / ``w3`` become ``fc1`` / ``fc2``
    (timm's ``SwiGLUPacked``).

    Examples:
        >>> sorted(to_timm({"patch_embed.weight": 0, "blocks.3.mlp.2.bias": 1}))
        ['blocks.3.mlp.fc2.bias', 'patch_embed.proj.weight']
    """
    state = dict(state)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        pos = state.pop("pos_embed")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    return _renamed(state, _TO_TIMM + _SWIGLU_TO_TIMM)


def from_timm(state: dict[str, Tensor], *, swiglu: bool = False) -> dict[str, Tensor]:
    """A timm (or DINO / I-JEPA / DINOv2 release) ViT state dict under stepkit's names; other names unchanged.

    timm's ``reg_token`` becomes ``register_tokens``, and its ``pos_embed`` without the class token's
    row gets a zero row (timm adds no position to the class token of a ViT with registers).
    ``swiglu``: the feed-forward is a ``SwiGLU`` (``fc1`` / ``fc2`` are its ``w12`` / ``w3``).

    Examples:
        >>> sorted(from_timm({"patch_embed.proj.weight": 0, "blocks.0.mlp.fc1.weight": 1}))
        ['blocks.0.mlp.0.weight', 'patch_embed.weight']
        >>> sorted(from_timm({"blocks.1.7.mlp.w12.weight": 0}))  # DINOv2's chunked blocks
        ['blocks.7.mlp.w12.weight']
    """
    state = dict(state)
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        pos = state.get("pos_embed")
        if pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
            state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    state = _renamed(state, _FROM_TIMM)
    return _renamed(state, _SWIGLU) if swiglu else state


_HF_EMBEDDINGS = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
                  "embeddings.register_tokens": "register_tokens",
                  "embeddings.position_embeddings": "pos_embed",
                  "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
                  "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
                  "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_HUB_LAYER = {"norm1": "norm1", "norm2": "norm2", "layer_scale1.lambda1": "ls1.gamma",
                 "layer_scale2.lambda1": "ls2.gamma", "attention.output.dense": "attn.proj",
                 "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2", "mlp.weights_in": "mlp.w12",
                 "mlp.weights_out": "mlp.w3"}  # the hub files' names, which to_hf_dinov2 writes
_HF_LAYER = {**_HF_HUB_LAYER, "attention.o_proj": "attn.proj", "mlp.down_proj": "mlp.w3"}  # + transformers 5
_HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),  # hub files
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))  # transformers 5's own names


def from_hf_dinov2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict under stepkit's names.

    Both the hub files' names (``attention.attention.query``, ``mlp.weights_in``) and transformers 5's
    (``attention.q_proj``, ``mlp.gate_proj`` / ``up_proj``) are read; query, key and value are stacked
    into one ``qkv``, the gate and up projections into SwiGLU's ``w12``. Names it does not know are
    kept as they are (so a caller can list them).

    Examples:
        >>> hf = {"embeddings.position_embeddings": 0, "encoder.layer.2.layer_scale1.lambda1": 1}
        >>> sorted(from_hf_dinov2(hf))
        ['blocks.2.ls1.gamma', 'pos_embed']
    """
    out: dict[str, Tensor] = {}
    parts: dict[str, Tensor] = {}
    for name, value in state.items():
        if name in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[name]] = value
            continue
        match = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", name)
        if not match:
            out[name] = value
            continue
        layer, inner, kind = match.groups()
        inner_kind = f"{inner}.{kind}" if kind == "lambda1" else inner
        if inner_kind in _HF_LAYER:
            suffix = "" if kind == "lambda1" else f".{kind}"
            out[f"blocks.{layer}.{_HF_LAYER[inner_kind]}{suffix}"] = value
        elif any(inner in names for names in _HF_QKV) or inner in ("mlp.gate_proj", "mlp.up_proj"):
            parts[name] = value
        else:
            out[name] = value
    layers = sorted({int(n.split(".")[2]) for n in parts})
    for layer in layers:
        for kind in ("weight", "bias"):
            for names in _HF_QKV:
                pieces = [parts.get(f"encoder.layer.{layer}.{n}.{kind}") for n in names]
                if all(p is not None for p in pieces):
                    out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(pieces)  # type: ignore[arg-type]
            gate, up = (parts.get(f"encoder.layer.{layer}.mlp.{n}.{kind}") for n in ("gate_proj", "up_proj"))
            if gate is not None and up is not None:
                out[f"blocks.{layer}.mlp.w12.{kind}"] = torch.cat([gate, up])
    return out


def vit_names(state: dict[str, Tensor], *, swiglu: bool = False) -> dict[str, Tensor]:
    """A ViT state dict in any layout this module reads (stepkit's, timm's, DINO / I-JEPA / DINOv2
    releases, Hugging Face's DINOv2) under stepkit's names; other names unchanged.

    Examples:
        >>> sorted(vit_names({"encoder.layer.0.mlp.fc1.bias": 0, "blocks.1.mlp.fc2.bias": 1}))
        ['blocks.0.mlp.0.bias', 'blocks.1.mlp.2.bias']
    """
    return from_timm(from_hf_dinov2(state), swiglu=swiglu)


def to_hf_dinov2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``VisionTransformer`` state dict under the names of the Hugging Face hub's DINOv2 files.

    A ViT without LayerScale gets ``lambda1`` of ones and one without a mask token a zero one, so
    ``Dinov2Model`` computes the same features. transformers 4 reads these names as they are,
    transformers 5 renames them when it loads (as it does the hub's own files).

    Examples:
        >>> [n.split(".")[-2] for n in sorted(to_hf_dinov2({"blocks.0.attn.qkv.bias": torch.zeros(6)}))]
        ['key', 'query', 'value']
    """
    to_embeddings = {v: k for k, v in _HF_EMBEDDINGS.items()}
    to_layer = {v: k for k, v in _HF_HUB_LAYER.items()}
    out: dict[str, Tensor] = {}
    layers = set()
    for name, value in state.items():
        if name in to_embeddings:
            out[to_embeddings[name]] = value
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+?)(?:\.(weight|bias))?$", name)
        if not match:
            raise ValueError(f"to_hf_dinov2: {name!r} has no place in a Hugging Face DINOv2 model")
        layer, inner, kind = match.groups()
        layers.add(layer)
        head = f"encoder.layer.{layer}"
        if inner == "attn.qkv":
            for part, piece in zip(_HF_QKV[0], value.chunk(3), strict=True):
                out[f"{head}.{part}.{kind}"] = piece
        elif inner in to_layer:
            out[f"{head}.{to_layer[inner]}" + (f".{kind}" if kind else "")] = value
        else:
            raise ValueError(f"to_hf_dinov2: {name!r} has no place in a Hugging Face DINOv2 model")
    widths = [int(state[k].shape[-1]) for k in ("cls_token", "norm.weight") if k in state]
    if widths:  # a whole ViT: what Dinov2Model has and this ViT may not, as the identity
        for layer in layers:
            for which in ("layer_scale1", "layer_scale2"):
                out.setdefault(f"encoder.layer.{layer}.{which}.lambda1", torch.ones(widths[0]))
        out.setdefault("embeddings.mask_token", torch.zeros(1, widths[0]))
    return out


def hf_dinov2_config(arguments: dict, *, image_size: int | None = None) -> dict:
    """The ``config.json`` of a Hugging Face DINOv2 model equal to a ``VisionTransformer`` of these
    arguments (its ``arch`` record); ``Dinov2WithRegistersModel`` when it has registers.

    Raises:
        ValueError: for a ViT that model cannot be: no class token, or fixed sine-cosine positions.

    Examples:
        >>> hf_dinov2_config({"dim": 64, "depth": 2, "heads": 4, "registers": 4})["model_type"]
        'dinov2_with_registers'
    """
    a = arguments
    if not a.get("class_token", True) or a.get("pos_embed", "learned") != "learned":
        raise ValueError("format='hf' needs a ViT with a class token and learned positions (DINOv2's); "
                         "this one has none: use --format safetensors or timm")
    registers = int(a.get("registers", 0))
    ratio = float(a.get("mlp_ratio", 4.0))
    config = {"model_type": "dinov2_with_registers" if registers else "dinov2",
              "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
              "hidden_size": a["dim"], "num_hidden_layers": a.get("depth", 12),
              "num_attention_heads": a.get("heads", 6),
              "mlp_ratio": int(ratio) if ratio.is_integer() else ratio,
              "patch_size": a.get("patch_size", 16), "image_size": image_size or a.get("img_size", 224),
              "num_channels": a.get("in_chans", 3), "hidden_act": "gelu", "layer_norm_eps": 1e-6,
              "layerscale_value": a.get("layer_scale") or 1.0, "qkv_bias": True,
              "use_swiglu_ffn": a.get("ffn", "mlp") == "swiglu", "drop_path_rate": 0.0,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}
    if registers:
        config["num_register_tokens"] = registers
    else:
        config["use_mask_token"] = True
    return config


def timm_model_name(dim: int, depth: int, heads: int, patch_size: int, img_size: int, *,
                    dinov2: bool = False, registers: int = 0) -> str:
    """The timm model name of these widths (``vit_small_patch16_224``); other widths borrow
    ``vit_small``'s name and pass theirs as model arguments. ``dinov2`` (a ViT with LayerScale) at
    patch 14: timm's DINOv2 names (``vit_small_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``).

    Examples:
        >>> timm_model_name(384, 12, 6, 16, 224), timm_model_name(64, 4, 4, 4, 32)
        ('vit_small_patch16_224', 'vit_small_patch16_224')
        >>> timm_model_name(384, 12, 6, 14, 224, dinov2=True, registers=4)
        'vit_small_patch14_reg4_dinov2'
    """
    if dinov2 and patch_size == 14 and (dim, depth, heads) in TIMM_NAMES and registers in (0, 4):
        return f"{TIMM_NAMES[(dim, depth, heads)]}_patch14_{'reg4_' if registers else ''}dinov2"
    stem = TIMM_NAMES.get((dim, depth, heads), "vit_small")
    patch = patch_size if (dim, depth, heads) in TIMM_NAMES else 16
    size = img_size if (dim, depth, heads) in TIMM_NAMES and img_size in (224, 384) else 224
    return f"{stem}_patch{patch}_{size}"


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], *, class_token: bool) -> Tensor:
    """Position embeddings ``(1, [1 +] h * w, dim)`` resampled bicubically to ``grid`` (the class
    token's row, when there is one, kept as it is).

    The saved grid is taken to be square (as every ViT stepkit, timm, DINO and
    I-JEPA train saves).

    Examples:
        >>> pos = torch.randn(1, 1 + 4 * 4, 8)
        >>> resize_pos_embed(pos, (2, 3), class_token=True).shape
        torch.Size([1, 7, 8])
    """
    head, patches = (pos[:, :1], pos[:, 1:]) if class_token else (pos[:, :0], pos)
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed: {patches.shape[1]} patch positions are not a square grid")
    if (side, side) == tuple(grid):
        return pos
    dim = patches.shape[-1]
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos.dtype)
    return torch.cat([head, resized], dim=1)

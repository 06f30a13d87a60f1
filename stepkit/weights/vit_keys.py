"""stepkit's ViT under timm's names, and back; position embeddings resized to another patch grid.

timm's ``vision_transformer.py`` (and DINO's and I-JEPA's released
checkpoints, which share its layout) differ from stepkit's ViT only in a
few names: the patch embedding is ``patch_embed.proj`` and the MLP's
layers ``fc1`` / ``fc2`` instead of ``mlp.0`` / ``mlp.2``. Shapes are the
same, including ``pos_embed`` ``(1, 1 + N, dim)`` with the class token's
position first. I-JEPA's encoder has no class token: its ``pos_embed`` is
``(1, N, dim)``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TIMM_NAMES", "from_timm", "resize_pos_embed", "timm_model_name", "to_timm"]

_TO_TIMM = ((r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
            (r"^(blocks\.\d+\.mlp)\.0\.", r"\1.fc1."),
            (r"^(blocks\.\d+\.mlp)\.2\.", r"\1.fc2."))
_FROM_TIMM = ((r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),
              (r"^(blocks\.\d+\.mlp)\.fc1\.", r"\1.0."),
              (r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.2."))

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

    Examples:
        >>> sorted(to_timm({"patch_embed.weight": 0, "blocks.3.mlp.2.bias": 1}))
        ['blocks.3.mlp.fc2.bias', 'patch_embed.proj.weight']
    """
    return _renamed(state, _TO_TIMM)


def from_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm (or DINO / I-JEPA release) ViT state dict under stepkit's names; other names unchanged.

    Examples:
        >>> sorted(from_timm({"patch_embed.proj.weight": 0, "blocks.0.mlp.fc1.weight": 1}))
        ['blocks.0.mlp.0.weight', 'patch_embed.weight']
    """
    return _renamed(state, _FROM_TIMM)


def timm_model_name(dim: int, depth: int, heads: int, patch_size: int, img_size: int) -> str:
    """The timm model name of these widths (``vit_small_patch16_224``); other widths borrow
    ``vit_small``'s name and pass theirs as model arguments.

    Examples:
        >>> timm_model_name(384, 12, 6, 16, 224), timm_model_name(64, 4, 4, 4, 32)
        ('vit_small_patch16_224', 'vit_small_patch16_224')
    """
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

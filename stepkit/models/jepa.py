"""I-JEPA's predictor: a narrow transformer from context tokens to the representations of target patches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.models.cnn import grid_mean
from stepkit.models.vit import Block, VisionTransformer, _init_weights, sincos_pos_embed_2d


def gather_tokens(tokens: Tensor, idx: Tensor) -> Tensor:
    """``tokens`` ``(B, N, D)`` at ``idx`` ``(B, ...)`` -> ``(B, ..., D)``."""
    b, d = tokens.shape[0], tokens.shape[-1]
    flat = idx.reshape(b, -1)
    out = torch.gather(tokens, 1, flat[..., None].expand(-1, -1, d))
    return out.reshape(*idx.shape, d)


def jepa_targets(tokens: Tensor, target_idx: Tensor) -> Tensor:
    """I-JEPA's regression targets: the target encoder's patch tokens, layer-normed over features
    (no affine), at the target blocks: ``(B, N, D)``, ``(B, M, K)`` -> ``(B, M, K, D)``."""
    return gather_tokens(F.layer_norm(tokens, tokens.shape[-1:]), target_idx)


class JEPAPredictor(nn.Module):
    """Context tokens + mask tokens at the target positions -> predicted target tokens.

    ``forward(context, context_idx, target_idx)``: ``context`` ``(B, Kc, enc_dim)``
    are the context encoder's patch tokens at patch indices ``context_idx``
    ``(B, Kc)``; ``target_idx`` ``(B, M, Kt)`` holds M target blocks. Each
    block is predicted separately (the context repeated M times), from a
    learned mask token plus the position embedding of each target patch;
    returns ``(B, M, Kt, out_dim)``, ``out_dim`` defaulting to ``enc_dim``
    (H-JEPA sets it to put one head per level on top). Positions are I-JEPA's
    fixed 2-D sine-cosine embeddings of the (square) patch grid, or
    ``pos_embed="learned"``.
    """

    def __init__(
        self,
        num_patches: int,
        enc_dim: int,
        dim: int = 96,
        depth: int = 4,
        heads: int = 4,
        out_dim: int | None = None,
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        _check.integer_at_least("num_patches", num_patches, 1)
        _check.one_of("pos_embed", pos_embed, ("learned", "sincos"))
        if dim % heads:
            _check.fail("predictor dim", dim, f"a multiple of heads={heads}")
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "sincos":
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                _check.fail("num_patches", num_patches, "a square grid's patch count for sincos positions")
            self.register_buffer("pos", sincos_pos_embed_2d(dim, side, side)[None])
        else:
            self.pos = nn.Parameter(torch.zeros(1, num_patches, dim))
            nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, enc_dim if out_dim is None else out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor) -> Tensor:
        b, m, kt = target_idx.shape
        pos = self.pos.expand(b, -1, -1)
        x = self.embed(context) + gather_tokens(pos, context_idx)
        x = x.repeat_interleave(m, dim=0)  # one sequence per (sample, target block)
        targets = target_idx.reshape(b * m, kt)
        queries = self.mask_token + gather_tokens(pos.repeat_interleave(m, dim=0), targets)
        h = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            h = block(h)
        # a copy, not a view: FSDP2 cannot hook the backward of a module's view output safely
        return self.out(self.norm(h[:, -kt:])).reshape(b, m, kt, -1).clone()


def pooled_patches(encoder: VisionTransformer, images: Tensor, pool: int) -> Tensor:
    """Frozen features of a JEPA encoder: its patch tokens averaged over a ``pool x pool`` grid, flattened.

    ``(B, C, H, W)`` -> ``(B, pool * pool * dim)``; ``pool=1`` is the plain
    mean of the patch tokens (I-JEPA's evaluation), a larger pool keeps where
    things are.
    """
    tokens = encoder(images, all_tokens=True)[:, 1:]
    b, n, d = tokens.shape
    h, w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    grid = tokens.transpose(1, 2).reshape(b, d, h, w)
    return grid_mean(grid, pool).flatten(1)

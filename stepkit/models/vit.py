"""A Vision Transformer: SDPA attention, stochastic depth, keep-indices, any input size.

Shapes follow the ViT/DeiT/DINO models (pre-norm blocks, class token,
learned position embeddings, truncated-normal init with std 0.02), so
the presets match the papers' parameter counts (ViT-S/16: 21.7M).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stepkit import check as _check
from stepkit.models.arguments import records_arguments

__all__ = ["INITS", "FFNS", "PRESETS", "DropPath", "Attention", "LayerScale", "SwiGLU", "swiglu_hidden",
           "Block", "rescale_residual_outputs", "sincos_pos_embed_2d", "VisionTransformer"]

PRESETS: dict[str, dict] = {
    "toy": dict(dim=64, depth=4, heads=4, patch_size=4),
    "tiny": dict(dim=192, depth=12, heads=3, patch_size=16),
    "small": dict(dim=384, depth=12, heads=6, patch_size=16),
    "base": dict(dim=768, depth=12, heads=12, patch_size=16),
    "large": dict(dim=1024, depth=24, heads=16, patch_size=16),  # ViT-L/16 (DINOv2's default)
    "huge": dict(dim=1280, depth=32, heads=16, patch_size=14),  # ViT-H/14 (I-JEPA's)
}


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability ``p`` (training only).

    Examples:
        >>> drop = DropPath(0.5).eval()
        >>> torch.equal(drop(torch.ones(2, 3)), torch.ones(2, 3))  # identity outside training
        True
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention with SDPA kernels (flash / memory-efficient where available).

    Examples:
        >>> Attention(16, heads=2)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels when available
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch, ``x * gamma`` (CaiT; DINOv2's ``init_values``).

    Starting ``gamma`` small (DINOv2: 1e-5) makes each block close to the identity at initialisation.

    Examples:
        >>> LayerScale(3, init=0.5)(torch.ones(1, 3))
        tensor([[0.5000, 0.5000, 0.5000]], grad_fn=<MulBackward0>)
    """

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: two thirds of the MLP's ``int(dim * mlp_ratio)``, rounded up to a multiple of 8.

    The gated unit has three weight matrices instead of two; two thirds keeps the parameter count of
    the plain MLP.

    Examples:
        >>> swiglu_hidden(384, 4.0), swiglu_hidden(1536, 4.0)  # ViT-S, ViT-g (DINOv2's giant)
        (1024, 4096)
    """
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """The gated feed-forward ``w3(silu(a) * b)`` with ``[a, b] = w12(x)`` split in halves (DINOv2's
    ``SwiGLUFFNFused``; Shazeer 2020).

    Examples:
        >>> SwiGLU(16, hidden=24)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


FFNS = ("mlp", "swiglu")
"""A block's feed-forward: ``mlp`` (Linear, GELU, Linear; ViT, DINO, I-JEPA) or ``swiglu`` (``SwiGLU`` of
width ``swiglu_hidden``; DINOv2's ViT-g)."""


class Block(nn.Module):
    """A pre-norm transformer block: attention and a feed-forward, each residual, with stochastic depth.

    ``layer_scale`` (an initial value) scales each branch by a learned ``LayerScale`` before it joins
    the residual stream (DINOv2); None leaves it out. ``ffn``: one of ``FFNS``.

    Examples:
        >>> Block(16, heads=2)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, *,
                 layer_scale: float | None = None, ffn: str = "mlp") -> None:
        super().__init__()
        _check.one_of("ffn", ffn, FFNS)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp: nn.Module = (nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                               if ffn == "mlp" else SwiGLU(dim, swiglu_hidden(dim, mlp_ratio)))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def residual_outputs(self) -> tuple[nn.Linear, nn.Linear]:
        """The two layers whose outputs join the residual stream: attention's projection, the
        feed-forward's last."""
        last = self.mlp.w3 if isinstance(self.mlp, SwiGLU) else cast(nn.Sequential, self.mlp)[2]
        return self.attn.proj, cast(nn.Linear, last)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings ``(h * w, dim)``, row-major (MAE, I-JEPA).

    The first ``dim / 2`` features encode the column, the last ``dim / 2`` the
    row, each as ``[sin(pos * f_k), cos(pos * f_k)]`` with
    ``f_k = 10000 ** (-k / (dim / 4))``, ``k = 0 .. dim / 4 - 1``.

    Examples:
        >>> pos = sincos_pos_embed_2d(8, 2, 3)
        >>> tuple(pos.shape), pos[0].tolist()[:2]  # position (0, 0): sin 0, then cos 0
        ((6, 8), [0.0, 0.0])
    """
    if dim % 4:
        _check.fail("dim", dim, "a multiple of 4 for 2-D sine-cosine position embeddings")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: Tensor) -> Tensor:
        angles = pos[:, None] * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    return torch.cat([encode(cols.flatten()), encode(rows.flatten())], dim=1).float()


@records_arguments
class VisionTransformer(nn.Module):
    """ViT with a class token; ``forward`` gives the class token's features, ``tokens`` all of them.

    ``img_size`` fixes the learned position grid; other input sizes (DINO's
    local crops) interpolate it bicubically. ``pos_embed="sincos"`` uses fixed
    2-D sine-cosine positions instead (I-JEPA's encoder; a buffer, computed
    exactly for any grid; the class token's position is zero). ``keep`` (``(B, K)`` patch
    indices) encodes only those patches (I-JEPA's context encoder); the
    position embeddings are added before the others are dropped.
    ``return_layers`` in ``tokens`` also returns the normed outputs of those
    blocks (hierarchical JEPA's targets). ``grad_checkpointing`` (also an
    attribute to set later) recomputes each block in the backward pass
    instead of keeping its activations: less memory, one more forward.
    ``class_token=False`` leaves the class token out (I-JEPA's encoder):
    ``tokens`` are the patches' alone and ``forward`` gives their mean.

    DINOv2's pieces, each off by default (the defaults are the ViT of DINO and I-JEPA, bit for bit):
    ``layer_scale`` (LayerScale's initial value, DINOv2: 1e-5), ``registers`` (extra learned tokens
    after the class token, without positions; ``tokens`` returns them between the class token and the
    patches, ``prefix`` counts both), ``mask_token`` (a learned token that replaces the patches
    ``mask`` marks before positions are added: iBOT's student), ``ffn="swiglu"``,
    ``drop_path_uniform`` (every block dropped at ``drop_path``, DINOv2's default, instead of rising
    linearly to it), ``pos_offset`` / ``pos_antialias`` (DINOv2's interpolation of the learned grid:
    scale factors ``(h + offset) / grid`` instead of the target size).

    Examples:
        >>> vit = VisionTransformer.preset("toy", img_size=16)
        >>> images, keep = torch.rand(2, 3, 16, 16), torch.tensor([[0, 5], [1, 2]])
        >>> vit(images).shape, vit(images, keep=keep, all_tokens=True).shape  # class token + 2 kept patches
        (torch.Size([2, 64]), torch.Size([2, 3, 64]))
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        pos_embed: str = "learned",
        grad_checkpointing: bool = False,
        class_token: bool = True,
        init: str = "stepkit",
        layer_scale: float | None = None,
        registers: int = 0,
        mask_token: bool = False,
        ffn: str = "mlp",
        drop_path_uniform: bool = False,
        pos_offset: float = 0.0,
        pos_antialias: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        _check.integer_at_least("patch_size", patch_size, 1)
        _check.one_of("pos_embed", pos_embed, ("learned", "sincos"))
        _check.one_of("init", init, INITS)
        if img_size % patch_size:
            _check.fail("img_size", img_size, f"a multiple of patch_size={patch_size}")
        if dim % heads:
            _check.fail("dim", dim, f"a multiple of heads={heads}")
        _check.in_range("drop_path", drop_path, 0.0, 1.0)
        _check.integer_at_least("registers", registers, 0)
        _check.one_of("ffn", ffn, FFNS)
        if not 0.0 <= pos_offset < 1.0:  # a whole patch or more would change the interpolated grid's size
            _check.fail("pos_offset", pos_offset, "in [0, 1) (DINOv2: 0.1)")
        self.patch_size, self.dim, self.grid = patch_size, dim, img_size // patch_size
        self.pos_offset, self.pos_antialias = pos_offset, pos_antialias
        if self.grid < 4:  # legal, and almost never meant: say so rather than train on a handful of tokens
            warnings.warn(f"ViT: patch_size={patch_size} on {img_size} px images gives {self.grid ** 2} "
                          f"token(s) ({self.grid} x {self.grid}); a smaller patch or larger images give "
                          "attention something to attend over", UserWarning, stacklevel=3)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_prefix = 1 if class_token else 0  # position rows before the patches' (the class token's)
        self.prefix = self.pos_prefix + registers  # tokens before the patches'
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.fixed_positions = pos_embed == "sincos"
        if self.fixed_positions:
            self.register_buffer("pos_embed", self._sincos(self.grid, self.grid))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_prefix + self.grid**2, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # deeper blocks dropped more often, or all alike (DINOv2)
        rates = [drop_path] * depth if drop_path_uniform else torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r, layer_scale=layer_scale, ffn=ffn)
                                    for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if class_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)  # leaves LayerScale at its initial value
        if init in ("dino", "dinov2"):  # PyTorch's Conv2d default for the patch embedding (as timm does)
            self.patch_embed.reset_parameters()
        if init == "dinov2":  # DINOv2: the class token and registers start near zero, std 1e-6
            for name in ("cls_token", "register_tokens"):
                if hasattr(self, name):
                    nn.init.normal_(getattr(self, name), std=1e-6)
        elif registers:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
        elif init == "ijepa":  # I-JEPA: std 0.02 there too, and the residual outputs scaled by depth
            nn.init.trunc_normal_(self.patch_embed.weight, std=0.02)
            rescale_residual_outputs(self.blocks)

    @classmethod
    def preset(cls, name: str, **overrides) -> VisionTransformer:
        """``toy`` (CPU), ``tiny``, ``small`` (ViT-S/16), ``base`` (ViT-B/16), ``huge`` (ViT-H/14); keywords
        override."""
        _check.one_of("preset", name, tuple(PRESETS))
        return cls(**{**PRESETS[name], **overrides})

    def _sincos(self, h: int, w: int) -> Tensor:
        return torch.cat([torch.zeros(self.pos_prefix, self.dim), sincos_pos_embed_2d(self.dim, h, w)])[None]

    def pos_embed_for(self, h: int, w: int) -> Tensor:
        """Position embeddings for an ``h x w`` patch grid (bicubic interpolation of the learned grid)."""
        if h == w == self.grid:
            return self.pos_embed
        if self.fixed_positions:
            return self._sincos(h, w).to(self.pos_embed)
        cls_pos, patch_pos = self.pos_embed[:, :self.pos_prefix], self.pos_embed[:, self.pos_prefix:]
        grid = patch_pos.reshape(1, self.grid, self.grid, self.dim).permute(0, 3, 1, 2)
        if self.pos_offset:  # DINOv2's scale factors (dino#8): the sampling grid, not only the size, moves
            scale = ((h + self.pos_offset) / self.grid, (w + self.pos_offset) / self.grid)
            grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic",
                                 antialias=self.pos_antialias)
        else:
            grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False,
                                 antialias=self.pos_antialias)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, self.dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Patch tokens ``(B, h * w, dim)``: the stride-``p`` convolution, computed as one matmul.

        Same weights and result as ``patch_embed(x).flatten(2).transpose(1, 2)``;
        on an H200 cuDNN ran that convolution with a slow implicit-GEMM kernel
        (about 5% of a ViT-S/16 DINO step), a plain matmul is the fast path.
        """
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)

    def tokens(
        self, x: Tensor, keep: Tensor | None = None, return_layers: tuple[int, ...] = (),
        mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Normed tokens ``(B, prefix + K, dim)``: the class token, the registers, then K = all patches or
        ``keep``'s. ``mask`` (``(B, h * w)``, True = masked) swaps those patches for the mask token."""
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of patch_size={self.patch_size}")
        patches = self.embed_patches(x)
        if mask is not None:
            if not hasattr(self, "mask_token"):
                raise ValueError("mask: this ViT has no mask token; build it with mask_token=True")
            if mask.shape != patches.shape[:2]:
                raise ValueError(f"mask: shape {tuple(mask.shape)}, expected {tuple(patches.shape[:2])} "
                                 "(batch, patches)")
            patches = torch.where(mask[..., None], self.mask_token.to(patches.dtype), patches)
        pos = self.pos_embed_for(h // self.patch_size, w // self.patch_size)
        patches = patches + pos[:, self.pos_prefix:]
        if keep is not None:
            patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, self.dim))
        front = [(self.cls_token + pos[:, :1]).expand(b, -1, -1)] if self.pos_prefix else []
        if hasattr(self, "register_tokens"):
            front.append(self.register_tokens.expand(b, -1, -1))
        out = torch.cat([*front, patches], dim=1) if front else patches
        layers = []
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            # Activation checkpointing: keep only each block's input, recompute the rest in backward
            # (RNG state replayed, so stochastic depth drops the same samples; same gradients).
            out = checkpoint(block, out, use_reentrant=False) if recompute else block(out)
            if i in return_layers:
                layers.append(self.norm(out))
        out = self.norm(out)
        return (out, layers) if return_layers else out

    def forward(
        self,
        x: Tensor,
        keep: Tensor | None = None,
        all_tokens: bool = False,
        return_layers: tuple[int, ...] = (),
        mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The class token's features ``(B, dim)`` (without one: the mean of the normed patch tokens);
        with ``all_tokens``, what ``tokens`` returns (through ``forward``, so FSDP2's hooks gather the
        parameters). With ``return_layers``, also the normed outputs of those blocks (0-based), as
        ``(out, layers)``. ``mask``: as in ``tokens``."""
        if return_layers:
            out, layers = self.tokens(x, keep=keep, return_layers=return_layers, mask=mask)
            return (out if all_tokens else self._pooled(out)), layers
        tokens = cast(Tensor, self.tokens(x, keep=keep, mask=mask))
        return tokens if all_tokens else self._pooled(tokens)

    def _pooled(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0] if self.pos_prefix else tokens[:, self.prefix:].mean(dim=1)


INITS = ("stepkit", "dino", "ijepa", "dinov2")
"""A ViT's initialisations: every Linear a truncated normal of std 0.02, LayerNorms 1 and 0, and
``stepkit``: the patch embedding a truncated normal of std 1/sqrt(fan-in); ``dino``: DINO's (and
timm's): the patch embedding at PyTorch's Conv2d default, uniform within +-1/sqrt(fan-in); ``ijepa``:
I-JEPA's: the patch embedding std 0.02 too, and each block's output projections divided by
sqrt(2 x its depth) (``rescale_residual_outputs``); ``dinov2``: DINO's, with the class token and
registers a normal of std 1e-6. Register tokens start as a truncated normal of std 0.02 otherwise."""


def rescale_residual_outputs(blocks: Iterable[nn.Module]) -> None:
    """Divide block ``l``'s (from 1) attention output and second MLP weights by ``sqrt(2 l)``, in place.

    I-JEPA's ``fix_init_weight``, for its encoders and predictor: deeper blocks add smaller updates to
    the residual stream at initialisation.

    Examples:
        >>> blocks = [Block(8, heads=2) for _ in range(2)]
        >>> before = blocks[1].mlp[2].weight.clone()
        >>> rescale_residual_outputs(blocks)
        >>> torch.allclose(blocks[1].mlp[2].weight, before / 2)  # block 2: sqrt(2 x 2)
        True
    """
    with torch.no_grad():
        for depth, block in enumerate(blocks, start=1):
            for layer in cast(Block, block).residual_outputs():
                layer.weight.div_(math.sqrt(2.0 * depth))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # the patch embedding, initialised like a linear layer
        fan_in = module.in_channels * math.prod(module.kernel_size)
        nn.init.trunc_normal_(module.weight, std=1.0 / math.sqrt(fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)

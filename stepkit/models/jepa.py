"""JEPA's pieces: I-JEPA's transformer predictor, CNN-JEPA's masked CNN and conv predictor, the targets."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.models.arguments import records_arguments
from stepkit.models.cnn import grid_mean
from stepkit.models.vit import (
    Block,
    VisionTransformer,
    _init_weights,
    rescale_residual_outputs,
    sincos_pos_embed_2d,
)
from stepkit.state import unwrap

__all__ = ["gather_tokens", "jepa_targets", "JEPAPredictor", "pooled_patches", "visible_grid",
           "MaskedBatchNorm2d", "MaskedCNN", "grid_mean_to", "ConvPredictor", "patch_tokens", "encoder_depth",
           "layer_dims", "JEPA"]


def gather_tokens(tokens: Tensor, idx: Tensor) -> Tensor:
    """``tokens`` ``(B, N, D)`` at ``idx`` ``(B, ...)`` -> ``(B, ..., D)``.

    Examples:
        >>> tokens = torch.arange(6.0).view(1, 3, 2)  # tokens [0, 1], [2, 3], [4, 5]
        >>> gather_tokens(tokens, torch.tensor([[2, 0]])).tolist()
        [[[4.0, 5.0], [0.0, 1.0]]]
    """
    b, d = tokens.shape[0], tokens.shape[-1]
    flat = idx.reshape(b, -1)
    out = torch.gather(tokens, 1, flat[..., None].expand(-1, -1, d))
    return out.reshape(*idx.shape, d)


def jepa_targets(tokens: Tensor, target_idx: Tensor) -> Tensor:
    """I-JEPA's regression targets: the target encoder's patch tokens, layer-normed over features
    (no affine), at the target blocks: ``(B, N, D)``, ``(B, M, K)`` -> ``(B, M, K, D)``.

    Examples:
        >>> targets = jepa_targets(torch.tensor([[[1.0, 3.0], [5.0, 5.0]]]), torch.tensor([[[0]]]))
        >>> targets.shape, [round(v, 3) for v in targets.flatten().tolist()]  # token 0, normed
        (torch.Size([1, 1, 1, 2]), [-1.0, 1.0])
    """
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
    ``pos_embed="learned"``. ``init="ijepa"`` divides each block's output
    projections by ``sqrt(2 x depth)``, as I-JEPA's predictor does.

    Examples:
        >>> pred = JEPAPredictor(16, enc_dim=8, dim=8, depth=1, heads=2)
        >>> context_idx, target_idx = torch.arange(5).repeat(2, 1), torch.tensor([[[10, 11]], [[12, 13]]])
        >>> out = pred(torch.randn(2, 5, 8), context_idx, target_idx)
        >>> tuple(out.shape)
        (2, 1, 2, 8)
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
        init: str = "stepkit",
    ) -> None:
        super().__init__()
        _check.integer_at_least("num_patches", num_patches, 1)
        _check.one_of("pos_embed", pos_embed, ("learned", "sincos"))
        _check.one_of("init", init, ("stepkit", "ijepa"))
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
        if init == "ijepa":  # I-JEPA's fix_init_weight, as in its encoders
            rescale_residual_outputs(self.blocks)

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


def pooled_patches(encoder: nn.Module, images: Tensor, pool: int, layers: int = 1) -> Tensor:
    """Frozen features of a JEPA encoder: patch tokens averaged over a ``pool x pool`` grid, flattened.

    ``(B, C, H, W)`` -> ``(B, layers * pool * pool * dim)``: the last
    ``layers`` blocks of a ViT (normed) or stages of a ``MaskedCNN``, each
    pooled, concatenated (I-JEPA's probes read the last layer, or the last 4
    concatenated). ``pool=1`` is the plain mean of the patch tokens, a larger
    pool keeps where things are.

    Examples:
        >>> net = MaskedCNN(img_size=8, widths=(4, 6), strides=(1, 2)).eval()
        >>> pooled_patches(net, torch.rand(3, 1, 8, 8), pool=2, layers=2).shape  # 2 layers x 2 x 2 x (4 + 6)
        torch.Size([3, 40])
    """
    depth = encoder_depth(encoder)
    _check.integer_at_least("layers", layers, 1)
    if layers > depth:
        _check.fail("layers", layers, f"at most the encoder's depth, {depth}")
    _, outputs = patch_tokens(encoder, images, layers=tuple(range(depth - layers, depth)))
    patch: int = unwrap(encoder).patch_size  # type: ignore[assignment]  # both encoders' int
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    pooled = []
    for tokens in outputs:
        b, _, d = tokens.shape
        pooled.append(grid_mean(tokens.transpose(1, 2).reshape(b, d, h, w), pool).flatten(1))
    return torch.cat(pooled, dim=1)


# --- Masked CNN encoder (CNN-JEPA) -------------------------------------------------------


def visible_grid(keep: Tensor, grid: tuple[int, int]) -> Tensor:
    """``keep`` ``(B, K)`` patch indices -> ``(B, 1, h, w)`` float mask, 1 at the kept patches, row-major.

    Examples:
        >>> visible_grid(torch.tensor([[0, 3]]), (2, 2)).flatten().tolist()
        [1.0, 0.0, 0.0, 1.0]
    """
    b = keep.shape[0]
    mask = torch.zeros(b, grid[0] * grid[1], device=keep.device)
    mask.scatter_(1, keep, 1.0)
    return mask.view(b, 1, *grid)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics count only the visible positions.

    ``forward(x, visible)``: in training with ``visible`` ``(B, 1, H, W)``
    (1 = visible), the mean and biased variance are taken over the visible
    positions only, ``mean_c = sum(v * x_c) / sum(v)``, and the running
    statistics follow them (unbiased variance, as BatchNorm); without
    ``visible``, or in eval mode, it is ``nn.BatchNorm2d``. So a context
    encoder that sees a quarter of the image keeps the statistics of
    whole images, which its EMA target then uses.

    Examples:
        >>> norm = MaskedBatchNorm2d(1, affine=False)
        >>> x = torch.tensor([[[[1.0, 3.0, 100.0]]]])
        >>> visible = torch.tensor([[[[1.0, 1.0, 0.0]]]])  # the 100 is masked: mean 2, var 1
        >>> [round(v, 3) for v in norm(x, visible)[0, 0, 0, :2].tolist()]
        [-1.0, 1.0]
    """

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        if visible is None or not self.training:
            return super().forward(x)
        dtype = x.dtype
        x = x.float()  # statistics in float32, as BatchNorm keeps them under autocast (a no-op for float32)
        v = visible.to(x.dtype)
        n = v.sum().clamp_min(2.0)  # a tensor: no host sync; fewer than 2 visible positions has no spread
        mean = (x * v).sum(dim=(0, 2, 3)) / n
        centred = x - mean[None, :, None, None]
        var = (centred.square() * v).sum(dim=(0, 2, 3)) / n
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean), m)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var), m)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(dtype)


@records_arguments
class MaskedCNN(nn.Module):
    """A convolutional JEPA encoder that sees only the context patches (CNN-JEPA, Kalapos & Gyires-Tóth 2024).

    Stages of 3x3 conv -> ``MaskedBatchNorm2d`` -> ReLU, stage ``i`` with
    ``widths[i]`` channels at stride ``strides[i]`` and dilation
    ``dilations[i]`` (default 1; dilated stages at the patch grid widen the
    receptive field at no cost: a token should see the whole object). With ``keep`` (patch
    indices of the ``grid`` of ``patch_size = prod(strides)`` pixel patches),
    the input and every stage's output are zeroed outside the kept patches,
    so nothing of a masked patch reaches the features: a kernel at the
    context's border reads zeros there (``MaskedBatchNorm2d`` counts only the
    kept positions). The last stage's resolution
    is the patch grid: ``forward`` returns its tokens ``(B, K, widths[-1])``
    (K = all patches, row-major, or ``keep``'s), like a ViT's patch tokens.
    ``return_layers`` (0-based stages) also returns those stages' outputs
    averaged onto the patch grid, ``(B, N, widths[i])`` each: the targets of
    hierarchical JEPA and the features of a last-stages probe.

    Examples:
        >>> net = MaskedCNN(img_size=8, widths=(4, 8), strides=(1, 2))  # a 4 x 4 grid of 2-pixel patches
        >>> net(torch.rand(2, 1, 8, 8), keep=torch.tensor([[0, 5], [1, 2]])).shape
        torch.Size([2, 2, 8])
    """

    def __init__(
        self,
        *,
        img_size: int = 32,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        strides: tuple[int, ...] = (1, 2, 2),
        dilations: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(strides) or not widths:
            _check.fail("strides", strides, f"one stride per stage, as widths={widths}")
        dilations = dilations or (1,) * len(widths)
        if len(dilations) != len(widths) or min(dilations) < 1:
            _check.fail("dilations", dilations, f"one dilation >= 1 per stage, as widths={widths}")
        for w in widths:
            _check.integer_at_least("widths", w, 1)
        for s in strides:
            _check.integer_at_least("strides", s, 1)
        self.patch_size = math.prod(strides)
        if img_size % self.patch_size:
            _check.fail("img_size", img_size, f"a multiple of the strides' product, {self.patch_size}")
        self.grid, self.dim, self.widths = img_size // self.patch_size, widths[-1], tuple(widths)
        self.strides = tuple(strides)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=s, padding=d, dilation=d, bias=False)
            for a, b, s, d in zip((in_chans, *widths[:-1]), widths, strides, dilations))
        self.norms = nn.ModuleList(MaskedBatchNorm2d(w) for w in widths)

    def forward(
        self, x: Tensor, keep: Tensor | None = None, return_layers: tuple[int, ...] = ()
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the encoder's patch size {p}")
        grid = (h // p, w // p)
        mask = None if keep is None else visible_grid(keep, grid)
        if mask is not None:
            x = x * F.interpolate(mask, size=(h, w), mode="nearest")
        layers = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x)
            visible = None if mask is None else F.interpolate(mask, size=x.shape[-2:], mode="nearest")
            x = F.relu(norm(x, visible))
            if visible is not None:
                x = x * visible
            if i in return_layers:
                layers.append(grid_mean_to(x, grid).flatten(2).transpose(1, 2))
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major like the patch indices
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        tokens = tokens.clone()  # a copy, not a view: FSDP2 hooks a module's output
        return (tokens, layers) if return_layers else tokens


def grid_mean_to(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Average ``(B, C, H, W)`` onto an ``h x w`` grid that divides it: ``(B, C, h, w)`` (reshape, mean).

    Examples:
        >>> grid_mean_to(torch.arange(4.0).view(1, 1, 2, 2), (1, 1)).item()
        1.5
    """
    b, c, h, w = x.shape
    gh, gw = grid
    return x.view(b, c, gh, h // gh, gw, w // gw).mean(dim=(3, 5))


class ConvPredictor(nn.Module):
    """CNN-JEPA's predictor: depthwise-separable convolutions over the patch grid, mask tokens where unseen.

    ``forward(context, context_idx, target_idx)`` takes what ``JEPAPredictor``
    takes: ``context`` ``(B, Kc, enc_dim)`` tokens at ``context_idx``, M target
    blocks ``target_idx`` ``(B, M, Kt)``. The context tokens (projected to
    ``dim``) are placed on the ``grid``, a learned mask token fills every other
    patch, a learned position embedding is added, then ``depth`` residual
    blocks of (depthwise ``kernel x kernel`` conv -> BatchNorm -> GELU ->
    1x1 conv) and a 1x1 conv to ``out_dim`` (default ``enc_dim``); all
    targets come from one pass, gathered to ``(B, M, Kt, out_dim)``.

    Examples:
        >>> pred = ConvPredictor(4, enc_dim=8, dim=8, depth=1)
        >>> context_idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
        >>> target_idx = torch.tensor([[[9, 10]], [[11, 12]]])
        >>> pred(torch.randn(2, 3, 8), context_idx, target_idx).shape
        torch.Size([2, 1, 2, 8])
    """

    def __init__(
        self,
        grid: int,
        enc_dim: int,
        dim: int = 128,
        depth: int = 3,
        kernel: int = 3,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check.integer_at_least("grid", grid, 1)
        _check.integer_at_least("depth", depth, 1)
        if kernel < 1 or kernel % 2 == 0:
            _check.fail("kernel", kernel, "an odd size >= 1")
        self.grid = grid
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False),
                          nn.BatchNorm2d(dim), nn.GELU(), nn.Conv2d(dim, dim, 1))
            for _ in range(depth))
        self.out = nn.Conv2d(dim, enc_dim if out_dim is None else out_dim, 1)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor) -> Tensor:
        b, kc, _ = context.shape
        n, dim = self.grid * self.grid, self.pos.shape[-1]
        x = self.mask_token.expand(b, n, dim).to(context.dtype)
        x = x.scatter(1, context_idx[..., None].expand(-1, -1, dim), self.embed(context))
        x = (x + self.pos).transpose(1, 2).reshape(b, dim, self.grid, self.grid)
        for block in self.blocks:
            x = x + block(x)
        out = self.out(x).flatten(2).transpose(1, 2)  # (B, N, out_dim)
        return gather_tokens(out, target_idx).clone()


def patch_tokens(
    encoder: nn.Module, images: Tensor, keep: Tensor | None = None, layers: tuple[int, ...] = ()
) -> tuple[Tensor, list[Tensor]]:
    """A JEPA encoder's patch tokens and its intermediate ones, for a ViT and a ``MaskedCNN`` alike.

    Returns ``(tokens, [layer tokens])``: ``tokens`` ``(B, K, dim)`` (all
    patches, or ``keep``'s) without a class token; one ``(B, N, dim_l)`` per
    entry of ``layers`` (0-based blocks of a ViT, normed; stages of a CNN).
    ``encoder`` may be wrapped in DDP / FSDP2 (called through ``forward``).

    Examples:
        >>> vit = VisionTransformer.preset("toy", img_size=16)  # 4 x 4 patches of 4 pixels
        >>> tokens, layers = patch_tokens(vit, torch.rand(2, 3, 16, 16), layers=(1,))
        >>> tuple(tokens.shape), tuple(layers[0].shape)  # no class token
        ((2, 16, 64), (2, 16, 64))
    """
    if isinstance(unwrap(encoder), VisionTransformer):
        out = encoder(images, keep=keep, all_tokens=True, return_layers=layers)
        tokens, extra = out if layers else (out, [])
        skip = unwrap(encoder).prefix  # the class token, when there is one
        return tokens[:, skip:], [t[:, skip:] for t in extra]
    out = encoder(images, keep=keep, return_layers=layers)
    return out if layers else (out, [])


def encoder_depth(encoder: nn.Module) -> int:
    """Blocks of a ViT, stages of a ``MaskedCNN`` (or of a sequence encoder): what ``layers=`` counts.

    Examples:
        >>> encoder_depth(MaskedCNN(widths=(8, 16, 32), strides=(1, 2, 2)))
        3
    """
    return len(_layer_widths(encoder))


def layer_dims(encoder: nn.Module, layers: tuple[int, ...]) -> list[int]:
    """The width of each of ``layers`` (0-based) of a ViT, a ``MaskedCNN`` or a sequence encoder.

    Examples:
        >>> layer_dims(MaskedCNN(widths=(8, 16, 32), strides=(1, 2, 2)), (0, 2))
        [8, 32]
    """
    widths = _layer_widths(encoder)
    return [widths[i] for i in layers]


def _layer_widths(encoder: nn.Module) -> tuple[int, ...]:
    encoder = unwrap(encoder)
    if isinstance(encoder, VisionTransformer):
        return (encoder.dim,) * len(encoder.blocks)
    widths = getattr(encoder, "widths", None)
    if not isinstance(widths, tuple):
        raise TypeError(f"expected a VisionTransformer, MaskedCNN or sequence encoder (with .widths), "
                        f"got {type(encoder).__name__}")
    return widths


class JEPA(nn.Module):
    """Context encoder + predictor (+ one linear head per level when there are several): what trains.

    ``forward(images, context_idx, target_idx)`` -> ``(predictions, pooled)``:
    one ``(B, M, Kt, dim_l)`` prediction per level, and the context tokens'
    mean ``(B, dim)`` (for the variance guard). With ``head_dims`` empty
    (one level, I-JEPA) the predictor's output is the prediction; with one
    width per level (hierarchical JEPA), each level's linear head reads it.

    Examples:
        >>> encoder = MaskedCNN(img_size=16, in_chans=1, widths=(8, 16), strides=(2, 2))
        >>> predictor = ConvPredictor(encoder.grid, encoder.dim, 8, 1, 3, out_dim=16)
        >>> context, targets = torch.arange(8)[None], torch.arange(8, 12).view(1, 1, 4)
        >>> preds, pooled = JEPA(encoder, predictor, [])(torch.rand(1, 1, 16, 16), context, targets)
        >>> [p.shape for p in preds], pooled.shape
        ([torch.Size([1, 1, 4, 16])], torch.Size([1, 16]))
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, head_dims: list[int]) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor
        out = cast(nn.Module, predictor.out)
        width = int(cast(int, out.out_channels if isinstance(predictor, ConvPredictor) else out.out_features))
        self.heads = nn.ModuleList(nn.Linear(width, d) for d in head_dims)  # empty: one level, no head

    def forward(self, images: Tensor, context_idx: Tensor,
                target_idx: Tensor) -> tuple[list[Tensor], Tensor]:
        context, _ = patch_tokens(self.encoder, images, keep=context_idx)
        return self.levels(self.predictor(context, context_idx, target_idx)), context.mean(dim=1)

    def levels(self, hidden: Tensor) -> list[Tensor]:
        """One prediction per level: the predictor's output itself, or each level's head on it."""
        return [head(hidden) for head in self.heads] if len(self.heads) else [hidden]

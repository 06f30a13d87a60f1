"""JEPA networks for 1-D token sequences: a masked temporal CNN (time series), a token transformer (text),
and a predictor that fills masked positions.

Every encoder here maps a sequence to one token per position, ``(B, L, dim)``,
and with ``return_layers`` (0-based) also those layers' outputs: what the
JEPA recipe's targets and probes read, as ``patch_tokens`` does for images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.models.arguments import records_arguments
from stepkit.models.jepa import JEPA, MaskedBatchNorm2d
from stepkit.models.text import masked_mean
from stepkit.models.vit import Block, _init_weights

__all__ = ["MaskedTemporalCNN", "TokenTransformer", "SequencePredictor", "sequence_tokens", "SequenceJEPA"]


@records_arguments
class MaskedTemporalCNN(nn.Module):
    """A temporal CNN that sees only the visible time steps: masked spans never reach its features.

    Stages of 1-D conv (``kernel`` wide, dilation ``dilations[i]``, stride 1)
    -> batch norm over the visible steps (``MaskedBatchNorm2d``) -> ReLU; the
    input and every stage's output are zeroed at masked steps, so a kernel
    at a span's border reads zeros there. One token per time step.

    Args:
        in_chans: Channels of the series (1 univariate, more multivariate).
        widths: Channels of each stage.
        kernel: Odd kernel size.
        dilations: Each stage's dilation (default 1 each); growing dilations
            give each step a wide view (receptive field ``1 + (kernel - 1) * sum(dilations)``).

    Raises:
        ValueError: for an even kernel, no stages, or dilations not one >= 1 per stage.

    Examples:
        >>> net = MaskedTemporalCNN(in_chans=2, widths=(8, 16), dilations=(1, 2))
        >>> x, visible = torch.randn(3, 2, 10), torch.ones(3, 10, dtype=torch.bool)
        >>> tokens, layers = net(x, visible, return_layers=(0,))
        >>> tuple(tokens.shape), tuple(layers[0].shape), net.receptive_field
        ((3, 10, 16), (3, 10, 8), 13)
    """

    def __init__(self, *, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128, 128),
                 kernel: int = 5, dilations: tuple[int, ...] | None = None) -> None:
        super().__init__()
        _check.integer_at_least("in_chans", in_chans, 1)
        if not widths:
            _check.fail("widths", widths, "at least one stage")
        if kernel < 1 or kernel % 2 == 0:
            _check.fail("kernel", kernel, "an odd size >= 1")
        dilations = dilations or (1,) * len(widths)
        if len(dilations) != len(widths) or min(dilations) < 1:
            _check.fail("dilations", dilations, f"one dilation >= 1 per stage, as widths={widths}")
        self.widths, self.dim = tuple(widths), widths[-1]
        self.receptive_field = 1 + (kernel - 1) * sum(dilations)
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, kernel, padding=d * (kernel // 2), dilation=d, bias=False)
            for a, b, d in zip((in_chans, *widths[:-1]), widths, dilations))
        self.norms = nn.ModuleList(MaskedBatchNorm2d(w) for w in widths)

    def forward(self, x: Tensor, visible: Tensor | None = None,
                return_layers: tuple[int, ...] = ()) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``x`` ``(B, C, L)``; ``visible`` ``(B, L)`` True where seen (None: all). Returns ``(B, L, dim)``,
        with ``return_layers`` also ``[(B, L, widths[i])]``."""
        m = None if visible is None else visible[:, None, :].to(x.dtype)
        if m is not None:
            x = x * m
        layers = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x)
            x = F.relu(norm(x[:, :, None], None if m is None else m[:, :, None])[:, :, 0])
            if m is not None:
                x = x * m
            if i in return_layers:
                layers.append(x.transpose(1, 2))
        tokens = x.transpose(1, 2).clone()  # a copy, not a view: FSDP2 hooks a module's output
        return (tokens, layers) if return_layers else tokens


@records_arguments
class TokenTransformer(nn.Module):
    """Token embeddings + learned positions + pre-norm transformer blocks: one feature per token.

    The JEPA text encoder (BERT-style masking happens in the input ids: the
    context encoder reads the corrupted ids, the target encoder the clean ones).

    Args:
        vocab_size: Token ids are in ``0..vocab_size - 1``.
        length: The longest sequence.
        dim: Width.
        depth: Transformer blocks.
        heads: Attention heads (``dim`` a multiple of them).

    Raises:
        ValueError: for ``dim`` not a multiple of ``heads``, or sizes below 1.

    Examples:
        >>> net = TokenTransformer(50, length=8, dim=16, depth=2, heads=2)
        >>> tuple(net(torch.randint(0, 50, (3, 8))).shape)
        (3, 8, 16)
    """

    def __init__(self, vocab_size: int, *, length: int, dim: int = 64, depth: int = 4,
                 heads: int = 4) -> None:
        super().__init__()
        _check.integer_at_least("vocab_size", vocab_size, 2)
        _check.integer_at_least("length", length, 1)
        _check.integer_at_least("depth", depth, 1)
        if dim < 1 or dim % heads:
            _check.fail("dim", dim, f"a positive multiple of heads={heads}")
        self.widths, self.dim, self.length = (dim,) * depth, dim, length
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        self.apply(_init_weights)

    def forward(self, ids: Tensor, visible: Tensor | None = None,
                return_layers: tuple[int, ...] = ()) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``ids`` ``(B, L)``, ``L <= length``; ``visible`` is ignored (masking is in the ids). Returns the
        normed last block ``(B, L, dim)``, with ``return_layers`` also those blocks' normed outputs."""
        if ids.shape[1] > self.length:
            raise ValueError(f"sequences of {ids.shape[1]} tokens: at most length={self.length}")
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        layers = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in return_layers:
                layers.append(self.norm(x))
        tokens = self.norm(x)
        return (tokens, layers) if return_layers else tokens


class SequencePredictor(nn.Module):
    """Context tokens, a learned mask token at every masked position, positions, transformer blocks ->
    a prediction at every position ``(B, L, out_dim)`` (the loss reads the masked ones).

    Args:
        length: The longest sequence.
        enc_dim: The context encoder's width.
        dim: The predictor's width (narrower than the encoder's, as in I-JEPA).
        depth: Transformer blocks.
        heads: Attention heads.
        out_dim: Output width (default ``enc_dim``; H-JEPA puts a head per level on top).

    Examples:
        >>> pred = SequencePredictor(8, enc_dim=16, dim=8, depth=1, heads=2)
        >>> masked = torch.zeros(2, 8, dtype=torch.bool)
        >>> tuple(pred(torch.randn(2, 8, 16), masked).shape)
        (2, 8, 16)
    """

    def __init__(self, length: int, enc_dim: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 out_dim: int | None = None) -> None:
        super().__init__()
        _check.integer_at_least("length", length, 1)
        if dim < 1 or dim % heads:
            _check.fail("predictor dim", dim, f"a positive multiple of heads={heads}")
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, enc_dim if out_dim is None else out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, masked: Tensor) -> Tensor:
        """``tokens`` ``(B, L, enc_dim)``, ``masked`` ``(B, L)`` True where to predict."""
        x = self.embed(tokens)
        x = torch.where(masked[..., None], self.mask_token.to(x.dtype).expand_as(x), x)
        x = x + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def sequence_tokens(encoder: nn.Module, x: Tensor, visible: Tensor | None = None,
                    layers: tuple[int, ...] = ()) -> tuple[Tensor, list[Tensor]]:
    """A sequence encoder's tokens and those of ``layers``: ``((B, L, dim), [(B, L, dim_l)])``.

    ``encoder`` may be wrapped in DDP / FSDP2 (called through ``forward``).

    Examples:
        >>> net = MaskedTemporalCNN(widths=(4, 8))
        >>> tokens, layers = sequence_tokens(net, torch.randn(2, 1, 12), layers=(0,))
        >>> tuple(tokens.shape), tuple(layers[0].shape)
        ((2, 12, 8), (2, 12, 4))
    """
    out = encoder(x, visible, return_layers=layers)
    return out if layers else (out, [])


class SequenceJEPA(JEPA):
    """``JEPA`` for sequences: ``forward(inputs, visible, masked)`` -> one ``(B, L, dim_l)`` prediction
    per level at every position (the loss reads the masked ones), and the visible tokens' mean.

    Examples:
        >>> encoder = TokenTransformer(vocab_size=10, length=4, dim=8, depth=1, heads=2)
        >>> predictor = SequencePredictor(4, 8, 8, 1, 2, out_dim=8)
        >>> ids, visible = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[True, True, False, False]])
        >>> preds, pooled = SequenceJEPA(encoder, predictor, [])(ids, visible, ~visible)
        >>> preds[0].shape, pooled.shape
        (torch.Size([1, 4, 8]), torch.Size([1, 8]))
    """

    def forward(self, inputs: Tensor, visible: Tensor, masked: Tensor) -> tuple[list[Tensor], Tensor]:
        tokens, _ = sequence_tokens(self.encoder, inputs, visible)
        return self.levels(self.predictor(tokens, masked)), masked_mean(tokens, visible)

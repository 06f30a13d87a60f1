"""An attentive probe: a learned query cross-attends over a frozen network's tokens, then a linear classifier.

A linear probe on mean-pooled patch tokens can sit near chance on features that a probe allowed to pick
its tokens reads well (ijepa#55); V-JEPA evaluates its frozen encoders with such a probe. Its pooler
here is V-JEPA's: one query token (initialised from N(0, 0.02)) and one cross-attention block, the
query attending to the layer-normed tokens through multi-head attention with a residual, then a
layer-normed MLP (4x) with a residual; a linear layer classifies the query's output. It is trained as
V-JEPA's image probe is (AdamW, weight decay 0.01, cross-entropy, the lr on a cosine to 0) for
``epochs`` passes over the frozen tokens of the labelled images (computed once). V-JEPA's lr, 1e-3, is
for ImageNet's hundreds of thousands of steps; at a few hundred it leaves the query unlearned (tested),
so the lr is chosen as the linear probe's C is: each of ``LRS`` fitted on 80 % of the training tokens
(a stratified, seeded split) and scored on the rest, the best refitted on all of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentivePooler", "AttentiveClassifier", "attentive_probe", "pad_tokens", "LRS"]

LRS = (1e-3, 3e-3, 1e-2)
"""The learning rates an attentive probe chooses from (V-JEPA's 1e-3 and two larger)."""


class AttentivePooler(nn.Module):
    """One learned query over ``(B, T, dim)`` tokens: ``q + attn(q, norm(x))``, then ``+ mlp(norm(.))``.

    Args:
        dim: The tokens' width.
        heads: Attention heads (``dim`` must divide by it).
        mlp_ratio: The MLP's hidden width over ``dim``.

    Examples:
        >>> pool = AttentivePooler(8, heads=2)
        >>> pool(torch.randn(3, 5, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        """The pooled ``(B, dim)``; ``padding`` ``(B, T)`` is True where a token is padding (not attended)."""
        q = self.query.expand(len(tokens), -1, -1)
        x = self.norm_tokens(tokens)
        q = q + self.attn(q, x, x, key_padding_mask=padding, need_weights=False)[0]
        q = q + self.mlp(self.norm_mlp(q))
        return q[:, 0]


class AttentiveClassifier(nn.Module):
    """``AttentivePooler`` then a linear classifier.

    Examples:
        >>> AttentiveClassifier(8, classes=3, heads=2)(torch.randn(2, 4, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, dim: int, classes: int, heads: int = 4) -> None:
        super().__init__()
        self.pool = AttentivePooler(dim, heads)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        return self.head(self.pool(tokens, padding))


def pad_tokens(items: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Token sets of different lengths ``[(T_i, dim)]`` as ``(N, max T, dim)`` zeros-padded, and the
    padding mask (True where padded).

    Examples:
        >>> tokens, padding = pad_tokens([torch.ones(2, 3), torch.ones(1, 3)])
        >>> tuple(tokens.shape), padding.tolist()
        ((2, 2, 3), [[False, False], [False, True]])
    """
    length = max(t.shape[0] for t in items)
    out = torch.zeros(len(items), length, items[0].shape[1], dtype=items[0].dtype)
    padding = torch.ones(len(items), length, dtype=torch.bool)
    for i, t in enumerate(items):
        out[i, : len(t)] = t
        padding[i, : len(t)] = False
    return out, padding


def attentive_probe(train_tokens: Tensor, train_labels: Tensor, test_tokens: Tensor, test_labels: Tensor, *,
                    train_padding: Tensor | None = None, test_padding: Tensor | None = None,
                    epochs: int = 20, batch_size: int = 64, lr: float | None = None,
                    weight_decay: float = 0.01, heads: int | None = None, seed: int = 0,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fit an ``AttentiveClassifier`` on frozen tokens, score it on held-out ones.

    Args:
        train_tokens: ``(N, T, dim)`` tokens of the labelled images (or items).
        train_labels: ``(N,)`` classes.
        test_tokens: ``(M, T', dim)`` held-out tokens.
        test_labels: ``(M,)`` classes.
        train_padding: ``(N, T)`` True where a token is padding (None: none is).
        test_padding: Likewise for the held-out tokens.
        epochs: Passes over the training tokens.
        batch_size: Items a step.
        lr: AdamW's peak learning rate (cosine to 0 over the run); None: the best of ``LRS`` on a
            validation split of the training tokens.
        weight_decay: AdamW's weight decay.
        heads: Attention heads (None: ``dim // 64`` or the largest divisor of ``dim`` up to 4).
        seed: Seeds the probe's initialisation and batch order (the global RNG untouched).
        device: Where it trains.

    Returns:
        ``{"acc": held-out accuracy, "train_acc": accuracy on the training tokens, "lr": the lr used}``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> tokens = torch.randn(60, 6, 8, generator=g); labels = (tokens[:, 2, 0] > 0).long()
        >>> tokens[:, 2, 0] += 3 * (2 * labels - 1)  # the answer: token 2, far from 0
        >>> fit = attentive_probe(tokens[:40], labels[:40], tokens[40:], labels[40:], lr=1e-2, heads=2)
        >>> fit["acc"] >= 0.8, fit["lr"]
        (True, 0.01)
    """
    if lr is None:
        from stepkit.evaluation import validation_split

        fit, val = validation_split(train_labels, 0.2, seed)
        pick = lambda rows, pad: pad[rows] if pad is not None else None  # noqa: E731
        scores = {rate: attentive_probe(train_tokens[fit], train_labels[fit], train_tokens[val],
                                        train_labels[val], train_padding=pick(fit, train_padding),
                                        test_padding=pick(val, train_padding), epochs=epochs,
                                        batch_size=batch_size, lr=rate, weight_decay=weight_decay,
                                        heads=heads, seed=seed, device=device)["acc"] for rate in LRS}
        lr = max(LRS, key=lambda rate: (scores[rate], -rate))  # ties: the smaller step
    dim = train_tokens.shape[-1]
    if heads is None:
        heads = dim // 64 if dim % 64 == 0 and dim >= 64 else max(h for h in (1, 2, 4) if dim % h == 0)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentiveClassifier(dim, classes, heads).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_tokens) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_tokens), generator=g)
        for rows in order.split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            pad = train_padding[rows].to(device) if train_padding is not None else None
            loss = F.cross_entropy(probe(train_tokens[rows].to(device).float(), pad),
                                   train_labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    probe.eval()

    @torch.no_grad()
    def accuracy(tokens: Tensor, labels: Tensor, padding: Tensor | None) -> float:
        hits = 0
        for start in range(0, len(tokens), 256):
            pad = padding[start:start + 256].to(device) if padding is not None else None
            logits = probe(tokens[start:start + 256].to(device).float(), pad)
            hits += int((logits.argmax(dim=1).cpu() == labels[start:start + 256]).sum())
        return hits / max(len(tokens), 1)

    return {"acc": accuracy(test_tokens, test_labels, test_padding),
            "train_acc": accuracy(train_tokens, train_labels, train_padding), "lr": lr}

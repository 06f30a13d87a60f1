"""A small convolutional backbone for CPU-sized runs (any input size, BatchNorm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint_sequential

from stepkit import check as _check
from stepkit.models.arguments import records_arguments

__all__ = ["SmallCNN", "grid_mean"]


@records_arguments
class SmallCNN(nn.Module):
    """Conv-norm-ReLU stages (the first at stride 1, the rest at stride 2), then average pooling.

    ``norm``: ``"batch"`` (BatchNorm), or ``"group"`` (GroupNorm, 8 groups),
    which keeps every row of a batch independent of the others, as gradient
    caching and per-chunk encoding need.

    ``forward(x)`` -> ``(B, widths[-1] * pool**2)``: adaptive average
    pooling to a ``pool x pool`` grid, flattened, so it takes DINO's global
    and local crops alike; ``pool > 1`` keeps a coarse spatial layout.
    ``grad_checkpointing``: in training, each stage recomputes its
    activations in the backward pass instead of storing them (less memory,
    about one more forward; the same gradients).

    Examples:
        >>> SmallCNN(in_chans=1, widths=(8, 16), pool=2)(torch.rand(3, 1, 16, 16)).shape  # 16 x 2 x 2
        torch.Size([3, 64])
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128), pool: int = 1,
                 norm: str = "batch", grad_checkpointing: bool = False) -> None:
        super().__init__()
        _check.one_of("norm", norm, ("batch", "group"))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((in_chans, *widths[:-1]), widths, strict=True)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(b) if norm == "batch" else nn.GroupNorm(min(8, b), b),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool, self.dim = pool, widths[-1] * pool * pool
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            features = checkpoint_sequential(self.features, len(self.features) // 3, x, use_reentrant=False)
        else:
            features = self.features(x)
        # a copy, not a view: FSDP2 cannot hook the backward of a module's view output safely
        return grid_mean(features, self.pool).flatten(1).clone()


def grid_mean(x: Tensor, grid: int) -> Tensor:
    """Average ``(B, C, H, W)`` over a ``grid x grid`` partition: ``(B, C, grid, grid)``.

    When the grid divides H and W this is a reshape and a mean, which is
    bit-reproducible on the CPU; ``adaptive_avg_pool2d`` (the fallback for
    other sizes) was not, and a resumed run must match the uninterrupted one.

    Examples:
        >>> grid_mean(torch.arange(16.0).view(1, 1, 4, 4), 2).flatten().tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    b, c, h, w = x.shape
    if h % grid or w % grid:
        return F.adaptive_avg_pool2d(x, grid)
    return x.view(b, c, grid, h // grid, grid, w // grid).mean(dim=(3, 5))

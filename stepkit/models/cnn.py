"""A small convolutional backbone for CPU-sized runs (any input size, BatchNorm)."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages (the first at stride 1, the rest at stride 2), then global average pooling.

    ``forward(x)`` -> ``(B, widths[-1] * pool**2)``: adaptive average
    pooling to a ``pool x pool`` grid, flattened, so it takes DINO's global
    and local crops alike; ``pool > 1`` keeps a coarse spatial layout.
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128), pool: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((in_chans, *widths[:-1]), widths, strict=True)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.dim = widths[-1] * pool * pool

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

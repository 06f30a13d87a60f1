"""Multimodal autoencoder whose bottleneck units are matched to fMRI voxels."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from stepkit.models.arguments import records_arguments

__all__ = ["TemporalEncoder", "MultimodalAutoencoder"]


class TemporalEncoder(nn.Module):
    """One modality's window ``(B, W, d)`` -> ``(B, hidden)``: a temporal conv, then a linear.

    Examples:
        >>> TemporalEncoder(dim=6, window=4, hidden=8, dropout=0.0)(torch.randn(2, 4, 6)).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, window: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, hidden, kernel_size=3, padding=1)
        self.proj = nn.Sequential(
            nn.GELU(), nn.Dropout(dropout), nn.Flatten(), nn.Linear(hidden * window, hidden)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.conv(x.transpose(1, 2)))


@records_arguments
class MultimodalAutoencoder(nn.Module):
    """Per-modality encoders -> fused bottleneck of ``voxels`` units -> per-modality decoders.

    ``forward(windows)`` takes ``{modality: (B, W, d)}`` and returns the
    bottleneck ``(B, voxels)``, which the loss matches to the measured voxel
    responses, and each modality's reconstructed window ``(B, W, d)``.

    Examples:
        >>> model = MultimodalAutoencoder({"video": 6, "audio": 3}, window=4, voxels=10, hidden=8)
        >>> fmri, recon = model({"video": torch.randn(2, 4, 6), "audio": torch.randn(2, 4, 3)})
        >>> fmri.shape, recon["audio"].shape
        (torch.Size([2, 10]), torch.Size([2, 4, 3]))
    """

    def __init__(
        self, dims: Mapping[str, int], *, window: int, voxels: int, hidden: int = 128, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.dims, self.window = dict(dims), window
        self.encoders = nn.ModuleDict(
            {m: TemporalEncoder(d, window, hidden, dropout) for m, d in dims.items()}
        )
        self.fuse = nn.Sequential(
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden * len(dims), hidden),
            nn.GELU(),
            nn.Linear(hidden, voxels),
        )
        self.decoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(voxels, hidden), nn.GELU(), nn.Linear(hidden, window * d))
                for m, d in dims.items()
            }
        )

    def forward(self, windows: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        missing = self.dims.keys() - windows.keys()
        if missing:
            raise ValueError(f"MultimodalAutoencoder: no input for {sorted(missing)}")
        hidden = torch.cat([self.encoders[m](windows[m]) for m in self.dims], dim=-1)
        bottleneck = self.fuse(hidden)
        recon = {m: dec(bottleneck).view(-1, self.window, self.dims[m]) for m, dec in self.decoders.items()}
        return bottleneck, recon

"""Losses, one module per family; each returns tensors and reads nothing on the host."""

from stepkit.losses.correlation import (
    correlation_loss,
    fmri_matching_loss,
    pearson_per_voxel,
    voxel_corr_summary,
)
from stepkit.losses.reconstruction import autoencoder_fmri_loss, weighted_mse

__all__ = [
    "autoencoder_fmri_loss",
    "correlation_loss",
    "fmri_matching_loss",
    "pearson_per_voxel",
    "voxel_corr_summary",
    "weighted_mse",
]

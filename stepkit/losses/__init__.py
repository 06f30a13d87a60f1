"""Losses, one module per family; each returns tensors and reads nothing on the host."""

from stepkit.losses.contrastive import (
    LogitBias,
    LogitScale,
    clip_loss,
    embedding_mse,
    info_nce,
    matryoshka_loss,
    siglip_loss,
    similarity_distillation_loss,
)
from stepkit.losses.correlation import (
    correlation_loss,
    fmri_matching_loss,
    pearson_per_voxel,
    voxel_corr_summary,
)
from stepkit.losses.dino import (
    DINOLossConfig,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax,
    teacher_temp_at,
    update_center,
    update_patch_center,
)
from stepkit.losses.jepa import (
    jepa_contrastive_loss,
    jepa_loss,
    multiscale_jepa_loss,
    variance_covariance_loss,
)
from stepkit.losses.reconstruction import autoencoder_fmri_loss, weighted_mse
from stepkit.losses.weighting import UncertaintyWeighting, fixed_weighting

__all__ = [
    "LogitBias",
    "LogitScale",
    "matryoshka_loss",
    "siglip_loss",
    "UncertaintyWeighting",
    "clip_loss",
    "DINOLossConfig",
    "dino_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "sinkhorn_knopp",
    "teacher_softmax",
    "teacher_temp_at",
    "update_center",
    "update_patch_center",
    "embedding_mse",
    "info_nce",
    "jepa_contrastive_loss",
    "jepa_loss",
    "multiscale_jepa_loss",
    "similarity_distillation_loss",
    "variance_covariance_loss",
    "autoencoder_fmri_loss",
    "correlation_loss",
    "fixed_weighting",
    "fmri_matching_loss",
    "pearson_per_voxel",
    "voxel_corr_summary",
    "weighted_mse",
]

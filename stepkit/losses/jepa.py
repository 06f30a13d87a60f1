"""Regularisers for masked latent prediction (JEPA): keep the context encoder's embeddings spread."""

from __future__ import annotations

import torch
from torch import Tensor

from stepkit import check as _check
from stepkit.step import at_least_float32


def variance_covariance_loss(z: Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """VICReg's variance and covariance terms of a batch of embeddings ``z`` ``(N, D)`` (C-JEPA's guard).

    With ``s_j = sqrt(Var(z_j) + eps)`` (unbiased variance over the batch) and
    ``C`` the batch covariance matrix::

        variance   = mean_j max(0, gamma - s_j)            # a hinge: each dimension keeps std >= gamma
        covariance = sum_{i != j} C_ij^2 / D               # decorrelated dimensions

    Returns both, to weight in the loss (VICReg: 25 and 1; C-JEPA uses the
    variance term on the context encoder's pooled embeddings). Rows of more
    than 2 dimensions are flattened to ``(-1, D)``. At least float32.
    """
    _check.at_least("gamma", gamma, 0.0)
    _check.at_least("eps", eps, 0.0)
    z = at_least_float32(z).reshape(-1, z.shape[-1])
    n, d = z.shape
    if n < 2:
        raise ValueError(f"variance_covariance_loss needs at least 2 rows to measure a spread, got {n}")
    centred = z - z.mean(dim=0)
    std = torch.sqrt(centred.square().sum(dim=0) / (n - 1) + eps)
    variance = torch.relu(gamma - std).mean()
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov.square().sum() - cov.diagonal().square().sum()
    return variance, off_diagonal / d

"""Tools around the loop: baselines and evaluations of frozen features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stepkit.losses.correlation import pearson_per_voxel

DEFAULT_ALPHAS = tuple(10.0**k for k in range(-2, 7))


@dataclass
class RidgeFit:
    """A ridge regression fitted by ``ridge_regression``: predict with ``fit(x)``."""

    weights: Tensor
    intercept: Tensor
    x_mean: Tensor
    x_scale: Tensor
    alpha: float
    val_corr: float
    """Mean per-column Pearson r on the validation set at the chosen ``alpha``."""

    def __call__(self, x: Tensor) -> Tensor:
        z = (x.to(self.weights.dtype) - self.x_mean) / self.x_scale
        return z @ self.weights + self.intercept


@torch.no_grad()
def ridge_regression(
    x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> RidgeFit:
    """Closed-form ridge from ``x`` to ``y`` (the encoding-model baseline), alpha chosen on validation.

    Features are standardised with training statistics and targets centred,
    then ``W(a) = V diag(s / (s^2 + a)) U^T y`` from one SVD ``x = U S V^T``
    gives every alpha's solution; the one with the highest mean validation
    Pearson r (per target column) wins. Computed in float64.
    """
    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas={list(alphas)!r} is not allowed: expected positive numbers")
    x, y = x_train.double(), y_train.double()
    x_mean, x_scale = x.mean(0), x.std(0).clamp_min(1e-8)
    y_mean = y.mean(0)
    u, s, vh = torch.linalg.svd((x - x_mean) / x_scale, full_matrices=False)
    uty = u.T @ (y - y_mean)
    z_val = (x_val.double() - x_mean) / x_scale
    best = None
    for alpha in alphas:
        w = vh.T @ ((s / (s.square() + alpha))[:, None] * uty)
        r = pearson_per_voxel(z_val @ w + y_mean, y_val.double()).mean().item()
        if best is None or r > best[0]:
            best = (r, alpha, w)
    r, alpha, w = best
    return RidgeFit(w, y_mean, x_mean, x_scale, float(alpha), r)

"""Pearson correlation per voxel over time: a loss for encoding models and their standard metric."""

from __future__ import annotations

import torch
from torch import Tensor

from stepkit import check as _check
from stepkit.step import at_least_float32

__all__ = ["pearson_per_voxel", "correlation_loss", "voxel_corr_summary", "fmri_matching_loss"]


def pearson_per_voxel(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson r between ``pred`` and ``target`` over time (dim 0), one value per voxel.

    ``r_v = sum_t (p_tv - mean p_v)(y_tv - mean y_v) / sqrt(sum_t (p - mean p)^2 * sum_t (y - mean y)^2)``.
    A voxel that is constant over time in either argument has r = 0 and a
    finite gradient (no NaN): the covariance is exactly 0, and the product
    of the two sums of squares is clamped to at least ``eps**2`` before the
    square root. Computed in at least float32.

    Args:
        pred: ``(T, V)`` predicted responses, time first.
        target: ``(T, V)`` measured responses.
        eps: The floor of the denominator's square root.

    Returns:
        ``(V,)`` correlations in [-1, 1].

    Examples:
        >>> t = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
        >>> pearson_per_voxel(t, torch.tensor([[0.0, 3.0], [2.0, 2.0], [4.0, 1.0]]))  # 2nd: constant pred
        tensor([1., 0.])
    """
    if pred.shape != target.shape or pred.ndim < 1:
        raise ValueError(f"pred and target must have the same shape, time first; got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    p = pred.to(dtype)
    y = target.to(dtype)
    p = p - p.mean(dim=0)
    y = y - y.mean(dim=0)
    cov = (p * y).sum(dim=0)
    # clamp before the root: sqrt'(0) is infinite, and a constant voxel must not turn gradients to NaN
    return cov / (p.square().sum(dim=0) * y.square().sum(dim=0)).clamp_min(eps * eps).sqrt()


def correlation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - mean_v r_v``: 0 for perfectly correlated voxels, 2 for anti-correlated; scale invariant.

    Args:
        pred: ``(T, V)`` predicted responses.
        target: ``(T, V)`` measured responses.

    Returns:
        A 0-d tensor.

    Examples:
        >>> t = torch.tensor([[0.0], [1.0], [2.0]])
        >>> correlation_loss(t, -t)
        tensor(2.)
    """
    return 1.0 - pearson_per_voxel(pred, target).mean()


def voxel_corr_summary(r: Tensor, threshold: float = 0.1, prefix: str = "voxel_corr") -> dict[str, Tensor]:
    """Mean, median and fraction of voxels with ``r > threshold`` (the field's usual report).

    Args:
        r: ``(V,)`` per-voxel correlations (``pearson_per_voxel``).
        threshold: The correlation a voxel must pass to count.
        prefix: The keys' prefix.

    Returns:
        ``{prefix: mean, prefix_median: median, prefix_frac_above: fraction}`` as 0-d tensors.

    Examples:
        >>> out = voxel_corr_summary(torch.tensor([0.0, 0.2, 0.4]))
        >>> [round(v.item(), 4) for v in out.values()]
        [0.2, 0.2, 0.6667]
    """
    _check.in_range("threshold", threshold, -1.0, 1.0)
    return {
        prefix: r.mean(),
        f"{prefix}_median": r.median(),
        f"{prefix}_frac_above_{threshold:g}": (r > threshold).to(r.dtype).mean(),
    }


def fmri_matching_loss(pred: Tensor, target: Tensor, kind: str = "correlation") -> Tensor:
    """Match predicted to measured voxel responses: ``"correlation"`` (1 - mean r) or ``"mse"``.

    Args:
        pred: ``(T, V)`` predicted responses.
        target: ``(T, V)`` measured responses.
        kind: ``"correlation"`` or ``"mse"``.

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: for another ``kind``.

    Examples:
        >>> t = torch.tensor([[0.0], [2.0]])
        >>> fmri_matching_loss(t, t + 1, kind="mse"), fmri_matching_loss(t, t + 1)
        (tensor(1.), tensor(0.))
    """
    _check.one_of("kind", kind, ("correlation", "mse"))
    if kind == "mse":
        return (at_least_float32(pred) - at_least_float32(target)).square().mean()
    return correlation_loss(pred, target)

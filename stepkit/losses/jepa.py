"""Regularisers for masked latent prediction (JEPA): keep the context encoder's embeddings spread."""

from __future__ import annotations

import torch
from torch import Tensor

from stepkit import check as _check
from stepkit.step import at_least_float32

__all__ = ["variance_covariance_loss", "jepa_loss", "jepa_contrastive_loss", "multiscale_jepa_loss"]


def variance_covariance_loss(z: Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """VICReg's variance and covariance terms of a batch of embeddings ``z`` ``(N, D)`` (C-JEPA's guard).

    With ``s_j = sqrt(Var(z_j) + eps)`` (unbiased variance over the batch) and
    ``C`` the batch covariance matrix::

        variance   = mean_j max(0, gamma - s_j)            # a hinge: each dimension keeps std >= gamma
        covariance = sum_{i != j} C_ij^2 / D               # decorrelated dimensions

    Returns both, to weight in the loss (VICReg: 25 and 1; C-JEPA uses the
    variance term on the context encoder's pooled embeddings). Rows of more
    than 2 dimensions are flattened to ``(-1, D)``. At least float32.

    Args:
        z: ``(N, D)`` embeddings, ``N >= 2`` (more dimensions are flattened).
        gamma: The std each dimension is kept above.
        eps: Added to the variance under the square root.

    Returns:
        ``(variance, covariance)``, two 0-d tensors.

    Raises:
        ValueError: for fewer than 2 rows or a negative ``gamma`` / ``eps``.

    Examples:
        >>> z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # std sqrt(2) > 1; the two dims fully correlated
        >>> [round(v.item(), 4) for v in variance_covariance_loss(z)]
        [0.0, 4.0]
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


def _check_masked(pred: Tensor, target: Tensor, mask: Tensor, name: str) -> Tensor:
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"{name}: pred and target must both be (B, N, D), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"{name}: mask must be (B, N) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(torch.bool)


def jepa_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked MSE: the squared error of predicted token features, averaged over the masked tokens only.

    With ``m_bn`` in {0, 1} (1 = masked, to be predicted)::

        loss = sum_{b,n} m_bn * mean_d (pred_bnd - target_bnd)^2 / sum_{b,n} m_bn

    (0 when nothing is masked). With every token masked it is
    ``F.mse_loss(pred, target)``. Targets are used as given: detach them
    (the EMA target encoder's output) before the call.

    Args:
        pred: ``(B, N, D)`` the predictor's output at every token.
        target: ``(B, N, D)`` the target encoder's features.
        mask: ``(B, N)`` bool or 0/1, True at the tokens the loss covers.

    Returns:
        A 0-d tensor, at least float32.

    Raises:
        ValueError: when the shapes do not match.

    Examples:
        >>> pred = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
        >>> target = torch.zeros(1, 2, 2)
        >>> jepa_loss(pred, target, torch.tensor([[True, False]]))  # only the first token counts
        tensor(1.)
    """
    m = _check_masked(pred, target, mask, "jepa_loss")
    per_token = (at_least_float32(pred) - at_least_float32(target)).square().mean(dim=-1)
    weights = m.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def jepa_contrastive_loss(
    pred: Tensor, target: Tensor, mask: Tensor, *, temperature: float = 0.1,
    negative_samples: int | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """InfoNCE between each masked token's prediction and its target, the other masked tokens' targets
    (of the same sample and of the others in the batch) as negatives.

    With the ``K`` masked tokens' predictions ``p_i`` and targets ``t_i``
    L2-normalised and ``s_ij = p_i . t_j / temperature``::

        loss = mean_i [ -s_ii + log sum_{j in {i} + N_i} exp(s_ij) ]

    where ``N_i`` is every other masked token (``negative_samples=None``), or
    ``negative_samples`` of them drawn uniformly without replacement for each
    ``i`` (with ``generator``; all of them when fewer are there).

    Args:
        pred: ``(B, N, D)`` predictions.
        target: ``(B, N, D)`` target features (detached by the caller).
        mask: ``(B, N)`` True at the tokens the loss covers.
        temperature: The softmax temperature, > 0.
        negative_samples: Negatives per token, at least 1, or None for all.
        generator: The draw of the negatives (``negative_samples`` only).

    Returns:
        A 0-d tensor, at least float32 (0 when fewer than 2 tokens are masked).

    Raises:
        ValueError: for mismatched shapes, a temperature <= 0 or ``negative_samples`` below 1.

    Examples:
        >>> pred = target = torch.eye(2)[None]  # two orthogonal tokens, each predicted exactly
        >>> loss = jepa_contrastive_loss(pred, target, torch.ones(1, 2, dtype=torch.bool), temperature=1.0)
        >>> round(loss.item(), 6)  # -1 + log(e + 1)
        0.313262
    """
    m = _check_masked(pred, target, mask, "jepa_contrastive_loss")
    if not temperature > 0:
        _check.fail("temperature", temperature, "a number > 0")
    if negative_samples is not None:
        _check.integer_at_least("negative_samples", negative_samples, 1)
    p = torch.nn.functional.normalize(at_least_float32(pred)[m], dim=-1)
    t = torch.nn.functional.normalize(at_least_float32(target)[m], dim=-1)
    k = len(p)
    if k < 2:
        return p.sum() * 0.0
    logits = p @ t.T / temperature  # (K, K): row i's positive on the diagonal
    if negative_samples is not None and negative_samples < k - 1:
        # keep the diagonal and negative_samples random other columns of each row
        scores = torch.rand(k, k, generator=generator).to(logits.device)
        scores.fill_diagonal_(-1.0)
        keep = scores.topk(negative_samples, dim=1).indices
        logits = torch.cat([logits.diagonal()[:, None], logits.gather(1, keep)], dim=1)
        return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def multiscale_jepa_loss(
    pred: Tensor, target: Tensor, mask: Tensor, *, scales: tuple[int, ...] = (1, 2, 4),
    weights: tuple[float, ...] = (1.0, 0.5, 0.25),
) -> Tensor:
    """``jepa_loss`` at several resolutions: predictions and targets average-pooled along the tokens.

    At scale ``s`` the tokens are averaged in windows of ``s`` (``avg_pool1d``
    with kernel = stride = ``s``, a last partial window dropped) and a window
    counts when any token in it is masked::

        loss = sum_k weights_k * jepa_loss(pool_s(pred), pool_s(target), maxpool_s(mask))

    Args:
        pred: ``(B, N, D)`` predictions at every token.
        target: ``(B, N, D)`` target features (detached by the caller).
        mask: ``(B, N)`` True at the tokens the loss covers.
        scales: Window sizes, each in 1..N.
        weights: One weight per scale, >= 0.

    Returns:
        A 0-d tensor, at least float32.

    Raises:
        ValueError: for mismatched shapes, a scale outside 1..N or weights not one per scale.

    Examples:
        >>> pred = torch.tensor([[[2.0], [0.0]]])
        >>> target = torch.zeros(1, 2, 1)
        >>> mask = torch.tensor([[True, False]])
        >>> multiscale_jepa_loss(pred, target, mask, scales=(1, 2), weights=(1.0, 0.5))  # 1 * 4 + 0.5 * 1
        tensor(4.5000)
    """
    m = _check_masked(pred, target, mask, "multiscale_jepa_loss")
    n = pred.shape[1]
    if len(weights) != len(scales) or not scales:
        _check.fail("weights", weights, f"one weight per scale (scales={scales})")
    for s in scales:
        if not isinstance(s, int) or not 1 <= s <= n:
            _check.fail("scales", scales, f"integers in 1..{n} (the number of tokens)")
    for w in weights:
        _check.at_least("weights", w, 0.0)
    p, t = at_least_float32(pred).transpose(1, 2), at_least_float32(target).transpose(1, 2)
    mf = m.to(p.dtype)[:, None]
    total = p.new_zeros(())
    for s, w in zip(scales, weights):
        pooled = [torch.nn.functional.avg_pool1d(x, s, s).transpose(1, 2) for x in (p, t)]
        windows = torch.nn.functional.max_pool1d(mf, s, s)[:, 0] > 0
        total = total + w * jepa_loss(pooled[0], pooled[1], windows)
    return total

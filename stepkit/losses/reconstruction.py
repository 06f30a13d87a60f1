"""Reconstruction losses for autoencoders over several modalities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch.nn.functional as F
from torch import Tensor

from stepkit.step import at_least_float32

__all__ = ["weighted_mse", "autoencoder_fmri_loss"]


def weighted_mse(
    recon: Mapping[str, Tensor], target: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_m w_m * mean((recon_m - target_m)^2)`` over the modalities named in ``weights``.

    Returns the weighted total and each modality's unweighted MSE
    (``recon_<m>``), so a log shows which modality is learned. A modality
    with weight 0 is still measured.

    Args:
        recon: Each modality's reconstruction.
        target: Each modality's input.
        weights: The weight of each modality the loss covers (at least one).

    Returns:
        ``(total, {"recon_<m>": MSE})``.

    Raises:
        ValueError: for no weights, or a weighted modality missing from ``recon`` or ``target``.

    Examples:
        >>> total, parts = weighted_mse({"a": torch.ones(2)}, {"a": torch.zeros(2)}, {"a": 0.5})
        >>> total, parts
        (tensor(0.5000), {'recon_a': tensor(1.)})
    """
    missing = [m for m in weights if m not in recon or m not in target]
    if missing:
        raise ValueError(f"weighted_mse: no reconstruction or target for {missing}; "
                         f"have {sorted(recon)} and {sorted(target)}")
    parts = {f"recon_{m}": F.mse_loss(at_least_float32(recon[m]), at_least_float32(target[m]))
             for m in weights}
    if not weights:
        raise ValueError("weighted_mse: weights is empty; name at least one modality")
    total = cast(Tensor, sum(w * parts[f"recon_{m}"] for m, w in weights.items()))
    return total, parts


def autoencoder_fmri_loss(
    recon: Mapping[str, Tensor],
    inputs: Mapping[str, Tensor],
    fmri_pred: Tensor,
    fmri: Tensor,
    *,
    recon_weights: Mapping[str, float],
    fmri_weight: float = 1.0,
    fmri_kind: str = "correlation",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``fmri_weight * match(fmri_pred, fmri) + sum_m w_m * MSE_m``; returns the total and each part.

    Parts: ``fmri`` (the matching term, unweighted), ``recon`` (the weighted
    reconstruction sum) and ``recon_<modality>`` for each modality.

    Args:
        recon: Each modality's reconstruction.
        inputs: Each modality's input.
        fmri_pred: ``(T, V)`` predicted voxel responses.
        fmri: ``(T, V)`` measured responses.
        recon_weights: The weight of each modality's reconstruction.
        fmri_weight: The weight of the matching term.
        fmri_kind: ``"correlation"`` or ``"mse"`` (``fmri_matching_loss``).

    Returns:
        ``(total, parts)``.

    Examples:
        >>> t = torch.tensor([[0.0], [1.0]])
        >>> total, parts = autoencoder_fmri_loss({"a": t}, {"a": t}, t, t, recon_weights={"a": 1.0})
        >>> total.item(), sorted(parts)
        (0.0, ['fmri', 'recon', 'recon_a'])
    """
    from stepkit.losses.correlation import fmri_matching_loss

    recon_total, parts = weighted_mse(recon, inputs, recon_weights)
    match = fmri_matching_loss(fmri_pred, fmri, fmri_kind)
    return fmri_weight * match + recon_total, {"fmri": match, "recon": recon_total, **parts}

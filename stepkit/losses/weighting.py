"""Combining several losses: fixed weights, or weights learned from each task's uncertainty."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.step import at_least_float32

__all__ = ["fixed_weighting", "UncertaintyWeighting"]


def fixed_weighting(
    losses: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_i w_i L_i``; returns the total and each loss (``loss_<name>``, unweighted).

    Args:
        losses: Each task's 0-d loss.
        weights: The weight of each task counted (at least one).

    Returns:
        ``(total, {"loss_<name>": loss})``.

    Raises:
        ValueError: for no weights, or a weighted task without a loss.

    Examples:
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
        >>> total, parts = fixed_weighting(losses, {"a": 0.5, "b": 2.0})
        >>> total
        tensor(7.)
    """
    missing = sorted(set(weights) - set(losses))
    if missing:
        raise ValueError(f"fixed_weighting: no loss named {missing}; have {sorted(losses)}")
    if not weights:
        raise ValueError("fixed_weighting: weights is empty; name at least one loss")
    total = cast(Tensor, sum(w * losses[name] for name, w in weights.items()))
    return total, {f"loss_{name}": losses[name].detach() for name in weights}


class UncertaintyWeighting(nn.Module):
    """Learned task weights from homoscedastic uncertainty (Kendall, Gal and Cipolla, CVPR 2018, eq. 7).

    With one learnable ``s_i = log sigma_i^2`` per task (initialised to 0)::

        total = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i

    A task with a large loss learns a large ``s_i`` and so a smaller weight
    ``0.5 * exp(-s_i)``; the ``0.5 * s_i`` term stops every weight from
    going to zero. Put its parameter in the optimizer with the model's (no
    weight decay). ``forward`` returns the total and, per task, the loss and
    its current weight.

    Args:
        tasks: The task names, distinct.

    Raises:
        ValueError: for repeated names, or (in ``forward``) a task without a loss.

    Examples:
        >>> weighting = UncertaintyWeighting(["a", "b"])
        >>> total, parts = weighting({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
        >>> total.item()  # 0.5 * 2 + 0.5 * 4 at s = 0
        3.0
    """

    def __init__(self, tasks: list[str] | tuple[str, ...]) -> None:
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            _check.fail("tasks", list(tasks), "distinct task names, at least one")
        self.tasks = tuple(tasks)
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise ValueError(f"UncertaintyWeighting: no loss for tasks {missing}; have {sorted(losses)}")
        stacked = torch.stack([at_least_float32(losses[t]) for t in self.tasks])
        precision = torch.exp(-self.log_var)
        total = (0.5 * precision * stacked + 0.5 * self.log_var).sum()
        parts = {}
        for i, task in enumerate(self.tasks):
            parts[f"loss_{task}"] = stacked[i].detach()
            parts[f"weight_{task}"] = 0.5 * precision[i].detach()
        return total, parts

"""What to watch while training: representation collapse, per-layer norms, memory.

The tensor-valued metrics stay on the device (no host sync); hand them to
``log`` and they are read once per log interval.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.state import unwrap
from stepkit.step import at_least_float32, grad_norm

__all__ = ["collapse_metrics", "singular_values", "mean_entropy", "layer_group", "norms_by_group",
           "system_metrics", "host_rss_bytes", "SavedActivations", "collapse_alarm", "CollapseWatch",
           "DistillationAlarm"]


def singular_values(z: Tensor) -> Tensor:
    """The singular values of a 2-d ``z`` (ascending), as the square roots of the eigenvalues of its
    smaller Gram matrix (``z zᵀ`` or ``zᵀ z``), in float64 (float32 on MPS).

    On a wide batch this is much cheaper than an SVD (DINO's 128 x 2,048 features on 2 CPU cores: about
    0.7 ms against 17 ms for ``torch.linalg.svdvals``) and agrees with it to float32 rounding for every
    value above ``1e-7`` of the largest; tinier ones come out as 0 or near it, which no spectrum
    statistic here (effective rank) can see.

    Examples:
        >>> [round(v, 4) for v in singular_values(torch.tensor([[3.0, 0.0], [0.0, 4.0]])).tolist()]
        [3.0, 4.0]
    """
    wide = z.to(torch.float32 if z.device.type == "mps" else torch.float64)
    gram = wide @ wide.T if z.shape[0] <= z.shape[1] else wide.T @ wide
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().to(z.dtype)


@torch.no_grad()
def collapse_metrics(embeddings: Tensor, prefix: str = "") -> dict[str, Tensor]:
    """Collapse indicators of a batch of embeddings (rows are samples, the last dim features).

    - ``std``: per-dimension standard deviation across the batch, averaged
      over dimensions (0 for a constant batch: complete collapse; about
      ``1/sqrt(d)`` for L2-normalised embeddings spread evenly);
    - ``norm``: mean L2 norm of the embeddings;
    - ``effective_rank``: ``exp(H(p))`` with ``p = s / sum(s)`` the normalised
      singular values of the (uncentered) batch matrix and ``H`` the entropy
      (Roy & Vetterli 2007; RankMe). A rank-k batch with equal singular
      values gives exactly k; dimensional collapse drives it towards 1.

    Args:
        embeddings: ``(N, D)`` (more dimensions are flattened to rows).
        prefix: The keys' prefix.

    Returns:
        ``{prefix + "std", prefix + "norm", prefix + "effective_rank"}`` as 0-d tensors.

    Examples:
        >>> m = collapse_metrics(torch.eye(3))
        >>> [round(v.item(), 4) for v in m.values()]  # 3 orthogonal rows: effective rank 3
        [0.5774, 1.0, 3.0]
        >>> [v.item() for v in collapse_metrics(torch.tensor([[1.0, float("inf")]])).values()]
        [nan, nan, nan]
    """
    z = at_least_float32(embeddings.detach()).reshape(-1, embeddings.shape[-1])
    # A diverged run's features are NaN or infinite, where the eigensolver raises: monitoring must not end
    # a run, so they get NaN metrics instead (chosen on the device, no host read).
    finite = torch.isfinite(z).all()
    safe = torch.where(finite, z, torch.zeros((), dtype=z.dtype, device=z.device))
    s = singular_values(safe)
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum()
    metrics = {
        f"{prefix}std": safe.std(dim=0, unbiased=z.shape[0] > 1).mean(),
        f"{prefix}norm": safe.norm(dim=-1).mean(),
        f"{prefix}effective_rank": entropy.exp(),
    }
    nan = torch.full((), float("nan"), dtype=z.dtype, device=z.device)
    return {k: torch.where(finite, v, nan) for k, v in metrics.items()}


def mean_entropy(probs: Tensor) -> Tensor:
    """The mean over rows of each distribution's entropy, ``-sum p log p`` (0 log 0 = 0), in nats.

    DINO's uniform collapse shows as the teacher's entropy near ``log K`` (``CollapseWatch``).

    Examples:
        >>> mean_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))  # log 2 and 0
        tensor(0.3466)
    """
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()


def layer_group(name: str, depth: int = 1) -> str:
    """A parameter name's group: its first ``depth`` dotted parts (``blocks.3.attn.qkv.weight``,
    depth 2 -> ``blocks.3``).

    Examples:
        >>> layer_group("blocks.3.attn.qkv.weight", depth=2)
        'blocks.3'
    """
    return ".".join(name.split(".")[:depth])


@torch.no_grad()
def norms_by_group(model: nn.Module, depth: int = 1) -> dict[str, Tensor]:
    """Gradient and weight L2 norms per layer group (``grad_norm/<group>``, ``weight_norm/<group>``).

    Call after the backward pass and before ``apply_update`` (which sets
    gradients to None). Multi-tensor kernels; nothing read on the host.

    Args:
        model: The module (DDP / compile wrappers are looked through).
        depth: Dotted name parts that make a group (``layer_group``).

    Returns:
        ``{"grad_norm/<group>": ..., "weight_norm/<group>": ...}`` as 0-d tensors.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> sorted(norms_by_group(model))  # no gradients yet: weights only
        ['weight_norm/0']
    """
    groups: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for name, param in unwrap(model).named_parameters():
        weights, grads = groups.setdefault(layer_group(name, depth), ([], []))
        weights.append(param.detach())
        if param.grad is not None:
            grads.append(param.grad)
    out: dict[str, Tensor] = {}
    for group, (weights, grads) in groups.items():
        out[f"weight_norm/{group}"] = grad_norm(weights)  # any tensors' global L2 norm
        if grads:
            out[f"grad_norm/{group}"] = grad_norm(grads)
    return out


def system_metrics(device: torch.device | str | None = None) -> dict[str, float]:
    """Host resident memory (``host_rss_gb``) and, on CUDA, allocated and peak device memory (GB).

    Examples:
        >>> sorted(system_metrics("cpu"))
        ['host_rss_gb']
    """
    out = {"host_rss_gb": host_rss_bytes() / 1e9}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["device_mem_gb"] = torch.cuda.memory_allocated(device) / 1e9
        out["device_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def host_rss_bytes() -> int:
    """This process's resident set size now (Linux), else its peak so far.

    Examples:
        >>> host_rss_bytes() > 0
        True
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _Saved:
    """A tensor saved for backward, counted while the autograd graph holds it."""

    __slots__ = ("tensor", "meter")

    def __init__(self, tensor: Tensor, meter: SavedActivations) -> None:
        self.tensor, self.meter = tensor, meter
        meter.current += tensor.numel() * tensor.element_size()
        meter.peak = max(meter.peak, meter.current)

    def __del__(self) -> None:
        if hasattr(self, "meter"):  # torch.compile's tracing may build one without __init__
            self.meter.current -= self.tensor.numel() * self.tensor.element_size()


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of tensors autograd keeps for the backward pass, now (``current``) and at most (``peak``).

    Activation memory on any device, the CPU included (where torch has no
    allocator statistics): a tensor counts from the forward op that saves it
    until its graph is freed. Parameters saved by an op count too; a tensor
    that two ops save counts twice. ``with SavedActivations() as meter: ...; meter.peak``.

    Examples:
        >>> layer = torch.nn.Linear(100, 100)
        >>> with SavedActivations() as meter:
        ...     out = torch.relu(layer(torch.randn(8, 100)))
        >>> meter.peak >= 8 * 100 * 4  # at least the linear layer's input, 4 bytes a float
        True
    """

    def __init__(self) -> None:
        self.current = self.peak = 0
        super().__init__(lambda t: _Saved(t, self), lambda saved: saved.tensor)

    def __enter__(self) -> SavedActivations:  # type: ignore[override]
        super().__enter__()
        return self


def collapse_alarm(
    history: Sequence[Mapping[str, float]],
    *,
    below: Mapping[str, float] | None = None,
    above: Mapping[str, float] | None = None,
    patience: int = 3,
) -> str | None:
    """A warning naming each metric that sat past its threshold for the last ``patience`` intervals.

    ``history``: logged records, oldest first (``read_history`` or the
    logger's returned means). ``below={"target_effective_rank": 2.0,
    "target_std": 0.01}`` flags a metric lower than its threshold in each of
    the last ``patience`` records that hold it; ``above`` flags one higher
    (DINO's uniform collapse: ``above={"teacher_entropy": 0.95 *
    math.log(out_dim)}``). Pure: the same history gives the same answer;
    None when nothing is flagged or fewer records hold the metric.

    Args:
        history: Logged records, oldest first.
        below: Metric -> the threshold it must stay above.
        above: Metric -> the threshold it must stay below.
        patience: Records in a row past a threshold before a warning.

    Returns:
        The warning, or None.

    Examples:
        >>> history = [{"target_std": 0.01}] * 3
        >>> collapse_alarm(history, below={"target_std": 0.05}, patience=3) is not None
        True
        >>> collapse_alarm(history[:2], below={"target_std": 0.05}, patience=3) is None
        True
    """
    _check.integer_at_least("patience", patience, 1)
    flagged = []
    for sign, limits in ((-1, below or {}), (1, above or {})):
        for name, limit in limits.items():
            values = [float(r[name]) for r in history if name in r][-patience:]
            if len(values) == patience and all(sign * (v - limit) > 0 for v in values):
                side = "below" if sign < 0 else "above"
                flagged.append(f"{name} {side} {limit:g} for {patience} intervals (last {values[-1]:.4g})")
    if not flagged:
        return None
    return "collapse warning: " + "; ".join(flagged)


class CollapseWatch:
    """``collapse_alarm`` over a run as it goes: feed it each log interval's means.

    ``watch(means)`` keeps the interval and returns a warning (a string naming
    each metric, as ``collapse_alarm`` words it) when the set of flagged
    metrics changes to a non-empty one, None otherwise, so a recipe prints
    each warning once; ``watch.last`` is the
    warning that holds now ("" when none), for the run's summary. The
    thresholds are ``collapse_alarm``'s ``below`` / ``above`` / ``patience``.

    In a loop: ``if means and (warning := watch(means)): print(warning)``.

    Examples:
        >>> watch = CollapseWatch(below={"target_std": 0.05}, patience=2)
        >>> watch({"target_std": 0.01}) is None, watch({"target_std": 0.01}) is not None, watch.last != ""
        (True, True, True)
    """

    def __init__(self, *, below: Mapping[str, float] | None = None, above: Mapping[str, float] | None = None,
                 patience: int = 3) -> None:
        _check.integer_at_least("patience", patience, 1)
        self.below, self.above, self.patience = dict(below or {}), dict(above or {}), patience
        self.history: list[Mapping[str, float]] = []
        self.last = ""

    def __call__(self, means: Mapping[str, float]) -> str | None:
        self.history.append(means)
        warning = collapse_alarm(self.history, below=self.below, above=self.above, patience=self.patience)
        warning = warning or ""
        flagged = re.sub(r" \(last [^)]*\)", "", warning)  # which metrics, not their latest values
        new = warning if warning and flagged != re.sub(r" \(last [^)]*\)", "", self.last) else None
        self.last = warning
        return new

    def report(self, means: Mapping[str, float] | None, log: Any, step: int) -> str | None:
        """After a logged interval (``means``, what ``log(...)`` returned; None between intervals): a
        new warning printed and written to ``log`` (kind ``alarm``), and returned.

        Examples:
            >>> import tempfile
            >>> from stepkit.log import LogConfig, Logger
            >>> log = Logger(tempfile.mkdtemp(), LogConfig(console=False))
            >>> watch = CollapseWatch(below={"std": 0.1}, patience=1)
            >>> watch.report(None, log, step=1) is None, watch.report({"std": 0.5}, log, step=2) is None
            (True, True)
            >>> watch.report({"std": 0.01}, log, step=3) is not None
            step 3: ...
            True
        """
        warning = self(means) if means else None
        if warning:
            print(f"step {step}: {warning}", flush=True)
            log.write({"collapse_warning": warning}, step, kind="alarm")
        return warning


@dataclass
class DistillationAlarm:
    """A collapse warning for self-distillation (DINO, iBOT; ``--alarm.*``), printed and logged, for its
    two collapses: every prototype alike (uniform), or features squeezed to a line (dimensional).

    ``watch(prototypes)`` is the ``CollapseWatch`` over ``teacher_entropy`` (above this fraction of
    log K) and ``feat_effective_rank`` (below ``min_effective_rank``).

    Examples:
        >>> watch = DistillationAlarm(patience=1).watch(prototypes=128)
        >>> round(watch.above["teacher_entropy"], 3), watch.below["feat_effective_rank"]
        (4.755, 1.5)
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True  # a warning only: it never changes the run

    max_entropy_fraction: float = 0.98
    """Uniform collapse: the teacher's entropy stays above this fraction of log(model.out_dim)..."""
    min_effective_rank: float = 1.5
    """...or dimensional collapse: the backbone features' effective rank stays below this..."""
    patience: int = 12
    """...for this many log intervals in a row (the first few hundred updates start near uniform)."""

    def __post_init__(self) -> None:
        _check.in_range("alarm.max_entropy_fraction", self.max_entropy_fraction, 0.0, 1.0)
        _check.integer_at_least("alarm.patience", self.patience, 1)

    def watch(self, prototypes: int) -> CollapseWatch:
        uniform = self.max_entropy_fraction * math.log(prototypes)  # log K: every prototype alike
        return CollapseWatch(above={"teacher_entropy": uniform},
                             below={"feat_effective_rank": self.min_effective_rank}, patience=self.patience)

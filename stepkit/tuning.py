"""Tuning before a run: the learning-rate range test, the largest batch that fits, a memory cap.

``tune`` is the entry point every recipe's ``--tune.*`` flags call.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from stepkit import check as _check

__all__ = ["LRRangeResult", "lr_range_test", "is_out_of_memory", "largest_batch_size", "MemoryCap",
           "TuneConfig", "tune"]

# --- LR range test -------------------------------------------------------------------------


@dataclass
class LRRangeResult:
    """What ``lr_range_test`` measured: one entry per step it ran.

    Examples:
        >>> from stepkit import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.0))
        >>> result = lr_range_test(lambda s, b: s.model(b).square().mean(), state,
        ...                        [torch.ones(4, 1)], min_lr=1e-3, max_lr=1e3, steps=7)
        >>> [round(lr, 6) for lr in result.lrs[:3]]  # 1e-3 * 10 ** i, until the loss blew up
        [0.001, 0.01, 0.1]
        >>> result.suggested_lr in result.lrs, len(result.losses) == len(result.smoothed)
        (True, True)
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    """Where the smoothed loss fell fastest per unit of log lr, before it blew up."""
    diverged_at: float | None
    """The lr at which the smoothed loss passed ``diverge_factor`` x its best (None: it never did)."""

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG of smoothed loss against lr (log x), the suggestion marked (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed")
        ax.axvline(self.suggested_lr, color="k", ls="--", label=f"suggested {self.suggested_lr:.2g}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
        low, span = min(self.smoothed), self.smoothed[0] - min(self.smoothed) + 1e-12
        ax.set_ylim(low - 0.05 * span, low + 1.5 * span)  # the useful range, not the blow-up
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)


def lr_range_test(
    loss_fn,
    state,
    batches: Iterable,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
    amp: str | None = None,
) -> LRRangeResult:
    """Train a copy of ``state`` with an lr growing exponentially from ``min_lr`` to ``max_lr``.

    Step ``i`` uses ``min_lr * (max_lr / min_lr) ** (i / (steps - 1))``. The
    loss is smoothed with a bias-corrected exponential average; the test
    stops once the smoothed loss exceeds ``diverge_factor`` times its best
    (or is not finite). The suggestion is the lr where the smoothed loss
    falls fastest against log lr, among the steps before that. ``state``
    itself, and the global RNGs, are left as they were. ``batches`` is
    cycled if it runs out.

    Examples:
        >>> from stepkit import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.0))
        >>> batches = iter([torch.ones(4, 1)] * 20)
        >>> result = lr_range_test(lambda s, b: s.model(b).square().mean(), state, batches, steps=10)
        >>> len(result.lrs) <= 10 and state.step == 0  # a copy trained: the state is untouched
        True
    """
    from stepkit.state import rng_state, set_rng_state
    from stepkit.step import accumulate, apply_update, forward_loss

    if not 0 < min_lr < max_lr:
        _check.fail("min_lr", min_lr, f"a number in (0, max_lr={max_lr})")
    _check.integer_at_least("steps", steps, 3)
    saved_rng = rng_state()
    trial = copy.deepcopy(state)
    iterator = iter(batches)
    lrs, losses, smoothed = [], [], []
    average, best, diverged_at = 0.0, math.inf, None
    try:
        for i in range(steps):
            lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                batch = next(iterator)
            loss, _ = forward_loss(loss_fn, trial, batch, amp=amp)
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged_at = lr
                break
            accumulate(trial, loss, every=1)
            apply_update(trial, lr=lr, skip_nonfinite=False)
            average = smoothing * average + (1 - smoothing) * value
            current = average / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(current)
            best = min(best, current)
            if current > diverge_factor * best:
                diverged_at = lr
                break
    finally:
        set_rng_state(saved_rng)
    if len(lrs) < 3:
        raise ValueError(f"lr range test diverged after {len(lrs)} steps: lower min_lr={min_lr}")
    log_lrs = [math.log(x) for x in lrs]
    # slope of the smoothed loss against log lr, by central differences
    slopes = [
        (smoothed[min(i + 1, len(lrs) - 1)] - smoothed[max(i - 1, 0)])
        / (log_lrs[min(i + 1, len(lrs) - 1)] - log_lrs[max(i - 1, 0)])
        for i in range(len(lrs))
    ]
    end = len(lrs) - 1 if diverged_at is not None else len(lrs)
    steepest = min(range(end), key=lambda i: slopes[i])
    return LRRangeResult(lrs, losses, smoothed, lrs[steepest], diverged_at)


# --- the largest batch that fits -----------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's (and ``MemoryCap``'s) out-of-memory error, or a RuntimeError that says so.

    Examples:
        >>> oom = RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        >>> is_out_of_memory(oom), is_out_of_memory(ValueError())
        (True, False)
    """
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def largest_batch_size(
    try_batch,
    *,
    state=None,
    start: int = 1,
    max_size: int = 1 << 16,
    is_oom=is_out_of_memory,
) -> int:
    """The largest batch size for which ``try_batch(size)`` runs without running out of memory.

    Doubles from ``start`` until a try fails (or ``max_size``), then binary
    searches between the last size that fit and the first that did not.
    With ``state`` (a ``TrainState``), its full state (weights, optimizer,
    counters, RNGs) is saved before the search and restored after every
    try, and its gradients cleared, so the search changes nothing. Errors
    other than out-of-memory propagate. Returns 0 when ``start`` does not fit.

    Examples:
        >>> def try_batch(size):
        ...     if size > 40:
        ...         raise torch.cuda.OutOfMemoryError("out of memory")
        >>> largest_batch_size(try_batch)
        40
    """
    _check.integer_at_least("start", start, 1)
    _check.integer_at_least("max_size", max_size, start)
    snapshot = copy.deepcopy(state.state_dict()) if state is not None else None

    def fits(size: int) -> bool:
        try:
            try_batch(size)
            return True
        except Exception as err:  # noqa: BLE001 - only out-of-memory is an answer; the rest re-raises
            if not is_oom(err):
                raise
            return False
        finally:
            if state is not None:
                state.load_state_dict(copy.deepcopy(snapshot))
                state.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None and good < max_size:
        size = min(good * 2, max_size)
        if fits(size):
            good = size
        else:
            bad = size
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


class MemoryCap(TorchDispatchMode):
    """A stand-in for a device's memory on the CPU: raise ``torch.cuda.OutOfMemoryError`` once the
    tensors allocated inside the ``with`` block add up to more than ``limit_bytes``.

    It counts the bytes of every tensor an operation returns that aliases
    none of its inputs (views and in-place results are free, as the op's
    schema says) and never subtracts frees: a cap on what one step
    allocates, which grows with the batch like device memory does.

    Examples:
        >>> with MemoryCap(1000):
        ...     small = torch.zeros(10)  # 40 bytes
        >>> try:
        ...     with MemoryCap(1000):
        ...         big = torch.zeros(1000)  # 4,000 bytes
        ... except torch.cuda.OutOfMemoryError:
        ...     print("out of memory")
        out of memory
    """

    def __init__(self, limit_bytes: int) -> None:
        super().__init__()
        self.limit_bytes, self.allocated = limit_bytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for t, spec in zip(outputs, func._schema.returns):
            if isinstance(t, Tensor) and spec.alias_info is None:
                self.allocated += t.numel() * t.element_size()
        if self.allocated > self.limit_bytes:
            raise torch.cuda.OutOfMemoryError(
                f"MemoryCap: {self.allocated} bytes allocated, over the cap of {self.limit_bytes}"
            )
        return out


# --- the tuning entry points every recipe exposes -----------------------------------------


@dataclass
class TuneConfig:
    """``--tune.find-lr`` / ``--tune.find-batch``: measure instead of training.

    Examples:
        >>> TuneConfig(find_lr=True).lr_steps
        100
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True
    """Every field may differ on --resume (a tuning run measures, it does not train)."""

    find_lr: bool = False
    """Run an LR range test on a copy of the model; write RUN_DIR/lr_range.png and tune.json, then stop."""
    find_batch: bool = False
    """Find the largest batch size that fits; write RUN_DIR/tune.json, then stop."""
    min_lr: float = 1e-7
    max_lr: float = 10.0
    lr_steps: int = 100
    max_batch: int = 1 << 14
    memory_cap_gb: float = 0.0
    """On the CPU, treat this many GB allocated in one step as out of memory (0: only real OOM)."""

    @property
    def measures(self) -> bool:
        """Whether this run measures (``find_lr`` or ``find_batch``) instead of training."""
        return self.find_lr or self.find_batch

    def __post_init__(self) -> None:
        _check.integer_at_least("lr_steps", self.lr_steps, 3)
        _check.integer_at_least("max_batch", self.max_batch, 1)
        _check.at_least("memory_cap_gb", self.memory_cap_gb, 0.0)


def tune(cfg: TuneConfig, run_dir, loss_fn, state, make_batch, *, batch_size: int, amp=None) -> dict:
    """Run what ``cfg`` asks for with a recipe's ``loss_fn`` and ``make_batch(size)``; write tune.json.

    ``--tune.find-lr``: ``lr_range_test`` on a copy of ``state`` (its
    result saved before the plot is drawn, so a missing matplotlib loses
    nothing); ``--tune.find-batch``: ``largest_batch_size``. It writes
    nothing else: the folder stays free for the training run.

    Args:
        cfg: What to measure.
        run_dir: Where ``tune.json`` (and ``lr_range.png``) go.
        loss_fn: The recipe's ``loss_fn(state, batch) -> loss``.
        state: The recipe's ``TrainState``; left as it was.
        make_batch: ``size -> batch``.
        batch_size: The batch size of the LR range test.
        amp: The recipe's autocast dtype (``"bf16"``, ``"fp16"``) or None.

    Returns:
        What was written to ``tune.json``: ``suggested_lr``, ``diverged_at``, ``lrs``, ``smoothed_loss``
        and / or ``largest_batch``.

    Examples:
        >>> import tempfile
        >>> from stepkit import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.0))
        >>> out = tune(TuneConfig(find_lr=True, lr_steps=5), tempfile.mkdtemp(),
        ...            lambda s, b: s.model(b).square().mean(), state, lambda n: torch.ones(n, 1),
        ...            batch_size=4)  # doctest: +ELLIPSIS
        suggested lr ... numbers in .../tune.json
        >>> sorted(out)
        ['diverged_at', 'lrs', 'smoothed_loss', 'suggested_lr']
    """
    import itertools
    import json

    from stepkit.step import accumulate, forward_loss

    out: dict = {}
    tune_json = Path(run_dir, "tune.json")
    if cfg.find_lr:
        result = lr_range_test(loss_fn, state, (make_batch(batch_size) for _ in itertools.count()),
                               min_lr=cfg.min_lr, max_lr=cfg.max_lr, steps=cfg.lr_steps, amp=amp)
        out.update(suggested_lr=result.suggested_lr, diverged_at=result.diverged_at,
                   lrs=result.lrs, smoothed_loss=result.smoothed)
        tune_json.write_text(json.dumps(out, indent=2) + "\n")  # before the plot, which may be missing
        try:
            where = f"plot in {result.plot(Path(run_dir) / 'lr_range.png')}"
        except ImportError:
            where = 'no plot: matplotlib is not installed (pip install "stepkit[plot]")'
        print(f"suggested lr {result.suggested_lr:.3g} (loss diverged at {result.diverged_at}); "
              f"{where}; numbers in {tune_json}")
    if cfg.find_batch:
        cap = int(cfg.memory_cap_gb * 1e9)

        def one_step(size: int) -> None:
            with MemoryCap(cap) if cap else contextlib.nullcontext():
                loss, _ = forward_loss(loss_fn, state, make_batch(size), amp=amp)
                accumulate(state, loss, every=1)

        out["largest_batch"] = largest_batch_size(one_step, state=state, max_size=cfg.max_batch)
        print(f"largest batch that fits: {out['largest_batch']}")
    tune_json.write_text(json.dumps(out, indent=2) + "\n")
    return out

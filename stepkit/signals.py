"""Stopping on a signal (preemption, Ctrl-C): finish the update, save, exit 75."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import torch

from stepkit import check as _check
from stepkit import dist

__all__ = ["EXIT_STOPPED", "StopSignals", "leave_stop_signals_to_main"]

EXIT_STOPPED = 75
"""The exit code of a run stopped by a signal after saving its checkpoint (``EX_TEMPFAIL``:
try again later). A job script requeues on it: ``python recipe.py ... --resume-or-start --resume;
[ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"``."""

class StopSignals:
    """Turn SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) into a request to stop after the current update.

    ::

        with StopSignals() as stop:
            while state.step < steps:
                ...                                  # one update
                if stop.requested():                 # every rank agrees (one tiny all-reduce)
                    break
        save_last(ckpt_dir, state)
        if stop.signal_name:
            log.close()
            stop.exit(state.step)                    # prints where and how to resume; exits 75

    The first signal only sets a flag, so the update in progress finishes and
    the loop saves ``last`` as usual (atomically, every rank, single-file and
    sharded formats alike). A second Ctrl-C restores the default handlers and
    raises ``KeyboardInterrupt`` at once (an atomic save it interrupts leaves
    the previous checkpoint whole); a repeated SIGTERM or SIGUSR1 changes
    nothing (a scheduler and torchrun may both send one). Under torch.distributed, ``requested()``
    is a collective: ranks share a MAX all-reduce of the flag over gloo (a
    CPU group is made for it under nccl), so when one rank is signalled every
    rank stops at the same update; call it at the same point on every rank,
    e.g. once per update, or less often with ``every``. ``enabled=False``
    (recipes: ``--no-stop-on-signal``) installs nothing. Handlers can only be
    set from the main thread; elsewhere it installs nothing either.

    Examples:
        >>> with StopSignals() as stop:
        ...     stop.requested()
        False
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, *, enabled: bool = True, every: int = 1) -> None:
        _check.integer_at_least("every", every, 1)
        self.enabled, self.every = enabled, every
        self.signal_name: str | None = None
        self._received: str | None = None
        self._previous: dict[int, Any] = {}
        self._calls = 0
        self._group = None

    def __enter__(self) -> StopSignals:
        if not self.enabled or not _on_main_thread():
            return self
        for name in self.SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        if dist.world_size() > 1 and torch.distributed.get_backend() != "gloo":
            self._group = torch.distributed.new_group(backend="gloo")
        return self

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if self._received is not None:
            if number == signal.SIGINT:  # Ctrl-C twice: the user wants out now
                self._restore()
                raise KeyboardInterrupt("second Ctrl-C")
            return  # a repeated SIGTERM (a scheduler and torchrun both send one): already stopping
        self._received = name
        print(f"\n{name} received: finishing the current update, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether the loop should stop now (True on every rank once any rank got a signal)."""
        self._calls += 1
        if self._calls % self.every:
            return False
        flag = self._received is not None
        if dist.world_size() > 1:
            t = torch.tensor([int(flag)], dtype=torch.int32)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
            flag = bool(t.item())
        if flag:
            self.signal_name = self._received or "a signal on another rank"
        return flag

    def exit(self, step: int, ckpt_dir: str | os.PathLike | None = None) -> None:
        """Say where the run stopped and how to continue it, leave the process group, exit 75."""
        import shlex

        if dist.is_main():
            args = sys.argv[1:]
            again = " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *args])
            if "--resume" not in args:
                again += " --resume"
            where = f" (checkpoint in {ckpt_dir})" if ckpt_dir is not None else ""
            print(f"stopped by {self.signal_name} at step {step}{where}; continue with the same command "
                  f"and --resume: {again}", file=sys.stderr, flush=True)
        # torchrun SIGTERMs the other workers as soon as one exits non-zero: the checkpoint is
        # saved, so let every rank finish its exit and report 75 rather than die of it.
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name) and _on_main_thread():
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        dist.shutdown()
        raise SystemExit(EXIT_STOPPED)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()

def leave_stop_signals_to_main(worker_id: int = 0) -> None:
    """Ignore SIGTERM, SIGUSR1 and SIGINT in this (DataLoader worker) process.

    SLURM's ``scancel``, ``timeout`` and a terminal's Ctrl-C signal the whole
    process group, worker processes included. A worker killed by it ends the
    main process's next batch in ``RuntimeError: DataLoader worker ... is
    killed by signal``, before ``StopSignals`` can finish the update and
    save. Ignoring them, the worker keeps loading until the main process,
    having saved, shuts it down. ``stepkit.data.seeded_loader`` passes it as
    the ``worker_init_fn``.

    Args:
        worker_id: The DataLoader's worker index (unused: the same in every worker).

    Examples:
        >>> saved = {n: signal.getsignal(getattr(signal, n)) for n in StopSignals.SIGNALS}
        >>> leave_stop_signals_to_main()  # what a DataLoader worker of seeded_loader runs first
        >>> signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        True
        >>> for name, handler in saved.items():  # this process is no worker: put them back
        ...     _ = signal.signal(getattr(signal, name), handler)
    """
    for name in StopSignals.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _on_main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()

"""How a run ends when something breaks: exit codes, and stopping a run whose updates stay non-finite.

A scheduler reads the exit code to decide what to do next:

====  =====================  ==============================================================
code  name                   what happened; what a job script should do
====  =====================  ==============================================================
0                            the run finished: ``summary.json`` holds its results
1                            bad input or a bug: one ``error:`` line says which flag or file;
                             a sample that cannot be read (``DataError``) or a loader that
                             stalled (``DataStalled``) too: fix the data, do not requeue
65    ``EXIT_DIVERGED``      ``--train.max-skipped`` updates in a row were non-finite: do not
                             requeue; lower the lr or resume from the checkpoint it names
74    ``EXIT_SAVE_FAILED``   a checkpoint could not be written (disk full, quota): free space,
                             then requeue with ``--resume``; the last good checkpoint is intact
75    ``EXIT_STOPPED``       stopped by SIGTERM / SIGUSR1 / Ctrl-C after saving: requeue with
                             ``--resume``
130                          a second Ctrl-C: stopped at once, checkpoints on disk as they were
====  =====================  ==============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stepkit import check as _check
from stepkit.signals import EXIT_STOPPED

__all__ = ["EXIT_DIVERGED", "EXIT_SAVE_FAILED", "EXIT_STOPPED", "DataError", "DataStalled", "Diverged",
           "NonFiniteWatch", "error_line"]

EXIT_DIVERGED = 65
"""A run stopped after ``--train.max-skipped`` non-finite updates in a row (``EX_DATAERR``): its
numbers broke, and running it again as it is breaks them again."""

EXIT_SAVE_FAILED = 74
"""A checkpoint could not be written (``EX_IOERR``): the disk is full or the folder unwritable."""


class Diverged(RuntimeError):
    """A run whose updates stayed non-finite: the message names the step, the first non-finite term
    and the checkpoint to go back to. ``stepkit.cli.run_main`` prints it and exits 65.

    Examples:
        >>> Diverged("step 40: the last 38 updates were all non-finite").exit_code
        65
    """

    exit_code = EXIT_DIVERGED


class DataError(ValueError):
    """A sample that could not be read while a loader was iterated (in a DataLoader worker or not): the
    message is the original error's own line, which names the file. ``stepkit.cli.run_main`` prints it and
    exits 1; under torchrun it also tells the agent's restarts not to run the same data again
    (``stepkit.dist.note_data_error``).

    Examples:
        >>> DataError("st/0002.tar: cut off or not a tar shard").exit_code
        1
    """

    exit_code = 1


class DataStalled(RuntimeError):
    """A loader that produced no batch for ``--data.timeout`` seconds: the message names the DataLoader
    workers it was waiting for (or, without workers, where the main process was). ``run_main`` prints it
    and exits 1.

    Examples:
        >>> DataStalled("no batch for 5 s: waiting for worker 1 (pid 42)").exit_code
        1
    """

    exit_code = 1


class NonFiniteWatch:
    """Count non-finite (skipped) updates in a row and note which logged term went non-finite first.

    ``update`` runs after every update and only queues work on the device
    (no host read): the updates ``apply_update`` skipped in a row, from the
    growth of ``state.skipped_steps``, and for every term the first step at
    which it was NaN or infinite. ``storm`` and ``first_nonfinite`` read them
    back (call them where the loop syncs anyway, e.g. when it logs).

    Args:
        max_skipped: How many skipped updates in a row make a storm (0: never).
        state: The run's ``TrainState``, as the loop starts (resumed already): its skipped count so far.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> from stepkit.state import TrainState
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> watch = NonFiniteWatch(max_skipped=2, state=state)
        >>> for state.step, loss in enumerate([1.0, float("nan"), float("nan")], start=1):
        ...     state.skipped_steps += not math.isfinite(loss)   # what apply_update counts
        ...     watch.update(state, {"loss": torch.tensor(loss), "lr": 0.1})
        >>> watch.storm(), watch.first_nonfinite()
        (True, (2, ['loss']))
    """

    def __init__(self, max_skipped: int, state: Any) -> None:
        _check.integer_at_least("max_skipped", max_skipped, 0)
        self.max_skipped = max_skipped
        self._seen = state.skipped_steps.detach().clone()  # the count at the last update
        self._in_a_row = torch.zeros_like(self._seen)
        self._names: list[str] = []
        self._first: Tensor | None = None  # per term: the first step it was non-finite, -1 while never
        self._host_first: dict[str, int] = {}  # terms given as Python numbers, checked on the host
        self.reported = False  # whether the first non-finite term was printed (stop_if_diverged)

    @torch.no_grad()
    def update(self, state: Any, terms: Mapping[str, Any]) -> None:
        """After an update: count it if it was skipped; note the terms that are not finite now.

        Args:
            state: The run's ``TrainState`` (its ``step`` and ``skipped_steps``).
            terms: The values the loop logs (tensors or numbers); strings and bools are ignored.
        """
        skipped = state.skipped_steps.detach()
        now = (skipped - self._seen).clamp(0, 1)
        self._in_a_row = (self._in_a_row + now) * now
        self._seen.copy_(skipped)
        tensors = {k: v for k, v in terms.items() if isinstance(v, Tensor)}
        for name, value in terms.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                self._host_first.setdefault(name, state.step)
        if not tensors:
            return
        if list(tensors) != self._names:
            self._rekey(list(tensors), skipped.device)
        # .to: a term computed on another device (the CPU) joins the rest without a host read
        finite = torch.stack([torch.isfinite(v.detach()).all().to(skipped.device) for v in tensors.values()])
        assert self._first is not None
        self._first = torch.where((self._first < 0) & ~finite,
                                  torch.full_like(self._first, state.step), self._first)

    def _rekey(self, names: list[str], device: torch.device) -> None:
        old = dict(zip(self._names, self._first.tolist())) if self._first is not None else {}
        self._names = names
        self._first = torch.tensor([old.get(n, -1) for n in names], dtype=torch.long, device=device)

    def in_a_row(self) -> int:
        """How many of the latest updates were skipped in a row (a host read)."""
        return int(self._in_a_row)

    def storm(self) -> bool:
        """Whether at least ``max_skipped`` updates in a row were skipped (never with ``max_skipped`` 0)."""
        return self.max_skipped > 0 and self.in_a_row() >= self.max_skipped

    def first_nonfinite(self) -> tuple[int, list[str]] | None:
        """``(step, terms)``: the first step at which a term was NaN or infinite and every term that was;
        None while all were finite."""
        firsts = dict(self._host_first)
        if self._first is not None:
            firsts.update({n: s for n, s in zip(self._names, self._first.tolist()) if s >= 0})
        if not firsts:
            return None
        step = min(firsts.values())
        return step, [n for n, s in firsts.items() if s == step]

    def summary(self, state: Any) -> dict[str, Any]:
        """``skipped_steps`` and ``first_nonfinite`` (``{"step", "terms"}`` or None) for ``summary.json``."""
        first = self.first_nonfinite()
        return {"skipped_steps": int(state.skipped_steps),
                "first_nonfinite": {"step": first[0], "terms": first[1]} if first else None}


def error_line(err: BaseException) -> str:
    """The error's own message: a DataLoader worker's error arrives wrapped in its traceback text.

    Examples:
        >>> error_line(ValueError("Caught ValueError in DataLoader worker process 0.\\n"
        ...                       "Original Traceback (most recent call last):\\n  ...\\n"
        ...                       "ValueError: a.png: not a readable image"))
        'a.png: not a readable image'
    """
    message = str(err)
    if "Original Traceback" in message:  # "Caught X in DataLoader worker ... Original Traceback ... X: msg"
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message

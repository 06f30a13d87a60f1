"""DataLoaders whose failures end the run: a worker's error in one line, a stalled loader timed out, the
workers reaped on every way out.

The recipes' workers ignore SIGTERM, SIGUSR1 and SIGINT (``stepkit.signals.leave_stop_signals_to_main``:
a scheduler signals the whole process group, and the main process must save before they go). That
also makes them deaf to the ``terminate()`` of torch's own shutdown and of ``multiprocessing``'s exit
hook, which then waits for them forever: a run that met an unreadable sample printed its error and
never exited. So the iterators of ``WatchedLoader`` (what ``seeded_loader`` builds) end their workers
with SIGKILL themselves, when a batch fails, when the loader stalls, and, for loaders still alive when
the process exits, from an exit hook that runs before ``multiprocessing``'s. Workers only read, so
nothing they hold is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from stepkit.faults import DataError, DataStalled, error_line
from stepkit.seeds import torch_generator

__all__ = ["WatchedLoader", "seeded_loader", "end_workers", "end_loader_workers"]

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # this process's iterators that started workers
_reaper_registered = False
_STACK_SIGNAL = getattr(signal, "SIGUSR2", None)  # a worker asked where it is writes its stack to a file
_stacks_dir: str | None = None  # this process's folder of those files (removed at exit)


class WatchedLoader(DataLoader):
    """A ``DataLoader`` whose iterators end the run cleanly when the data fails.

    Its iterator is torch's own, wrapped: a ``ValueError`` or ``OSError``
    while a batch is loaded (an unreadable image, a cut-off shard, in a
    worker or in the main process) becomes ``stepkit.faults.DataError`` with
    the original one-line message; no batch within ``timeout`` seconds
    becomes ``stepkit.faults.DataStalled``, naming the workers it waited for
    and the line each was at (asked with SIGUSR2, which makes a worker write
    its stack, ``faulthandler``), or, without workers, the line the main
    process was at. Either way the workers are ended first (SIGKILL: they
    ignore SIGTERM), so the error's exit is prompt, and so is any other exit
    (an exit hook ends the workers of iterators still alive). The timeout is
    a ``SIGALRM`` timer armed around each batch on the main thread
    (elsewhere: no timeout); the DataLoader's own ``timeout`` is left at 0.

    Args:
        *args: ``DataLoader``'s.
        timeout: Seconds to wait for one batch before ``DataStalled`` (0: wait forever).
        **kwargs: ``DataLoader``'s.

    Examples:
        >>> class Broken(torch.utils.data.Dataset):
        ...     def __len__(self):
        ...         return 4
        ...     def __getitem__(self, i):
        ...         raise OSError(f"sample {i}: cannot be read")
        >>> try:
        ...     next(iter(WatchedLoader(Broken(), batch_size=2)))
        ... except DataError as err:
        ...     print(err)
        sample 0: cannot be read
    """

    def __init__(self, *args: Any, timeout: float = 0, **kwargs: Any) -> None:
        if not 0 <= timeout < float("inf"):  # NaN too; infinity overflows the timer: 0 waits forever
            raise ValueError(f"data.timeout={timeout} is not allowed: expected seconds >= 0 (0: forever)")
        if kwargs.get("num_workers", 0) and _STACK_SIGNAL is not None:
            kwargs["worker_init_fn"] = _Chained(_StackOnSignal(_stack_folder()), kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)
        self.stall_timeout = float(timeout)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # torch's iterator, wrapped
        return _WatchedIterator(super().__iter__(), self.stall_timeout)

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _ReapedIterator(self)


class _ReapedIterator(_MultiProcessingDataLoaderIter):
    """Torch's multi-worker iterator, whose workers are killed when it is collected.

    Torch's own ``__del__`` asks them to leave through their index queues, then
    ``terminate()``s the rest. An iterator collected in a reference cycle has had
    those queues' feeder threads closed by their finalizers first, so the
    request never arrives, and ``terminate()`` cannot end workers that ignore
    SIGTERM: the collection took 20 s, and the workers outlived it, holding the
    process's exit forever.
    """

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit modules may be gone
            end_workers(self)


class _WatchedIterator:
    def __init__(self, inner: Any, timeout: float) -> None:
        self._inner, self._timeout = inner, timeout
        if getattr(inner, "_workers", None):
            _track(inner)

    def __iter__(self) -> _WatchedIterator:
        return self

    def close(self) -> None:
        """End the workers now (``end_workers``): a loop that stops early need not wait for collection."""
        end_workers(self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def __next__(self) -> Any:
        try:
            with _stall_alarm(self._timeout):
                return next(self._inner)
        except _Stalled as stall:
            message = _stall_message(self._inner, self._timeout, stall.frame)
            end_workers(self._inner)
            raise DataStalled(message) from None
        except DataError:
            end_workers(self._inner)
            raise
        except (ValueError, OSError) as err:
            end_workers(self._inner)
            raise DataError(error_line(err)) from err


class _Stalled(BaseException):
    """Raised by the alarm into whatever the main thread was doing (BaseException: a dataset's own
    ``except Exception`` does not swallow it)."""

    def __init__(self, frame: Any) -> None:
        super().__init__()
        self.frame = frame


@contextlib.contextmanager
def _stall_alarm(seconds: float) -> Iterator[None]:
    on_main = threading.current_thread() is threading.main_thread()
    if seconds <= 0 or not on_main or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(number: int, frame: Any) -> None:
        raise _Stalled(frame)

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stall_message(inner: Any, timeout: float, frame: Any) -> str:
    said = f"no batch for {timeout:g} s (--data.timeout)"
    then = ("; if the storage was only slow, raise --data.timeout; continue from the last checkpoint with "
            "--resume")
    workers = getattr(inner, "_workers", None)
    if not workers:
        where = "an unknown place"
        while frame is not None:  # the innermost frame outside this module
            if frame.f_code.co_filename != __file__:
                where = _where(frame)
                break
            frame = frame.f_back
        return f"{said}: the main process (no DataLoader workers) was still loading it, at {where}{then}"
    task = getattr(inner, "_task_info", {}).get(getattr(inner, "_rcvd_idx", -1), ())
    ids = [task[0]] if len(task) == 1 else sorted({t[0] for t in inner._task_info.values() if len(t) == 1})
    stuck = ", ".join(f"worker {i} (pid {workers[i].pid}{_worker_place(workers[i].pid)})" for i in ids)
    return f"{said}: the DataLoader waited for {stuck or 'its workers'}; every worker was stopped{then}"


def _where(frame: Any) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"


def _worker_place(pid: int) -> str:
    """", at FILE:LINE (FUNCTION)": where worker ``pid`` is, from the stack it writes on SIGUSR2 ("" if
    it does not answer within a second)."""
    if _STACK_SIGNAL is None or _stacks_dir is None:
        return ""
    path = os.path.join(_stacks_dir, f"{pid}.stack")
    with contextlib.suppress(OSError):
        os.kill(pid, _STACK_SIGNAL)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            # faulthandler writes the innermost frame first: '  File "x.py", line 8 in read'
            with open(path) as written:
                found = re.search(r'File "(.*)", line (\d+) in (\S+)', written.read())
            if found:
                return f", at {found[1]}:{found[2]} ({found[3]})"
            time.sleep(0.02)
    return ""


class _StackOnSignal:
    """A worker_init_fn: on SIGUSR2 the worker writes its stack to ``<folder>/<pid>.stack``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        global _stack_file
        _stack_file = open(os.path.join(self.folder, f"{os.getpid()}.stack"), "w")  # open while it lives
        faulthandler.register(signal.SIGUSR2, file=_stack_file, all_threads=False)


_stack_file: Any = None  # in a worker: the open file its stack goes to


def _stack_folder() -> str:
    global _stacks_dir
    if _stacks_dir is None:
        _stacks_dir = tempfile.mkdtemp(prefix="stepkit-worker-stacks-")
        atexit.register(shutil.rmtree, _stacks_dir, ignore_errors=True)
    return _stacks_dir


def end_workers(iterator: Any) -> None:
    """End a DataLoader iterator's worker processes now (SIGKILL) and release its queues and threads.

    The workers of ``seeded_loader`` ignore SIGTERM, so torch's own shutdown
    (``terminate()`` after a join that times out) cannot end one that is busy
    or blocked. A worker only reads: nothing it holds is lost. Safe to call
    twice, and on an iterator without workers.

    Args:
        iterator: What ``iter(dataloader)`` returned (torch's iterator).

    Examples:
        >>> it = iter(torch.utils.data.DataLoader(torch.arange(8), num_workers=1))
        >>> worker = it._workers[0]
        >>> end_workers(it)
        >>> worker.is_alive()
        False
    """
    workers = getattr(iterator, "_workers", None)
    if not workers:
        return
    if getattr(iterator, "_worker_pids_set", False):  # their deaths are no error to torch's SIGCHLD handler
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=5)
    with contextlib.suppress(Exception):  # the loader's own clean-up: its pin-memory thread, its queues
        iterator._shutdown_workers()
    _LIVE.discard(iterator)


def end_loader_workers() -> None:
    """End the workers of every ``WatchedLoader`` iterator still alive in this process (``end_workers``).

    Registered to run at exit, before ``multiprocessing``'s own exit hook,
    which would otherwise wait forever for workers that ignore SIGTERM.

    Examples:
        >>> batches = iter(seeded_loader(torch.arange(8), seed=0, workers=1))
        >>> _ = next(batches)
        >>> end_loader_workers()  # what the exit hook runs
        >>> [w.is_alive() for w in batches._inner._workers]
        [False]
    """
    for iterator in list(_LIVE):
        end_workers(iterator)


def _track(iterator: Any) -> None:
    global _reaper_registered
    if not _reaper_registered:
        # atexit runs the last registered first: this runs before multiprocessing's hook, which torch's
        # import registered long before any worker started.
        atexit.register(end_loader_workers)
        _reaper_registered = True
    _LIVE.add(iterator)


def seeded_loader(dataset: Any, *, seed: int, workers: int = 0, timeout: float = 0,
                  **kwargs: Any) -> WatchedLoader:
    """A ``WatchedLoader`` whose shuffling and worker seeds come from ``seed``, whose workers leave stop
    signals to the main process.

    Its own generator: a DataLoader otherwise draws its base seed from the
    global RNG, so a resumed run would draw it at another point of the
    stream. Its worker processes ignore SIGTERM, SIGUSR1 and SIGINT
    (``stepkit.signals.leave_stop_signals_to_main``): a scheduler signals
    the whole process group (SLURM, ``scancel``, ``timeout``), and a worker
    that died of it would end the run in "DataLoader worker is killed by
    signal" before the main process could save. ``WatchedLoader`` ends them
    itself when the data fails or the process exits. A ``worker_init_fn``
    given in ``kwargs`` runs after that.

    Args:
        dataset: What to load.
        seed: The run's seed.
        workers: ``num_workers``.
        timeout: Seconds to wait for a batch before ``stepkit.faults.DataStalled`` (0: forever).
        **kwargs: Any other ``DataLoader`` argument (``batch_size``, ``sampler``, ...).

    Returns:
        The loader.

    Examples:
        >>> first = [b.tolist() for b in seeded_loader(torch.arange(6), seed=0, batch_size=3, shuffle=True)]
        >>> first == [b.tolist() for b in seeded_loader(torch.arange(6), seed=0, batch_size=3, shuffle=True)]
        True
    """
    from stepkit.signals import leave_stop_signals_to_main

    then = kwargs.pop("worker_init_fn", None)
    init = leave_stop_signals_to_main if then is None else _Chained(leave_stop_signals_to_main, then)
    return WatchedLoader(dataset, num_workers=workers, generator=torch_generator(seed, "loader"),
                         worker_init_fn=init if workers else then, timeout=timeout, **kwargs)


class _Chained:
    """Two worker_init_fns, one after the other (a class: it must pickle for spawned workers)."""

    def __init__(self, first: Any, then: Any) -> None:
        self.first, self.then = first, then

    def __call__(self, worker_id: int) -> None:
        self.first(worker_id)
        if self.then is not None:
            self.then(worker_id)

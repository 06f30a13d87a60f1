"""The run around the user's own loop: its directory, log, resume, signals, saves and summary.

::

    run = Run(cfg)                                   # the run directory checked, before any work
    ...                                              # build data, model, TrainState
    batches = train_batches(source, state, batch_size=..., seed=...)
    with run.start(state, steps=cfg.train.steps):    # resumed when asked; log; signals
        for batch in run.batches(batches):           # ends at the last step, on a signal or run.stop()
            loss, aux = forward_loss(loss_fn, state, batch)
            if accumulate(state, loss):
                ...                                  # clip, apply_update, ema_update
                run.after_update({"loss": loss, **aux})   # watch, log; saved before the next batch
    # left: last.pt saved; after a signal, exit 75
    if run.finish(run.summary(...)):                 # summary.json; rank 0 prints
        print(...)

No callbacks and no trainer: the loop is the user's; ``Run`` owns only what
must happen around it, so leaving a part out cannot silently lose a save.
The functions it composes (``open_run``, ``continue_run``, ``save_or_stop``,
``stop_if_diverged``, ``end_loop``, ``finish_run``) stay public for loops of
another shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stepkit import check as _check
from stepkit import dist
from stepkit.checkpoint import maybe_save, resume, save_last
from stepkit.config import CkptConfig, RunArgs, to_jsonable
from stepkit.faults import Diverged, NonFiniteWatch
from stepkit.log import Logger
from stepkit.rundir import CKPT_DIR, record_provenance, record_resume, run_of, start_run, write_summary
from stepkit.signals import StopSignals
from stepkit.state import TrainState, unwrap

__all__ = ["Run", "continue_run", "end_loop", "finish_run", "open_run", "params_digest", "pick_device",
           "save_or_stop", "seed_everything", "set_threads", "stop_if_diverged", "stop_if_signalled"]


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``).

    Returns:
        The device.

    Raises:
        ValueError: for ``cuda`` on a machine without a GPU.

    Examples:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    _check.one_of("device", name, ("auto", "cpu", "cuda"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' is not allowed here: no CUDA device is available; use 'cpu' or 'auto'"
        )
    return torch.device(name)



def set_threads(threads: int, *, device: torch.device, workers: int) -> int:
    """Set torch's CPU threads for a run whose DataLoader has ``workers`` processes; return the count.

    On a CPU the workers decode and crop on the same cores as the model's kernels: 2 threads beside 2
    workers on 2 cores ran about 7 times slower than 1 thread (measured on this project's 2-core
    machine), because the kernels' threads wait on each other while a worker holds a core. So with
    workers and no count asked for (``threads=0`` and no ``OMP_NUM_THREADS``), the model gets the
    cores the workers leave, at least one. Without workers, or on a GPU, torch's own choice stands.

    Args:
        threads: ``--threads``: the count to use; 0 chooses as above.
        device: The run's device.
        workers: The DataLoader workers the run starts (0: the main process reads).

    Returns:
        ``torch.get_num_threads()`` after the choice.

    Examples:
        >>> before = torch.get_num_threads()
        >>> set_threads(0, device=torch.device("cpu"), workers=0) == before  # nothing to share
        True
        >>> set_threads(1, device=torch.device("cpu"), workers=0)
        1
        >>> torch.set_num_threads(before)
    """
    _check.integer_at_least("threads", threads, 0)
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and workers and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - workers)))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CUDA included).

    Any seed in ``[0, 2**63)`` (``stepkit.seeds.seed_of``'s): numpy's legacy generator takes its
    low 32 bits.

    Examples:
        >>> seed_everything(0); a = torch.rand(1)
        >>> seed_everything(0); torch.equal(a, torch.rand(1))
        True
    """
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.manual_seed(seed)


def params_digest(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state_dict's names and tensors' bytes in key order: equal iff bit-identical.

    FSDP2 shards are gathered first (a collective: call it on every rank).

    Examples:
        >>> _ = torch.manual_seed(0); a = torch.nn.Linear(2, 1)
        >>> _ = torch.manual_seed(0); b = torch.nn.Linear(2, 1)
        >>> params_digest(a) == params_digest(b), len(params_digest(a))
        (True, 64)
    """
    state = unwrap(model).state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name, tensor in state.items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def open_run(cfg: RunArgs) -> Path:
    """Check the run directory for a fresh or a resumed run, before any work; return its checkpoints folder.

    ``start_run`` with the config's own run flags (``--run-dir``,
    ``--resume``, ``--resume-from``, ``--resume-allow``,
    ``--resume-or-start``): a fresh run over an old one, a resume without a
    checkpoint, or a resume with another config is one ``ValueError``. A
    run that only measures (``cfg.tune.measures``: ``--tune.find-lr`` /
    ``--tune.find-batch``) is no run: it gets the folder for ``tune.json``
    and nothing else (no ``config.json``, no ``checkpoints/``).

    Args:
        cfg: The recipe's config (it inherits ``RunArgs``).

    Returns:
        ``cfg.run_dir / "checkpoints"``.

    Examples:
        >>> import tempfile, pathlib
        >>> cfg = RunArgs(run_dir=pathlib.Path(tempfile.mkdtemp()) / "run")
        >>> open_run(cfg).name, (cfg.run_dir / "config.json").exists()
        ('checkpoints', True)
    """
    if getattr(getattr(cfg, "tune", None), "measures", False):
        if dist.is_main():
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        return Path(cfg.run_dir) / CKPT_DIR
    return start_run(cfg.run_dir, cfg, resume=cfg.resuming, resume_from=cfg.resume_from,
                     allow=cfg.resume_allow, or_start=cfg.resume_or_start)


def continue_run(cfg: Any, state: TrainState, ckpt_dir: str | os.PathLike, *, total_steps: int,
                 recipe: str | os.PathLike | None = None) -> Logger:
    """Resume ``state`` when the run continues a saved one, then open the run's logger.

    On ``--resume`` / ``--resume-from`` it loads the checkpoint into
    ``state`` (``resume``), appends what the config changed on purpose to
    ``config_history.jsonl`` (``record_resume``) and prints which checkpoint
    it read and at which step. The logger continues the experiment tracker's
    run (``state.run_id``), and ``state.run_id`` is set to the logger's.

    Args:
        cfg: The recipe's config: its ``RunArgs`` fields and ``log`` (a ``LogConfig``).
        state: The run's state, built and ready to train; loaded in place.
        ckpt_dir: What ``open_run`` returned.
        total_steps: The run's length in updates (the logger's progress and ETA).
        recipe: The script to record in ``provenance.jsonl`` (``record_provenance``); None: the file
            of the function that calls ``continue_run``, the recipe itself.

    Returns:
        The run's ``Logger``.

    Examples:
        >>> import dataclasses, tempfile, pathlib
        >>> from stepkit.log import LogConfig
        >>> @dataclasses.dataclass
        ... class Config(RunArgs):
        ...     log: LogConfig = dataclasses.field(default_factory=lambda: LogConfig(console=False))
        >>> cfg = Config(run_dir=pathlib.Path(tempfile.mkdtemp()) / "run")
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> log = continue_run(cfg, state, open_run(cfg), total_steps=10)
        >>> state.run_id == log.run_id, state.step
        (True, 0)
        >>> log.close()
    """
    resumed = bool(cfg.resuming and resume(ckpt_dir, state, checkpoint=cfg.resume_from))
    if resumed:
        branch = cfg.resume_from is not None \
            and run_of(cfg.resume_from).resolve() != Path(cfg.run_dir).resolve()
        if branch and state.step >= total_steps:
            raise ValueError(f"resume_from={str(cfg.resume_from)!r} is at step {state.step}, and this run "
                             f"ends at {total_steps}: nothing to train; to start a new run from its weights "
                             f"use --init.from {run_of(cfg.resume_from)} instead")
        record_resume(cfg.run_dir, cfg, state.step)  # config.json stays as it was
        if dist.is_main():
            print(f"resumed from {cfg.resume_from or ckpt_dir} at step {state.step}")
    if recipe is None:  # the script that called: the recipe, or a user's own loop
        caller = sys._getframe(1).f_code.co_filename
        recipe = caller if os.path.isfile(caller) else None
    record_provenance(cfg.run_dir, recipe, resumed=resumed)
    log = Logger(cfg.run_dir, cfg.log, total_steps=total_steps, start_step=state.step, run_id=state.run_id,
                 config=to_jsonable(cfg))
    state.run_id = log.run_id
    return log


def stop_if_signalled(signals: StopSignals, state: TrainState, ckpt_dir: str | os.PathLike,
                      log: Logger) -> None:
    """After the loop and its final save: if a signal stopped it, close the log and exit 75.

    Args:
        signals: The loop's ``StopSignals``.
        state: The run's state (its step is printed).
        ckpt_dir: Where the checkpoint was saved (printed with the command that continues).
        log: The run's logger, closed before exiting.

    Raises:
        SystemExit: 75 (``EXIT_STOPPED``) when a signal stopped the loop; nothing happens otherwise.

    Examples:
        >>> import tempfile
        >>> from stepkit.log import LogConfig
        >>> log = Logger(tempfile.mkdtemp(), LogConfig(console=False))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> with StopSignals() as signals:
        ...     pass
        >>> stop_if_signalled(signals, state, "ckpt", log) is None  # no signal: the run goes on
        True
    """
    if signals.signal_name:
        log.close()
        signals.exit(state.step, ckpt_dir)


def save_or_stop(ckpt_dir: str | os.PathLike, state: TrainState, signals: StopSignals, ckpt: CkptConfig, *,
                 started: float, meta: dict | None = None) -> bool:
    """After each update: record the run's wall time, save when ``--ckpt.every`` says so, and say
    whether a signal asks every rank to stop here.

    ``state.extras["wall_s"]`` becomes the seconds since ``started`` (a
    ``time.perf_counter()`` that counts the resumed run's earlier time), so
    checkpoints carry it; then ``maybe_save(ckpt_dir, state, every=ckpt.every,
    keep_last=ckpt.keep_last, meta=meta)``; then ``signals.requested()``
    (a collective under torchrun: call it on every rank at every update).

    Returns:
        True when the loop should stop (then ``end_loop`` saves and exits 75).

    Examples:
        >>> import tempfile
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), extras={"wall_s": 0.0})
        >>> state.step = 2
        >>> ckpt_dir = Path(tempfile.mkdtemp())
        >>> started = time.perf_counter()
        >>> with StopSignals() as signals:
        ...     stop = save_or_stop(ckpt_dir, state, signals, CkptConfig(every=2), started=started)
        >>> stop, sorted(p.name for p in ckpt_dir.iterdir()), state.extras["wall_s"] >= 0
        (False, ['last.pt', 'step_00000002.pt'], True)
    """
    state.extras["wall_s"] = time.perf_counter() - started
    maybe_save(ckpt_dir, state, every=ckpt.every, keep_last=ckpt.keep_last, meta=meta)
    return signals.requested()


def end_loop(ckpt_dir: str | os.PathLike, state: TrainState, signals: StopSignals, log: Logger, *,
             meta: dict | None = None) -> None:
    """After the loop: save ``last.pt``; if a signal stopped the loop, close the log and exit 75.

    Raises:
        SystemExit: 75 (``EXIT_STOPPED``) after a signal (``stop_if_signalled``), once saved.

    Examples:
        >>> import tempfile
        >>> from stepkit.log import LogConfig
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> ckpt_dir = Path(tempfile.mkdtemp())
        >>> with StopSignals() as signals:
        ...     pass
        >>> end_loop(ckpt_dir, state, signals, Logger(tempfile.mkdtemp(), LogConfig(console=False)))
        >>> [p.name for p in ckpt_dir.iterdir()]
        ['last.pt']
    """
    save_last(ckpt_dir, state, meta=meta)
    stop_if_signalled(signals, state, ckpt_dir, log)


def stop_if_diverged(watch: NonFiniteWatch, state: TrainState, terms: Mapping[str, Any], log: Logger) -> None:
    """After each update: watch its terms; stop the run after ``watch.max_skipped`` skipped updates in a row.

    Every update queues ``watch.update`` on the device; every ``log.cfg.every``
    updates (when the logger reads its values anyway) it reads the counts
    back. The first time a term is NaN or infinite it prints and logs one
    line naming it (kind ``alarm``). After ``--train.max-skipped`` skipped
    updates in a row it writes ``summary.json`` (``"status": "diverged"``,
    the counts, the first non-finite term and the checkpoint to go back to),
    closes the log and raises ``Diverged`` on every rank, which the recipes'
    ``run_main`` turns into one line and exit code 65. Nothing is saved: the
    checkpoints written before the storm stay as they were.

    Args:
        watch: The run's ``NonFiniteWatch``.
        state: The run's state (updated already).
        terms: This update's logged values.
        log: The run's logger (its ``run_dir`` and ``cfg.every``).

    Raises:
        Diverged: naming the step, the first non-finite term and the last checkpoint saved before the storm.

    Examples:
        >>> import tempfile
        >>> from stepkit.log import LogConfig
        >>> log = Logger(tempfile.mkdtemp(), LogConfig(console=False, every=1))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> watch = NonFiniteWatch(max_skipped=2, state=state)
        >>> for state.step in (1, 2):
        ...     state.skipped_steps += 1  # apply_update skipped it: the loss was NaN
        ...     try:
        ...         stop_if_diverged(watch, state, {"loss": torch.tensor(float("nan"))}, log)
        ...     except Diverged as err:
        ...         print(str(err).split(";")[0])
        step 1: loss went non-finite first, at step 1; such updates are skipped
        step 2: the last 2 updates were all non-finite and skipped (--train.max-skipped 2
    """
    watch.update(state, terms)
    if state.step % log.cfg.every:
        return
    first = watch.first_nonfinite()
    if first is not None and not watch.reported:
        watch.reported = True
        if dist.is_main():
            print(f"step {state.step}: {', '.join(first[1])} went non-finite first, at step {first[0]}; "
                  "such updates are skipped", flush=True)
        log.write({"first_nonfinite": ", ".join(first[1]), "first_nonfinite_step": first[0]}, state.step,
                  kind="alarm")
    if not watch.storm():
        return
    in_a_row = watch.in_a_row()
    began = state.step - in_a_row + 1
    back_to = _newest_checkpoint(Path(log.run_dir) / CKPT_DIR, before=began)
    summary = {"status": "diverged", "steps": state.step, "skipped_in_a_row": in_a_row,
               **watch.summary(state), "resume_from": str(back_to[0]) if back_to else None}
    log.write({"diverged_at": state.step, "skipped_in_a_row": in_a_row}, state.step, kind="alarm")
    log.close()
    write_summary(log.run_dir, summary)
    what = f"{', '.join(first[1])} went non-finite first, at step {first[0]}" if first else "the gradients"
    if back_to is None:
        where = "no checkpoint was saved: start again with a lower --optim.lr"
    else:
        path, step = back_to
        again = f"continue from it with --resume-from {path} and a lower --optim.lr (--resume-allow optim.lr)"
        if step < began:
            where = f"the newest checkpoint from before it is {path} (step {step}): {again}"
        else:  # skipped updates change no weight: a save during the storm holds those from before it
            where = (f"the newest checkpoint, {path} (step {step}), was saved during it and holds the "
                     f"weights of step {began - 1} (skipped updates change none): {again}, or start again "
                     "with a lower --optim.lr")
    raise Diverged(f"step {state.step}: the last {in_a_row} updates were all non-finite and skipped "
                   f"(--train.max-skipped {watch.max_skipped}; 0 never stops); {what}; {where}")


def _newest_checkpoint(ckpt_dir: Path, *, before: int) -> tuple[Path, int] | None:
    """The newest checkpoint in ``ckpt_dir`` from before step ``before`` (else the newest), and its step."""
    from stepkit.checkpoint import checkpoint_files, checkpoint_step

    found = []
    for path in checkpoint_files(ckpt_dir):
        try:
            found.append((checkpoint_step(path), path.name.startswith("last."), path))
        except (ValueError, OSError):
            continue
    earlier = sorted(c for c in found if c[0] < before) or sorted(found)
    return (earlier[-1][2], earlier[-1][0]) if earlier else None


def finish_run(cfg: RunArgs, log: Logger, summary: Mapping[str, Any]) -> bool:
    """Close the log, write ``summary.json``, leave the process group; return whether this is rank 0.

    Args:
        cfg: The recipe's config (its ``run_dir``).
        log: The run's logger.
        summary: The run's final numbers (``write_summary`` adds ``environment``).

    Returns:
        True on the main process, which prints the result; False on the other ranks.

    Examples:
        >>> import tempfile, pathlib, json
        >>> from stepkit.log import LogConfig
        >>> cfg = RunArgs(run_dir=pathlib.Path(tempfile.mkdtemp()))
        >>> finish_run(cfg, Logger(cfg.run_dir, LogConfig(console=False)), {"acc": 0.5})
        True
        >>> json.loads((cfg.run_dir / "summary.json").read_text())["acc"]
        0.5
    """
    log.close()
    write_summary(cfg.run_dir, summary)
    main_process = dist.is_main()
    dist.shutdown()
    return main_process


class Run:
    """One training run around the user's loop: one construct instead of six calls in a fixed order.

    ``Run(cfg)`` checks the run directory (``open_run``: a fresh run over an
    old one, a resume without a checkpoint or with another config is one
    ``ValueError``), before any work. ``with run.start(state, steps=...)``
    resumes ``state`` when asked and opens the log (``continue_run``), and
    turns SIGTERM / SIGUSR1 / Ctrl-C into a stop after the update in progress
    (``StopSignals``). ``run.batches(batches)`` hands out the loop's batches
    and, before each one after an update, saves when ``--ckpt.every`` says so
    and asks every rank whether to stop; it ends at ``steps``, on a signal or
    after ``run.stop()``. ``run.after_update(terms)`` follows each update: the
    non-finite watch (``stop_if_diverged``) and the log. Leaving the ``with``
    saves ``last`` (``end_loop``) and, after a signal, exits 75.

    Updates that ``after_update`` did not follow are an error, raised at the
    next batch or at the end of the loop: without it the run would neither log,
    stop on a storm of NaNs, nor save what it did.

    Args:
        cfg: The recipe's config (``RunArgs`` fields, ``log``, ``ckpt``, ``train.max_skipped``).

    Examples:
        >>> import dataclasses, tempfile, pathlib
        >>> from stepkit.config import TrainConfig
        >>> from stepkit.log import LogConfig
        >>> @dataclasses.dataclass
        ... class Config(RunArgs):
        ...     log: LogConfig = dataclasses.field(default_factory=lambda: LogConfig(console=False))
        ...     ckpt: CkptConfig = dataclasses.field(default_factory=CkptConfig)
        ...     train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=3))
        >>> cfg = Config(run_dir=pathlib.Path(tempfile.mkdtemp()) / "run")
        >>> run = Run(cfg)
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> with run.start(state, steps=3):
        ...     for x in run.batches(torch.ones(10, 1, 1)):
        ...         state.model(x).sum().backward(); state.optimizer.step(); state.step += 1
        ...         _ = run.after_update({"x": x.sum()})
        >>> state.step, state.data_position, sorted(p.name for p in run.ckpt_dir.iterdir())
        (3, 3, ['last.pt'])
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.ckpt_dir = open_run(cfg)
        self.meta: dict | None = None
        self.stopped = False
        self.wall_s = 0.0

    def start(self, state: TrainState, *, steps: int, meta: dict | None = None,
              recipe: str | os.PathLike | None = None) -> Run:
        """Resume ``state`` when the run continues a saved one and open the log; use in a ``with``.

        Args:
            state: The run's state, built and ready to train; loaded in place on a resume.
            steps: The run's length in updates.
            meta: What every checkpoint carries beside the state (e.g. ``{"parts": ...}``).
            recipe: The script ``provenance.jsonl`` records (None: the caller's file, the recipe).
        """
        if recipe is None:
            caller = sys._getframe(1).f_code.co_filename
            recipe = caller if os.path.isfile(caller) else None
        self.state, self.steps, self.meta = state, steps, meta
        state.extras.setdefault("wall_s", 0.0)
        self.log = continue_run(self.cfg, state, self.ckpt_dir, total_steps=steps, recipe=recipe)
        self.nonfinite = NonFiniteWatch(self.cfg.train.max_skipped, state)
        self._source: Any = None
        return self

    def __enter__(self) -> Run:
        if not hasattr(self, "log"):
            raise RuntimeError("enter a run with `with run.start(state, steps=...):`, not `with run:`")
        self.signals = StopSignals(enabled=self.cfg.stop_on_signal).__enter__()
        self.started = time.perf_counter() - self.state.extras["wall_s"]
        self.first_step, self.first_wall_s = self.state.step, self.state.extras["wall_s"]
        self._reported = self._saved = self.state.step
        return self

    def batches(self, batches: Any) -> Iterator[Any]:
        """The loop's batches, until ``steps`` updates, a signal or ``stop()``; saves between updates.

        ``batches`` is best a ``stepkit.data.train_batches`` (it records each batch as consumed);
        any other iterable has ``state.data_position`` counted here.
        """
        if not hasattr(self, "signals"):
            raise RuntimeError("iterate run.batches(...) inside `with run.start(state, steps=...):` "
                               "(it saves, logs and stops on signals there)")
        self._source = batches
        records = hasattr(batches, "rng_as_consumed")
        it = iter(batches)
        while True:
            self._check_reported()
            if self.state.step != self._saved:  # an update since the last save point
                self._saved = self.state.step
                with self._as_consumed():  # a prefetched batch's draws are not the checkpoint's
                    if save_or_stop(self.ckpt_dir, self.state, self.signals, self.cfg.ckpt,
                                    started=self.started, meta=self.meta):
                        self.stopped = True  # a signal: every rank stops at this update
            if self.stopped or self.state.step >= self.steps:
                return
            batch = next(it)
            if not records:
                self.state.data_position += 1
            yield batch

    def after_update(self, terms: Mapping[str, Any]) -> dict[str, float | str | bool] | None:
        """After each update: watch its terms for non-finite values, log them; return the logged means
        (at the end of a log interval, on the main process; else None).

        Raises:
            Diverged: after ``--train.max-skipped`` skipped updates in a row (``stop_if_diverged``).
            RuntimeError: when no update happened since the last call.
        """
        if self.state.step == self._reported:
            raise RuntimeError(f"run.after_update was called again at step {self.state.step} with no update "
                               "since: call it once after each apply_update")
        self._reported = self.state.step
        stop_if_diverged(self.nonfinite, self.state, terms, self.log)
        return self.log(terms, step=self.state.step)

    def stop(self, reason: str = "") -> None:
        """End the loop after this update (an early stop); printed on the main process."""
        self.stopped = True
        if reason and dist.is_main():
            print(reason, flush=True)

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.signals.__exit__(kind, error, traceback)
        self.wall_s = time.perf_counter() - self.started
        try:
            if kind is not None:  # the error goes on; the checkpoints saved before it stay
                return
            self._check_reported()
            self.state.extras["wall_s"] = self.wall_s
            with self._as_consumed():
                end_loop(self.ckpt_dir, self.state, self.signals, self.log, meta=self.meta)  # 75 on a signal
        finally:  # the loader's workers end with the loop, not whenever the loader is collected
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _check_reported(self) -> None:
        if self.state.step != self._reported:
            raise RuntimeError(f"update {self.state.step} was not followed by run.after_update(terms): "
                               "without it the run neither logs, stops on NaNs nor saves; call it once "
                               "after each apply_update")

    def _as_consumed(self) -> Any:
        source = self._source
        return source.rng_as_consumed() if hasattr(source, "rng_as_consumed") else contextlib.nullcontext()

    @property
    def updates_per_s(self) -> float:
        """This session's updates per second of training (a resumed run's earlier time left out)."""
        return (self.state.step - self.first_step) / max(self.wall_s - self.first_wall_s, 1e-9)

    def summary(self, **more: Any) -> dict[str, Any]:
        """The numbers every run reports (steps, wall time, skipped updates and samples, ranks, run id),
        then ``more``."""
        skipped = getattr(self._source, "skipped", 0)
        return {"steps": self.state.step, "wall_s": round(self.wall_s, 3),
                **self.nonfinite.summary(self.state),  # skipped_steps, first_nonfinite
                "skipped_unreadable": skipped + more.pop("skipped_unreadable", 0),
                "ranks": dist.world_size(), "run_id": self.state.run_id, **more}

    def finish(self, summary: Mapping[str, Any]) -> bool:
        """Close the log, write ``summary.json``, leave the process group; True on the main process."""
        return finish_run(self.cfg, self.log, summary)

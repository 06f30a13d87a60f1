"""Logging: one ``log(metrics, step)`` callable over the sinks a config turns on.

Call ``log`` after every update with the step's metrics, tensors or numbers.
Tensors are summed on their device; once every ``every`` steps the sums are
read to the host together (one transfer per device, the only host sync) and
the interval's means go to the sinks: a rich console (progress bar with ETA
and throughput, one compact line per interval), ``metrics.jsonl`` (orjson,
one object per event, always with ``"step"``), TensorBoard scalars (plus
histograms and images on request) and wandb (``WANDB_MODE=offline`` works).
Under torchrun only rank 0 writes; the others accumulate nothing.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
import torch
from torch import Tensor

from stepkit import check as _check
from stepkit._atomic import atomic_write_bytes
from stepkit.dist import is_main

__all__ = ["METRICS_FILE", "LogConfig", "Logger", "read_history", "metric_history", "should_stop"]

METRICS_FILE = "metrics.jsonl"


@dataclass
class LogConfig:
    """Where and how often metrics go (``--log.every``, ``--log.tensorboard``, ``--log.wandb``).

    Raises:
        ValueError: naming the field, for ``every`` < 1 or a negative ``heartbeat_s``.

    Examples:
        >>> LogConfig(every=50, tensorboard=True).every
        50
        >>> LogConfig(every=0)
        Traceback (most recent call last):
        ...
        ValueError: every=0 is not allowed: expected an integer >= 1
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True
    """Every field may differ on --resume (where and how often metrics go)."""

    every: int = 10
    """Optimizer updates between two log events (each logs the interval's mean)."""
    console: bool = True
    """Print a progress bar and one line per interval."""
    tensorboard: bool = False
    """Write TensorBoard events to RUN_DIR/tb."""
    wandb: bool = False
    """Log to wandb (set WANDB_MODE=offline to stay off the network)."""
    wandb_project: str = "stepkit"
    """The wandb project."""
    heartbeat_s: float = 30.0
    """Output sent to a file: a line at least this often (seconds) while an interval runs long."""

    def __post_init__(self) -> None:
        _check.integer_at_least("every", self.every, 1)
        _check.at_least("heartbeat_s", self.heartbeat_s, 0.0)


class Logger:
    """``log(metrics, step)``: averages each metric over the interval, writes every ``cfg.every`` steps.

    ``run_id`` names the run for wandb; pass the one saved in the
    ``TrainState`` when resuming so wandb continues the same run. A resumed
    logger (``start_step > 0``) drops the ``metrics.jsonl`` lines and
    TensorBoard events past ``start_step`` (written by the run that died
    after its last checkpoint), so the history reads as one run.

    Examples:
        >>> import tempfile
        >>> log = Logger(tempfile.mkdtemp(), LogConfig(every=2, console=False), total_steps=4)
        >>> log({"loss": torch.tensor(1.0)}, step=1) is None  # mid-interval: nothing read yet
        True
        >>> log({"loss": torch.tensor(3.0)}, step=2)["loss"]  # the interval's mean
        2.0
        >>> log.close()
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        cfg: LogConfig,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        run_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        main: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.total_steps = total_steps
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.main = is_main() if main is None else main
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, int] = {}
        self._texts: dict[str, str | bool] = {}
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._seen_step = start_step
        self._sinks: list[_Sink] = []
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._sinks.append(_JsonlSink(self.run_dir / METRICS_FILE, start_step))
        if cfg.console:
            self._sinks.append(_ConsoleSink(total_steps, start_step, cfg.heartbeat_s))
        if cfg.tensorboard:
            self._sinks.append(_TensorBoardSink(self.run_dir / "tb", start_step))
        if cfg.wandb:
            self._sinks.append(_WandbSink(self.run_dir, cfg.wandb_project, self.run_id, config))

    def __call__(self, metrics: Mapping[str, Any], step: int) -> dict[str, float | str | bool] | None:
        """Add this step's metrics to the interval; at its end, write and return the means."""
        if not self.main:
            return None
        for key, value in metrics.items():
            if isinstance(value, (str, bool)):  # not averaged: the interval's last value is logged
                self._texts[key] = value
                continue
            if isinstance(value, Tensor):
                value = value.detach().float().mean()
            elif not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} is a {type(value).__name__}: log numbers, tensors, "
                                "strings or bools")
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1
        self._seen_step = step
        for sink in self._sinks:
            sink.tick(step)
        at_end = self.total_steps is not None and step >= self.total_steps
        if step % self.cfg.every == 0 or at_end:
            return self.flush(step)
        return None

    def flush(self, step: int) -> dict[str, float | str | bool]:
        """Write the interval's means now (also adds ``steps_per_s``) and start a new interval."""
        if not self.main:
            return {}
        means = _to_numbers(self._sums)
        out: dict[str, float | str | bool] = {k: v / self._counts[k] for k, v in means.items()}
        now = time.perf_counter()
        if step > self._last_step:
            out["steps_per_s"] = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        out.update(self._texts)
        self._sums.clear()
        self._counts.clear()
        self._texts.clear()
        self.write(out, step, kind="train")
        return out

    def write(self, metrics: Mapping[str, float | str | bool], step: int, kind: str = "eval") -> None:
        """Write numbers as they are (evaluation results, summaries): no averaging.

        ``kind`` labels the console line (``eval step 400/1000 ...``), so
        evaluation lines stand out from the training intervals' in a log file.
        Nothing to write (an evaluation that was turned off) writes nothing.
        """
        if not self.main or not metrics:
            return
        texts = {k: v for k, v in metrics.items() if isinstance(v, (str, bool))}
        numbers = _to_numbers({k: v for k, v in metrics.items() if not isinstance(v, (str, bool))})
        for sink in self._sinks:
            sink.write({**numbers, **texts}, step, kind)

    def histogram(self, name: str, values: Tensor, step: int) -> None:
        """A histogram of ``values`` (TensorBoard and wandb)."""
        if self.main:
            for sink in self._sinks:
                sink.histogram(name, values.detach().float().cpu(), step)

    def image(self, name: str, image: Tensor, step: int) -> None:
        """An image, CHW or HW, values in [0, 1] (TensorBoard and wandb), e.g. a mask visualisation."""
        if self.main:
            image = image.detach().float().cpu().clamp(0, 1)
            image = image[None] if image.ndim == 2 else image
            for sink in self._sinks:
                sink.image(name, image, step)

    def close(self) -> None:
        """Write what the current interval holds (a run that stopped early), then close the sinks."""
        if self._sums or self._texts:
            self.flush(self._seen_step)
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_numbers(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Tensors to floats with one device-to-host copy per device; numbers pass through."""
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for k, v in values.items():
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append((k, v))
    for pairs in by_device.values():
        keys = [k for k, _ in pairs]
        stacked = torch.stack([v.detach().float().reshape(()) for _, v in pairs]).cpu().tolist()
        out.update(zip(keys, stacked))
    return out


# --- sinks ---------------------------------------------------------------------------------


class _Sink:
    def tick(self, step: int) -> None: ...
    def write(self, metrics: Mapping[str, float | str | bool], step: int, kind: str = "train") -> None: ...
    def histogram(self, name: str, values: Tensor, step: int) -> None: ...
    def image(self, name: str, image: Tensor, step: int) -> None: ...
    def close(self) -> None: ...


class _JsonlSink(_Sink):
    def __init__(self, path: Path, start_step: int) -> None:
        if path.exists():  # a resumed run, or one started over: drop what came after start_step
            _truncate_history(path, start_step)
        self.file = open(path, "ab")

    def write(self, metrics, step, kind="train"):
        record = {"step": step, **{k: (v if isinstance(v, (str, bool)) or math.isfinite(v) else str(v))
                                   for k, v in metrics.items()}}
        self.file.write(orjson.dumps(record) + b"\n")
        self.file.flush()

    def close(self):
        self.file.close()


def _truncate_history(path: Path, last_step: int) -> None:
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            step = orjson.loads(line)["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise TypeError(f"step {step!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError) as err:
            if number == len(lines):  # the last write, cut short when the run was killed
                print(f"{path}, line {number}: cut short when the run stopped: left out", flush=True)
                continue
            raise ValueError(f"{path}, line {number}: not a metrics record ({type(err).__name__}: {err}); "
                             'each line is {"step": N, ...}: repair or remove that line') from None
        if step <= last_step:
            kept.append(line)
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))


class _ConsoleSink(_Sink):
    """Rich progress bar and lines on a terminal; plain unwrapped lines and a heartbeat in a log file."""

    def __init__(self, total_steps: int | None, start_step: int, heartbeat_s: float = 30.0) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Speed(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:.2f} it/s" if task.speed else "")

        self.console = Console(highlight=False)
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            Speed(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
        self.total_steps, self.start_step, self.heartbeat_s = total_steps, start_step, heartbeat_s
        self.started = self.last_print = time.monotonic()
        self.progress.start()

    def tick(self, step):
        self.progress.update(self.task, completed=step)
        if not self.console.is_terminal and time.monotonic() - self.last_print >= self.heartbeat_s:
            rate = (step - self.start_step) / max(time.monotonic() - self.started, 1e-9)
            self._print(f"step {step}{self._total()}  (running: {rate:.3g} it/s since start)")

    def write(self, metrics, step, kind="train"):
        parts = " ".join(f"{k} {_short(v)}" for k, v in metrics.items())
        label = "" if kind == "train" else f"{kind} "
        self._print(f"{label}step {step}{self._total()}  {parts}")

    def _total(self) -> str:
        return f"/{self.total_steps}" if self.total_steps else ""

    def _print(self, line: str) -> None:
        self.last_print = time.monotonic()
        if self.console.is_terminal:
            self.progress.console.print(line)
        else:  # a log file: one unwrapped line, written now
            print(line, flush=True)

    def close(self):
        self.progress.stop()


def _short(value: float | str | bool) -> str:
    if isinstance(value, (str, bool)):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    return f"{value:.4g}"


class _TensorBoardSink(_Sink):
    def __init__(self, folder: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the resumed step left by a killed run
        self.writer = SummaryWriter(str(folder), purge_step=start_step if start_step > 0 else None)

    def write(self, metrics, step, kind="train"):
        for k, v in metrics.items():
            if isinstance(v, str):
                self.writer.add_text(k, v, step)
            else:
                self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def histogram(self, name, values, step):
        self.writer.add_histogram(name, values, step)

    def image(self, name, image, step):
        self.writer.add_image(name, image, step)

    def close(self):
        self.writer.close()


class _WandbSink(_Sink):
    def __init__(self, run_dir: Path, project: str, run_id: str, config: Mapping[str, Any] | None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, dir=str(run_dir), id=run_id, resume="allow", config=dict(config or {})
        )

    def write(self, metrics, step, kind="train"):
        self.run.log(dict(metrics), step=step)

    def histogram(self, name, values, step):
        self.run.log({name: self.wandb.Histogram(values.numpy())}, step=step)

    def image(self, name, image, step):
        self.run.log({name: self.wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def close(self):
        self.run.finish()


# --- reading a run back, and stopping early ------------------------------------------------


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (or of that file given directly), in order.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\\n{"step": 2, "loss": 1.0}\\n')
        >>> metric_history(read_history(run), "loss")
        ([1, 2], [2.0, 1.0])
    """
    path = Path(run_dir)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (is this a stepkit run directory?)")
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def metric_history(records: Sequence[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric from ``read_history``'s records (records without it skipped).

    Examples:
        >>> records = [{"step": 1, "loss": 2.0}, {"step": 2, "acc": 0.5}, {"step": 3, "loss": 1.0}]
        >>> metric_history(records, "loss")
        ([1, 3], [2.0, 1.0])
    """
    pairs = [(r["step"], float(r[name])) for r in records if name in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def should_stop(
    history: Sequence[float],
    *,
    patience: int,
    min_delta: float = 0.0,
    mode: Literal["min", "max"] = "min",
) -> bool:
    """Early stopping: True when the last ``patience`` values brought no improvement.

    A value improves on the best so far when it is lower (``mode="min"``) or
    higher (``"max"``) by more than ``min_delta``. Pure: the same history
    always gives the same answer, so a resumed run decides as the original.

    Examples:
        >>> should_stop([1.0, 0.9, 0.95, 0.92], patience=2)  # no value below 0.9 in the last two
        True
        >>> should_stop([1.0, 0.9, 0.95, 0.85], patience=2)
        False
    """
    _check.integer_at_least("patience", patience, 1)
    _check.at_least("min_delta", min_delta, 0.0)
    _check.one_of("mode", mode, ("min", "max"))
    if not history:
        return False
    sign = 1.0 if mode == "min" else -1.0
    best, since = sign * history[0], 0
    for value in history[1:]:
        if sign * value < best - min_delta:
            best, since = sign * value, 0
        else:
            since += 1
    return since >= patience

"""Which checkpoints a run keeps: ``last``, the last K periodic saves, the best N by a metric.

Layout of a run's ``checkpoints/`` folder::

    last.pt                     the newest state: what ``resume`` reads
    step_00000400.pt            periodic saves, the last ``keep_last`` kept
    best_00000300.pt            the best ``keep_best`` by a metric
    best.json                   their steps and metric values

A sharded (FSDP2) run writes ``.dcp`` folders under the same names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from stepkit import check as _check
from stepkit import dist
from stepkit._atomic import atomic_write_bytes
from stepkit.checkpoint.errors import BEST_INDEX, LAST, SHARDED_SUFFIX, CheckpointError, save_failed
from stepkit.checkpoint.save import save_checkpoint
from stepkit.state import TrainState

__all__ = ["best_checkpoints", "checkpoint_files", "maybe_save", "save_best", "save_last", "save_periodic"]

_PERIODIC = re.compile(r"step_(\d{8,})(?:\.rank\d+\.rng)?\.(?:pt|dcp)")


def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints a run's folder keeps, by name: ``best_*``, ``last``, ``step_*``, single files and
    ``.dcp`` folders (not the partial ``.tmp`` of a save, nor the old layout's per-rank RNG files).

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=10)
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = maybe_save(folder, state, every=5)
        >>> [p.name for p in checkpoint_files(folder)]
        ['last.pt', 'step_00000010.pt']
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(("last.", "step_", "best_"))
                  and p.suffix in (".pt", SHARDED_SUFFIX) and ".rank" not in p.name)


def save_last(ckpt_dir: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Save ``ckpt_dir/last.pt`` (what ``resume`` continues from).

    Args:
        ckpt_dir: The checkpoint folder.
        state: What to save.
        meta: JSON-like facts saved beside it (e.g. the config).

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=3)
        >>> save_last(tempfile.mkdtemp(), state).name
        'last.pt'
    """
    return save_checkpoint(Path(ckpt_dir) / LAST, state, meta=meta)


def save_periodic(
    ckpt_dir: str | os.PathLike, state: TrainState, *, keep_last: int, meta: dict | None = None
) -> Path:
    """Save ``step_<step>.pt`` and delete the periodic saves older than the last ``keep_last``.

    Args:
        ckpt_dir: The checkpoint folder.
        state: What to save; its ``step`` names the file.
        keep_last: How many periodic saves to keep, at least 1.
        meta: JSON-like facts saved beside it.

    Returns:
        The path written.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for state.step in (10, 20, 30):
        ...     _ = save_periodic(folder, state, keep_last=2)
        >>> sorted(p.name for p in folder.iterdir())
        ['step_00000020.pt', 'step_00000030.pt']
    """
    _check.integer_at_least("keep_last", keep_last, 1)
    path = save_checkpoint(_periodic_path(ckpt_dir, state.step), state, meta=meta)
    if dist.is_main():
        _prune_periodic(Path(ckpt_dir), keep_last)
    dist.barrier()
    return path


def _periodic_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def _remove(path: Path) -> None:
    """A checkpoint in any of its forms: the file, other ranks' RNG beside it, or a sharded folder."""
    path.unlink(missing_ok=True)
    for rng in path.parent.glob(f"{path.stem}.rank*.rng.pt"):
        rng.unlink(missing_ok=True)
    shutil.rmtree(path.with_suffix(SHARDED_SUFFIX), ignore_errors=True)


def _prune_periodic(ckpt_dir: Path, keep_last: int) -> None:
    periodic = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _PERIODIC.fullmatch(p.name))]
    kept = sorted({step for step, _ in periodic})[-keep_last:]
    for step, old in periodic:
        if step in kept:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no second serialisation; the next atomic save of
    # ``src`` makes a new file, so ``dst`` keeps this content.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    os.replace(tmp, dst)


def save_best(
    ckpt_dir: str | os.PathLike,
    state: TrainState,
    value: float,
    *,
    keep_best: int,
    mode: Literal["min", "max"] = "min",
    meta: dict | None = None,
) -> Path | None:
    """Save ``best_<step>.pt`` if ``value`` is among the ``keep_best`` best; prune the rest.

    ``best.json`` lists the kept ones, best first. Returns the path saved,
    or None when ``value`` did not make the cut. The checkpoint is written
    before the index, so a crash between the two leaves an extra file, never
    an index entry without its file.

    Examples:
        >>> import tempfile
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> folder = tempfile.mkdtemp()
        >>> for step, acc in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        ...     state.step = step
        ...     _ = save_best(folder, state, acc, keep_best=2, mode="max")
        >>> [(e["step"], e["value"]) for e in best_checkpoints(folder)]
        [(2, 0.7), (3, 0.6)]
    """
    _check.integer_at_least("keep_best", keep_best, 1)
    _check.one_of("mode", mode, ("min", "max"))
    _check.finite("value", float(value))
    ckpt_dir = Path(ckpt_dir)
    entries = best_checkpoints(ckpt_dir)
    entries = [e for e in entries if e["step"] != state.step]
    candidate: dict[str, Any] = {"file": f"best_{state.step:08d}.pt", "step": state.step,
                                 "value": float(value)}
    ranked = sorted([*entries, candidate], key=lambda e: e["value"], reverse=mode == "max")
    kept = ranked[:keep_best]
    if candidate not in kept:
        return None
    path = save_checkpoint(ckpt_dir / candidate["file"], state, meta=meta)
    if dist.is_main():
        atomic_write_bytes(ckpt_dir / BEST_INDEX, json.dumps(kept, indent=1).encode())
        for dropped in ranked[keep_best:]:
            _remove(ckpt_dir / dropped["file"])
    dist.barrier()  # every rank reads the same index next time
    return path


def best_checkpoints(ckpt_dir: str | os.PathLike) -> list[dict]:
    """The kept best checkpoints, best first: ``[{"file", "step", "value"}, ...]``.

    Args:
        ckpt_dir: The checkpoint folder (its ``best.json``).

    Returns:
        The index's entries; ``[]`` when nothing was saved by ``save_best``.

    Raises:
        CheckpointError: for an index that is not JSON or names files that ``save_best`` would not.

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> best_checkpoints(folder)
        []
        >>> _ = (folder / "best.json").write_text('[{"file": "../../etc/passwd", "step": 1, "value": 0.5}]')
        >>> best_checkpoints(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stepkit.checkpoint.CheckpointError: .../best.json: refused: expected a list of ...
    """
    index = Path(ckpt_dir) / BEST_INDEX
    if not index.exists():
        return []
    try:
        entries = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index}: not a readable index of best checkpoints ({err})") from None
    # Its file names are later deleted when a checkpoint drops out: accept only our own names,
    # so an edited index can never point outside the folder.
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("step"), int) and not isinstance(e.get("step"), bool)
        and e.get("file") == f"best_{e['step']:08d}.pt" and isinstance(e.get("value"), (int, float))
        for e in entries)
    if not ok:
        raise CheckpointError(f"{index}: refused: expected a list of "
                              '{"file": "best_<step>.pt", "step": <int>, "value": <number>}')
    return entries


def maybe_save(
    ckpt_dir: str | os.PathLike,
    state: TrainState,
    *,
    every: int,
    keep_last: int = 1,
    meta: dict | None = None,
) -> bool:
    """Every ``every`` updates: save ``last.pt`` and a periodic ``step_<step>.pt`` (last ``keep_last`` kept).

    Call it after ``apply_update``; ``every=0`` never saves. Returns whether it saved.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=10)
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> maybe_save(folder, state, every=5), sorted(p.name for p in folder.iterdir())
        (True, ['last.pt', 'step_00000010.pt'])
    """
    _check.integer_at_least("every", every, 0)
    _check.integer_at_least("keep_last", keep_last, 0)
    if every == 0 or state.step == 0 or state.step % every:
        return False
    last = save_last(ckpt_dir, state, meta=meta)
    if keep_last > 0:
        if dist.is_sharded(state.model):  # a folder per rank's shards: saved again, not linked
            save_checkpoint(_periodic_path(ckpt_dir, state.step), state, meta=meta)
        else:  # one file holds every rank's part: a link of it is a whole checkpoint
            periodic, failure = _periodic_path(ckpt_dir, state.step), None
            if dist.is_main():
                try:
                    _link_or_copy(last, periodic)
                except OSError as err:
                    failure = err
            if dist.any_rank(failure is not None):
                raise save_failed(periodic, failure, last.stat().st_size if last.exists() else None)
        if dist.is_main():
            _prune_periodic(Path(ckpt_dir), keep_last)
        dist.barrier()
    return True


"""Checkpoints: atomic saves, safe loads, resume, and which files to keep.

A checkpoint is ``{"format", "state": TrainState.state_dict(), "meta"}``
written with ``torch.save`` and read back with ``weights_only=True``, so
loading one never runs code. Saves go to a temp file in the same directory,
are fsynced, then renamed over the old file: a crash or ``kill -9`` at any
moment leaves either the old checkpoint or the new one, never half of one.

Layout of a run's ``checkpoints/`` folder::

    last.pt                     the newest state: what ``resume`` reads
    step_00000400.pt            periodic saves, the last ``keep_last`` kept
    best_00000300.pt            the best ``keep_best`` by a metric
    best.json                   their steps and metric values
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from stepkit import _check
from stepkit._atomic import atomic_save, atomic_write_bytes
from stepkit.state import TrainState, target_state_dict, unwrap

FORMAT = "stepkit.checkpoint/1"
LAST = "last.pt"
BEST_INDEX = "best.json"
_PERIODIC = re.compile(r"step_(\d{8,})\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unsafe, corrupt, or from another model."""


def save_checkpoint(path: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Atomically save ``state`` (and JSON-like ``meta``) to ``path``."""
    return atomic_save({"format": FORMAT, "state": state.state_dict(), "meta": meta or {}}, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; refuse anything unsafe or broken."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused: it holds Python objects that only arbitrary code can rebuild "
            f"(weights_only load failed: {reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt file ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a stepkit checkpoint (expected format {FORMAT!r}, "
            f"found {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})"
        )
    return payload


def restore(state: TrainState, payload: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """Load a checkpoint's state into ``state`` after checking it fits the model and target."""
    saved = payload["state"]
    _check_fits(path, "model", unwrap(state.model).state_dict(), saved.get("model", {}))
    if state.target is not None and "target" in saved:
        _check_fits(path, "target", target_state_dict(state.target), saved["target"])
    try:
        state.load_state_dict(saved)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit this run: {err}") from None


def resume(ckpt_dir: str | os.PathLike, state: TrainState) -> bool:
    """Restore ``state`` from ``ckpt_dir/last.pt`` if there is one; return whether it did."""
    last = Path(ckpt_dir) / LAST
    if not last.exists():
        return False
    restore(state, load_checkpoint(last), last)
    return True


def _check_fits(path, what: str, current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    missing = sorted(current.keys() - saved.keys())
    unexpected = sorted(saved.keys() - current.keys())
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)}, here {tuple(current[k].shape)}"
        for k in current.keys() & saved.keys()
        if tuple(saved[k].shape) != tuple(current[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(sorted(shapes)[:5]))
        raise CheckpointError(f"{path}: was saved from another {what}: " + ", ".join(parts))


def _few(names: list[str], n: int = 8) -> str:
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --- which checkpoints to keep -----------------------------------------------------------


def save_last(ckpt_dir: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Save ``ckpt_dir/last.pt``."""
    return save_checkpoint(Path(ckpt_dir) / LAST, state, meta=meta)


def save_periodic(
    ckpt_dir: str | os.PathLike, state: TrainState, *, keep_last: int, meta: dict | None = None
) -> Path:
    """Save ``step_<step>.pt`` and delete the periodic saves older than the last ``keep_last``."""
    _check.integer_at_least("keep_last", keep_last, 1)
    path = save_checkpoint(_periodic_path(ckpt_dir, state.step), state, meta=meta)
    _prune_periodic(Path(ckpt_dir), keep_last)
    return path


def _periodic_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def _prune_periodic(ckpt_dir: Path, keep_last: int) -> None:
    periodic = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _PERIODIC.fullmatch(p.name))
    )
    for _, old in periodic[:-keep_last]:
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
    """
    _check.integer_at_least("keep_best", keep_best, 1)
    _check.one_of("mode", mode, ("min", "max"))
    _check.finite("value", float(value))
    ckpt_dir = Path(ckpt_dir)
    entries = best_checkpoints(ckpt_dir)
    entries = [e for e in entries if e["step"] != state.step]
    candidate = {"file": f"best_{state.step:08d}.pt", "step": state.step, "value": float(value)}
    ranked = sorted([*entries, candidate], key=lambda e: e["value"], reverse=mode == "max")
    kept = ranked[:keep_best]
    if candidate not in kept:
        return None
    path = save_checkpoint(ckpt_dir / candidate["file"], state, meta=meta)
    atomic_write_bytes(ckpt_dir / BEST_INDEX, json.dumps(kept, indent=1).encode())
    for dropped in ranked[keep_best:]:
        (ckpt_dir / dropped["file"]).unlink(missing_ok=True)
    return path


def best_checkpoints(ckpt_dir: str | os.PathLike) -> list[dict]:
    """The kept best checkpoints, best first: ``[{"file", "step", "value"}, ...]``."""
    index = Path(ckpt_dir) / BEST_INDEX
    if not index.exists():
        return []
    return json.loads(index.read_text())


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
    """
    _check.integer_at_least("every", every, 0)
    _check.integer_at_least("keep_last", keep_last, 0)
    if every == 0 or state.step == 0 or state.step % every:
        return False
    last = save_last(ckpt_dir, state, meta=meta)
    if keep_last > 0:
        _link_or_copy(last, _periodic_path(ckpt_dir, state.step))
        _prune_periodic(Path(ckpt_dir), keep_last)
    return True

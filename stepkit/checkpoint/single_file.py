"""The single-file format: ``{"format", "state": TrainState.state_dict(), "meta"}`` in one ``torch.save``.

Saves go to a temp file in the same directory, are fsynced, then renamed over
the old file: a crash or ``kill -9`` at any moment leaves either the old
checkpoint or the new one, never half of one. Loads use ``weights_only=True``,
so reading a checkpoint never runs code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from stepkit import dist
from stepkit._atomic import atomic_save
from stepkit.checkpoint.errors import (
    FORMAT,
    CheckpointError,
    CheckpointMismatch,
    check_fits,
    save_failed,
    tensor_bytes,
)
from stepkit.state import TrainState, target_state_dict, unwrap

__all__ = ["load_checkpoint", "restore", "save_single_file"]


def save_single_file(path: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Atomically save ``state`` in one file, written by rank 0 with every rank's RNG and ``rank_extras``.

    ``save_checkpoint`` calls it for a replicated model (``save_sharded`` for a sharded one); every
    rank calls it. Raises ``SaveFailed`` on every rank when the file could not be written.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=3)
        >>> path = save_single_file(pathlib.Path(tempfile.mkdtemp()) / "x.pt", state)
        >>> load_checkpoint(path)["state"]["step"]
        3
    """
    path = Path(path)
    parts = dist.gather_to_main(state.rank_part()) if dist.world_size() > 1 else None
    failure, needed = None, None
    if dist.is_main():
        payload = {"format": FORMAT, "state": state.state_dict(), "meta": meta or {}}
        if parts is not None:
            payload["rank_parts"] = parts  # by rank; rank 0's is in "state" too
        try:
            atomic_save(payload, path)
        except OSError as err:
            failure, needed = err, tensor_bytes(payload)
    if dist.any_rank(failure is not None):  # every rank learns it, and stops alike
        raise save_failed(path, failure, needed)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; refuse anything unsafe or broken.

    Args:
        path: The checkpoint file.

    Returns:
        The saved payload: ``{"format", "state", "meta", "rng"}`` (tensors on the CPU).

    Raises:
        CheckpointError: naming the file, for a missing, truncated or unsafe (code-running) one.

    Examples:
        >>> import tempfile, pathlib
        >>> class RunsCode:
        ...     def __reduce__(self):
        ...         return print, ("this ran while loading",)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "evil.pt"
        >>> torch.save({"format": 1, "payload": RunsCode()}, path)
        >>> load_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stepkit.checkpoint.CheckpointError: .../evil.pt: refused: it holds Python objects that only ...
    """
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
    except Exception as err:  # torch's readers raise many kinds (RuntimeError, struct.error, ...)
        raise CheckpointError(f"{path}: truncated or corrupt file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a stepkit checkpoint (expected format {FORMAT!r}, "
            f"found {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})"
        )
    return payload


def restore(state: TrainState, payload: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """Load a checkpoint's state into ``state`` after checking it fits the model and target.

    Args:
        state: The run's state, loaded in place.
        payload: What ``load_checkpoint`` read.
        path: Where ``payload`` came from, named in errors.

    Raises:
        CheckpointMismatch: naming ``path``, for missing or unexpected keys, a shape mismatch, or a
            target or GradScaler that only one side has.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> path = save_single_file(pathlib.Path(tempfile.mkdtemp()) / "x.pt",
        ...                        TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=4))
        >>> wider = torch.nn.Linear(3, 1)
        >>> try:
        ...     restore(TrainState(wider, torch.optim.SGD(wider.parameters(), lr=0.1)),
        ...             load_checkpoint(path), path)
        ... except CheckpointMismatch as err:
        ...     print(str(err).replace(str(path), "x.pt"))
        x.pt: was saved from another model: shape mismatch weight: saved (1, 2), here (1, 3)
    """
    saved = payload["state"]
    check_fits(path, "model", unwrap(state.model).state_dict(), saved.get("model", {}))
    if state.target is not None and "target" in saved:
        check_fits(path, "target", target_state_dict(state.target), saved["target"])
    try:
        state.load_state_dict(saved)
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointMismatch(f"{path}: does not fit this run: {err}") from None

"""The sharded format (FSDP2): a ``torch.distributed.checkpoint`` folder written by every rank.

The folder holds what ``TrainState.state_dict(by_name=True)`` returns (the
same serializer as the single-file format: model, optimizer, EMA target,
GradScaler, counters and extras), each rank's RNG state in
``rng_rank<N>.pt``, and ``state.json`` (format, world size, step, meta)::

    last.dcp/
        .metadata  __0_0.distcp  __1_0.distcp  rng_rank0.pt  rng_rank1.pt  state.json
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from stepkit import dist
from stepkit._atomic import atomic_save, atomic_write_bytes
from stepkit.checkpoint.errors import (
    FORMAT,
    CheckpointError,
    CheckpointMismatch,
    restore_rank_part,
    save_failed,
    tensor_bytes,
)
from stepkit.checkpoint.safe_metadata import read_metadata, safe_planner, safe_reader
from stepkit.checkpoint.single_file import load_checkpoint
from stepkit.state import TrainState

__all__ = ["load_sharded", "read_info", "save_sharded"]

INFO = "state.json"


def save_sharded(path: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Save a sharded (FSDP2) ``state`` into the folder ``path`` with ``torch.distributed.checkpoint``.

    Every rank writes its own shards of the model, optimizer and EMA target
    (never gathered on one rank) and its RNG state; buffers are first made
    equal to rank 0's (``dist.broadcast_buffers``); rank 0 writes
    ``state.json``. The folder is written under a temporary name and renamed
    into place, so an interrupted save leaves the previous checkpoint whole.
    Outside torch.distributed (one process, any model) it writes the same folder.

    Args:
        path: The folder to write (``last.dcp`` in the recipes).
        state: What to save; every rank passes its own shards.
        meta: JSON-like facts saved in ``state.json``.

    Returns:
        ``path``.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=5)
        >>> folder = save_sharded(pathlib.Path(tempfile.mkdtemp()) / "last.dcp", state)
        >>> sorted(p.name for p in folder.iterdir())
        ['.metadata', '__0_0.distcp', 'rng_rank0.pt', 'state.json']
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    # DCP keeps one copy of a replicated tensor, taken from whichever rank it picks; FSDP2
    # lets buffers (BatchNorm statistics) differ per rank, so agree on rank 0's first.
    dist.broadcast_buffers(state.model)
    if isinstance(state.target, torch.nn.Module):
        dist.broadcast_buffers(state.target)
    saved = state.state_dict(by_name=True)
    saved.pop("rng"), saved.pop("rank_extras")  # each rank's own, where DCP would keep one copy
    failure: BaseException | None = None
    try:
        with _one_process_is_intended():
            dcp.save(saved, checkpoint_id=tmp)
        atomic_save({"format": FORMAT, **state.rank_part()}, tmp / f"rng_rank{dist.rank()}.pt")
        if dist.is_main():
            info = {"format": FORMAT, "sharded": True, "world_size": dist.world_size(), "step": state.step,
                    "meta": meta or {}}
            atomic_write_bytes(tmp / INFO, json.dumps(info).encode())
    except (OSError, CheckpointException) as err:  # DCP raises its own on every rank, wrapping the cause
        failure = next(iter(err.failures.values()))[0] if isinstance(err, CheckpointException) else err
    if dist.any_rank(failure is not None):
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(path, failure, tensor_bytes(saved))  # a DTensor counts its whole size
    if dist.is_main():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """DCP warns that it assumes one process when torch.distributed is off: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint's ``state.json``: ``{"format", "sharded", "world_size", "step", "meta"}``.

    Args:
        path: The checkpoint folder.

    Raises:
        CheckpointError: naming the folder, for one without a readable ``state.json`` of this format.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> folder = save_sharded(pathlib.Path(tempfile.mkdtemp()) / "last.dcp",
        ...                       TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=5))
        >>> read_info(folder)["step"]
        5
    """
    path = Path(path)
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a complete sharded checkpoint ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{path}: not a stepkit checkpoint (format {found!r})")
    expected = {"sharded": (lambda v: v is True, "true"),
                "world_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
                "step": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
                "meta": (lambda v: isinstance(v, dict), "an object")}
    for key, (ok, what) in expected.items():
        if key not in info or not ok(info[key]):
            found = f"{info[key]!r}" if key in info else "missing"
            raise CheckpointError(f"{path / INFO}: refused: {key} is {found}, expected {what}")
    return info


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_sharded(path: str | os.PathLike, state: TrainState) -> None:
    """Load a ``save_sharded`` folder into a sharded ``state`` (any world size DCP can reshard to).

    Only DCP's own metadata records are unpickled (``SAFE_METADATA_GLOBALS``):
    a ``.metadata`` file that would run code is refused. A folder saved by
    FSDP ranks loads into one process too.

    Args:
        path: The folder ``save_sharded`` wrote.
        state: The run's state (sharded as it will train), loaded in place.

    Raises:
        CheckpointError: naming the folder, for an incomplete or unsafe one.
        CheckpointMismatch: naming the folder, for one saved from another model, target or scaler.

    Examples:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> folder = save_sharded(pathlib.Path(tempfile.mkdtemp()) / "last.dcp",
        ...                       TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=5))
        >>> fresh = torch.nn.Linear(2, 1)
        >>> state = TrainState(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
        >>> load_sharded(folder, state)
        >>> state.step, torch.equal(fresh.weight, model.weight)
        (5, True)
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    read_info(path)
    saved_parts = {fqn.split(".", 1)[0] for fqn in read_metadata(path).state_dict_metadata}
    try:
        state.check_parts(saved_parts)  # DCP reads only what it is asked for: a part too many is silent
    except ValueError as err:
        raise CheckpointMismatch(f"{path}: does not fit this run: {err}") from None
    loaded = state.state_dict(by_name=True)  # the shapes to read into, filled in place
    loaded.pop("rng"), loaded.pop("rank_extras")
    try:
        with _one_process_is_intended():
            dcp.load(loaded, storage_reader=safe_reader(path), planner=safe_planner())
    except CheckpointError:
        raise
    except (CheckpointException, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        refused = re.search(r"refused: [^\n]*", str(err))  # DCP wraps the reader's error in its own
        if refused:
            raise CheckpointError(f"{path / '.metadata'}: {refused.group(0)}") from None
        raise CheckpointMismatch(f"{path}: does not fit this run: {err}") from None
    try:
        state.load_state_dict(loaded, restore_rng=False, by_name=True)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CheckpointMismatch(f"{path}: does not fit this run: {err}") from None
    rng = path / f"rng_rank{dist.rank()}.pt"
    if rng.exists():  # a different world size: the new ranks keep their seeds
        restore_rank_part(state, load_checkpoint(rng), rng)

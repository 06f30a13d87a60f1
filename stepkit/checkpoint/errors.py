"""What every checkpoint format shares: the names on disk and the two errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["BEST_INDEX", "FORMAT", "LAST", "SHARDED_SUFFIX", "CheckpointError", "CheckpointMismatch",
           "SaveFailed", "check_fits", "rank_rng_path", "restore_rank_part", "save_failed", "tensor_bytes"]

FORMAT = "stepkit.checkpoint/1"
LAST = "last.pt"
SHARDED_SUFFIX = ".dcp"
BEST_INDEX = "best.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unsafe, corrupt, or from another model.

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit.checkpoint import load_checkpoint
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "torn.pt"
        >>> _ = path.write_bytes(b"not a checkpoint")
        >>> try:
        ...     load_checkpoint(path)
        ... except CheckpointError as err:
        ...     print(str(err).startswith(str(path)))
        True
    """


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that does not fit this run: saved from another model, target or scaler.

    Resume re-raises it as it is (another checkpoint of the same run would not
    fit either), where an unreadable file gets the newest readable one beside
    it named instead.

    Examples:
        >>> import torch
        >>> from stepkit.checkpoint.errors import check_fits
        >>> try:
        ...     check_fits("x.pt", "model", {"w": torch.zeros(2)}, {"w": torch.zeros(3)})
        ... except CheckpointMismatch as err:
        ...     print(err)
        x.pt: was saved from another model: shape mismatch w: saved (3,), here (2,)
    """


class SaveFailed(OSError):
    """A checkpoint that could not be written (disk full, quota, permissions): the run stops.

    Raised on every rank alike; the message names the folder, the space the
    checkpoint needs and what is free, and says that the checkpoints already
    there are whole. ``stepkit.cli.run_main`` prints it and exits 74
    (``stepkit.faults.EXIT_SAVE_FAILED``).

    Examples:
        >>> import errno
        >>> from pathlib import Path
        >>> from stepkit.checkpoint.errors import save_failed
        >>> full = OSError(errno.ENOSPC, "No space left")
        >>> err = save_failed(Path("/runs/a/checkpoints/last.pt"), full, 2**30)
        >>> str(err).split(";")[0]
        '/runs/a/checkpoints: could not save last.pt (No space left)'
        >>> isinstance(err, OSError)
        True
    """


# Shown as users import them, in tracebacks and doctests.
CheckpointError.__module__ = CheckpointMismatch.__module__ = SaveFailed.__module__ = "stepkit.checkpoint"


def restore_rank_part(state: Any, part: Any, path: str | os.PathLike) -> None:
    """``state.load_rank_part(part)``, or ``CheckpointError`` naming ``path`` for a part that is not what
    stepkit saves (an edited file: RNG states of the wrong kind, a missing key).

    Examples:
        >>> from stepkit.state import TrainState
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> try:
        ...     restore_rank_part(state, {"rng": "garbage"}, "rng_rank0.pt")
        ... except CheckpointError as err:
        ...     print(str(err).split(" (")[0])
        rng_rank0.pt: refused: this rank's RNG part is not one stepkit saves
    """
    try:
        if not isinstance(part, dict):
            raise TypeError(f"a {type(part).__name__}, not a dict")
        state.load_rank_part(part)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"{path}: refused: this rank's RNG part is not one stepkit saves "
                              f"({type(err).__name__}: {err})") from None


def save_failed(path: Path, err: BaseException | None, needed_bytes: int | None) -> SaveFailed:
    """The one-line ``SaveFailed`` for ``path``: why (``err``; None on a rank that only heard of it),
    how much it needs and how much is free.

    Examples:
        >>> str(save_failed(Path("/runs/a/checkpoints/last.pt"), None, None)).split(";")[0]
        '/runs/a/checkpoints: could not save last.pt (another rank could not write its part)'
    """
    import shutil

    folder = path.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MB"
    except OSError:
        free = "an unknown amount"
    needs = f"about {needed_bytes / 2**20:,.0f} MB" if needed_bytes else "its size"
    why = (f"{err.strerror or err}" if isinstance(err, OSError) else str(err).splitlines()[0]) if err \
        else "another rank could not write its part"
    return SaveFailed(f"{folder}: could not save {path.name} ({why}); it needs {needs} and {free} is free "
                      f"there; the checkpoints already in {folder} are as they were: free space (or choose "
                      "another --run-dir) and continue with --resume")


def tensor_bytes(tree: object) -> int:
    """The bytes of every tensor in a nested dict / list (what a checkpoint of it roughly needs on disk).

    Examples:
        >>> tensor_bytes({"w": torch.zeros(4), "opt": [torch.zeros(2, dtype=torch.float64)], "step": 3})
        32
    """
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def check_fits(path: str | os.PathLike, what: str, current: dict[str, torch.Tensor],
               saved: dict[str, torch.Tensor]) -> None:
    """Raise ``CheckpointMismatch`` naming ``path`` unless ``saved`` has ``current``'s keys and shapes.

    Args:
        path: Where ``saved`` came from, named in the error.
        what: What is compared (``"model"``, ``"target"``), named in the error.
        current: ``{name: tensor}`` of this run.
        saved: ``{name: tensor}`` read from the checkpoint.

    Raises:
        CheckpointMismatch: listing missing and unexpected keys (the first 8) and shape mismatches.

    Examples:
        >>> check_fits("x.pt", "model", {"w": torch.zeros(2)}, {"w": torch.ones(2)}) is None
        True
    """
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
        raise CheckpointMismatch(f"{path}: was saved from another {what}: " + ", ".join(parts))


def _few(names: list[str], n: int = 8) -> str:
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def rank_rng_path(path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG state beside a replicated checkpoint ``path``.

    Examples:
        >>> rank_rng_path("ckpt/last.pt", 1).name
        'last.rank1.rng.pt'
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}.rng.pt")

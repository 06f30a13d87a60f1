"""``save_checkpoint``: one call for any model, a single file when replicated, a DCP folder when sharded."""

from __future__ import annotations

import os
from pathlib import Path

from stepkit import dist
from stepkit.checkpoint.errors import SHARDED_SUFFIX
from stepkit.checkpoint.sharded import save_sharded
from stepkit.checkpoint.single_file import save_single_file
from stepkit.state import TrainState

__all__ = ["save_checkpoint"]


def save_checkpoint(path: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Atomically save ``state`` (and JSON-like ``meta``) to ``path``.

    Under torch.distributed every rank calls it: a replicated model (DDP)
    is written by rank 0 alone, in one file that also holds every other
    rank's RNG state and ``rank_extras`` (``"rank_parts"``, gathered first),
    so a resumed run continues every rank's augmentation stream and a rank
    killed mid-save can leave no file half new; a sharded model (FSDP2) goes
    to a ``torch.distributed.checkpoint`` folder instead (``last.dcp/``, see
    ``save_sharded``). In a world of one it is a plain file.

    A write that fails (disk full, quota) raises ``SaveFailed`` on every
    rank, naming the folder, the space needed and the space free; the file
    it would have replaced is left whole.

    Args:
        path: The file to write.
        state: What to save (``state.state_dict()``).
        meta: JSON-like facts saved beside it (e.g. the config).

    Returns:
        The path written (``path`` with ``.dcp`` for a sharded model).

    Raises:
        SaveFailed: on every rank, when the file could not be written.

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit.checkpoint import load_checkpoint
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=7)
        >>> path = save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "x.pt", state)
        >>> load_checkpoint(path)["state"]["step"]
        7
    """
    if dist.is_sharded(state.model):
        return save_sharded(Path(path).with_suffix(SHARDED_SUFFIX), state, meta=meta)
    return save_single_file(path, state, meta=meta)

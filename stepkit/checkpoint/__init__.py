"""Checkpoints: atomic saves, safe loads, resume, and which files to keep.

One serializer, ``TrainState.state_dict()``, feeds two formats:

- ``single_file``: ``{"format", "state", "meta"}`` in one ``torch.save``, written
  atomically (temp file, fsync, rename) and read with ``weights_only=True``;
  under DDP rank 0 writes it and every other rank its RNG state beside it.
- ``sharded``: a ``torch.distributed.checkpoint`` folder (FSDP2), every rank
  writing its own shards; its pickled index is read by ``safe_metadata``,
  which rebuilds only DCP's own records.

``resume`` finds and loads the newest of either; ``retention`` decides which
files a run keeps (``last``, periodic, best by a metric). Errors are
``CheckpointError`` (missing, unsafe, corrupt) and its subclass
``CheckpointMismatch`` (readable, but saved from another model).
"""

from stepkit.checkpoint.errors import (
    BEST_INDEX,
    FORMAT,
    LAST,
    SHARDED_SUFFIX,
    CheckpointError,
    CheckpointMismatch,
    SaveFailed,
)
from stepkit.checkpoint.resume import checkpoint_step, has_checkpoint, recover_interrupted_saves, resume
from stepkit.checkpoint.retention import (
    best_checkpoints,
    checkpoint_files,
    maybe_save,
    save_best,
    save_last,
    save_periodic,
)
from stepkit.checkpoint.safe_metadata import SAFE_METADATA_GLOBALS, read_metadata
from stepkit.checkpoint.save import save_checkpoint
from stepkit.checkpoint.sharded import load_sharded, read_info, save_sharded
from stepkit.checkpoint.single_file import load_checkpoint, restore

__all__ = [
    "BEST_INDEX",
    "FORMAT",
    "LAST",
    "SAFE_METADATA_GLOBALS",
    "SHARDED_SUFFIX",
    "CheckpointError",
    "CheckpointMismatch",
    "SaveFailed",
    "best_checkpoints",
    "checkpoint_files",
    "checkpoint_step",
    "has_checkpoint",
    "load_checkpoint",
    "load_sharded",
    "maybe_save",
    "read_info",
    "read_metadata",
    "recover_interrupted_saves",
    "restore",
    "resume",
    "save_best",
    "save_checkpoint",
    "save_last",
    "save_periodic",
    "save_sharded",
]

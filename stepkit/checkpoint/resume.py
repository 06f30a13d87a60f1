"""Resume: find a run's newest checkpoint, in either format, and load it into the state."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from stepkit import dist
from stepkit.checkpoint.errors import (
    BEST_INDEX,
    LAST,
    SHARDED_SUFFIX,
    CheckpointError,
    CheckpointMismatch,
    rank_rng_path,
    restore_rank_part,
)
from stepkit.checkpoint.retention import best_checkpoints
from stepkit.checkpoint.sharded import load_sharded, read_info
from stepkit.checkpoint.single_file import load_checkpoint, restore
from stepkit.state import TrainState

__all__ = ["checkpoint_step", "has_checkpoint", "recover_interrupted_saves", "resume"]


def has_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    """Whether ``ckpt_dir`` holds a ``last.pt`` or a sharded ``last.dcp/`` to resume.

    Examples:
        >>> import tempfile
        >>> has_checkpoint(tempfile.mkdtemp())
        False
    """
    last = Path(ckpt_dir) / LAST
    return last.exists() or last.with_suffix(SHARDED_SUFFIX).exists()


def recover_interrupted_saves(ckpt_dir: str | os.PathLike) -> list[str]:
    """Undo what a save killed midway left in ``ckpt_dir``; return one line per file it touched.

    A single-file save writes ``.<name>.<pid>.tmp`` and renames it over the
    old file; a sharded one writes ``<name>.dcp.tmp/``, then renames the old
    folder to ``<name>.dcp.old`` and the new one into place. A process
    killed on the way leaves the old checkpoint whole and these behind: temp
    files and folders are deleted (never read), and a ``.dcp.old`` whose
    replacement never landed is renamed back. Rank 0 does it, the other
    ranks wait; ``resume`` and ``start_run`` call it before they look.

    Args:
        ckpt_dir: The checkpoints folder.

    Returns:
        What was done, one line per file (printed by rank 0 too).

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / ".last.pt.1234.tmp").write_bytes(b"half a checkpoint")
        >>> done = recover_interrupted_saves(folder)  # doctest: +ELLIPSIS
        /.../.last.pt.1234.tmp: removed, the partial write of a save that was interrupted
        >>> (folder / ".last.pt.1234.tmp").exists()
        False
    """
    import shutil

    folder, done = Path(ckpt_dir), []
    if dist.is_main() and folder.is_dir():
        for old in sorted(folder.glob(f"*{SHARDED_SUFFIX}.old")):
            final = old.with_name(old.name[: -len(".old")])
            if final.exists():  # the new one landed: the old copy is what a killed cleanup left
                shutil.rmtree(old, ignore_errors=True)
                done.append(f"{old}: removed, the previous copy of {final.name}")
            else:
                os.replace(old, final)
                done.append(f"{final}: restored from {old.name} (a save killed between two renames)")
        for partial in sorted([*folder.glob(f"*{SHARDED_SUFFIX}.tmp"), *folder.glob(".*.tmp")]):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
            done.append(f"{partial}: removed, the partial write of a save that was interrupted")
        for line in done:
            print(line, flush=True)
    dist.barrier()
    return done


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint (a single file or a ``.dcp`` folder) was saved at, read without its tensors.

    Raises:
        CheckpointError: naming the file, for one that is not a readable stepkit checkpoint.

    Examples:
        >>> import tempfile
        >>> from stepkit.checkpoint import save_last
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=7)
        >>> checkpoint_step(save_last(tempfile.mkdtemp(), state))
        7
    """
    path = Path(path)
    if path.is_dir():
        step = read_info(path).get("step")
    else:
        try:  # memory-mapped: the tensors are not read
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step = payload["state"]["step"]
        except Exception as err:  # any unreadable file: the full load names the reason
            load_checkpoint(path)
            raise CheckpointError(f"{path}: no step in it ({type(err).__name__})") from None
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{path}: its step is {step!r}, not a whole number")
    return step


def resume(
    ckpt_dir: str | os.PathLike, state: TrainState, *, checkpoint: str | os.PathLike | None = None
) -> bool:
    """Restore ``state`` from ``ckpt_dir/last.pt`` (or the sharded ``last.dcp/``) if there is one;
    return whether it did.

    ``ckpt_dir`` may be a run directory too (its ``checkpoints/`` is used).
    ``checkpoint`` names one checkpoint to load instead of ``last`` (a
    periodic ``step_<N>.pt``, a ``best_<N>.pt``, or a ``.dcp`` folder); it
    must exist. Under torch.distributed every rank calls it and gets its own
    RNG back. A sharded checkpoint loads into FSDP on any world size DCP can
    reshard to, or into a single process. An unreadable ``last.pt`` raises
    ``CheckpointError`` naming the newest checkpoint beside it that still
    loads (to pass as ``checkpoint``, the recipes' ``--resume-from``).

    Examples:
        >>> import tempfile
        >>> from stepkit.checkpoint import save_last
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> folder = tempfile.mkdtemp()
        >>> resume(folder, state)  # nothing saved yet: start fresh
        False
        >>> state.step = 3
        >>> _ = save_last(folder, state)
        >>> state.step = 0
        >>> resume(folder, state), state.step
        (True, 3)
    """
    ckpt_dir = Path(ckpt_dir)
    if checkpoint is not None:
        return _resume_from(Path(checkpoint), state)
    if not (ckpt_dir / LAST).exists() and not (ckpt_dir / LAST).with_suffix(SHARDED_SUFFIX).exists() \
            and (ckpt_dir / "checkpoints").is_dir():
        ckpt_dir = ckpt_dir / "checkpoints"  # handed the run directory
    recover_interrupted_saves(ckpt_dir)
    last = ckpt_dir / LAST
    sharded = last.with_suffix(SHARDED_SUFFIX)
    for path in (last, sharded):
        _refuse_a_link_out(path, ckpt_dir)
    if (ckpt_dir / BEST_INDEX).exists():  # read on the run's first save_best: refuse an edited one now
        best_checkpoints(ckpt_dir)
    if dist.is_sharded(state.model):
        if not sharded.exists():
            if last.exists():
                raise CheckpointError(f"{last}: a single-file checkpoint, but this model is sharded (FSDP): "
                                      "resume it with the strategy it was saved under")
            return False
        return _resume_from(sharded, state)
    if not last.exists():
        if sharded.exists() and dist.world_size() == 1:  # an FSDP run continued in one process
            return _resume_from(sharded, state)
        if sharded.exists():
            raise CheckpointError(f"{sharded}: a sharded (FSDP) checkpoint, but this model is replicated: "
                                  "resume it with --dist.strategy fsdp, or in a single process")
        return False
    return _resume_from(last, state)


def _refuse_a_link_out(path: Path, ckpt_dir: Path) -> None:
    """A run continues from its own files: ``last`` may link within the run, never out of it."""
    if not path.is_symlink():
        return
    target = path.resolve()
    homes = [ckpt_dir.resolve(), (ckpt_dir.resolve().parent if ckpt_dir.name == "checkpoints"
                                  else ckpt_dir.resolve())]
    if not any(target.is_relative_to(home) for home in homes):
        raise CheckpointError(f"{path}: refused: a symbolic link to {target}, outside the run directory "
                              f"{homes[1]}; to continue from that checkpoint, pass it with --resume-from "
                              f"{target}")


def _resume_from(path: Path, state: TrainState) -> bool:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    try:
        if path.is_dir():
            load_sharded(path, state)
            return True
        payload = load_checkpoint(path)
        restore(state, payload, path)
    except CheckpointMismatch:
        raise  # another checkpoint of this run would not fit either
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {_readable_alternative(path)}") from None
    if "rank_parts" in payload:  # every rank's part, saved in the one file
        parts = payload["rank_parts"]
        if not isinstance(parts, list):
            raise CheckpointError(f"{path}: refused: its rank_parts is a {type(parts).__name__}, not a list")
        if 0 < dist.rank() < len(parts):  # a larger world than was saved: the new ranks keep their seeds
            restore_rank_part(state, parts[dist.rank()], path)
        return True
    rank_rng = rank_rng_path(path, dist.rank())  # the format before 2026-12: a file per rank beside it
    if dist.rank() > 0 and rank_rng.exists():
        part = load_checkpoint(rank_rng)
        if part.get("step", state.step) != state.step:  # a run killed between the two files' writes
            raise CheckpointError(f"{rank_rng}: this rank's part is from step {part['step']}, {path.name} "
                                  f"from step {state.step}; {_readable_alternative(path)}")
        restore_rank_part(state, part, rank_rng)
    return True


def _readable_alternative(broken: Path) -> str:
    """Where to go on from an unreadable checkpoint: the newest other one in its folder that loads."""
    candidates = []
    for p in broken.parent.iterdir():
        m = re.fullmatch(r"(?:step|best)_(\d{8,})\.(?:pt|dcp)", p.name)
        if m and p != broken:
            candidates.append((int(m.group(1)), p.name.startswith("step"), p))
    for step, _, p in sorted(candidates, reverse=True):
        try:
            read_info(p) if p.is_dir() else load_checkpoint(p)
        except CheckpointError:
            continue
        return (f"the newest readable checkpoint beside it is {p} (step {step}): "
                f"continue from it with --resume-from {p}")
    return f"no other readable checkpoint in {broken.parent}"


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

import contextlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from stepkit import check as _check
from stepkit import dist
from stepkit._atomic import atomic_save, atomic_write_bytes
from stepkit.state import TrainState, load_extras, rng_state, set_rng_state, target_state_dict, unwrap

FORMAT = "stepkit.checkpoint/1"
LAST = "last.pt"
SHARDED_SUFFIX = ".dcp"
BEST_INDEX = "best.json"
_PERIODIC = re.compile(r"step_(\d{8,})(?:\.rank\d+\.rng)?\.(?:pt|dcp)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unsafe, corrupt, or from another model.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "torn.pt"
        >>> _ = path.write_bytes(b"not a checkpoint")
        >>> try:
        ...     load_checkpoint(path)
        ... except CheckpointError as err:
        ...     print(str(err).startswith(str(path)))
        True
    """


def save_checkpoint(path: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Atomically save ``state`` (and JSON-like ``meta``) to ``path``.

    Under torch.distributed every rank calls it: a replicated model (DDP)
    is written by rank 0 alone, and each other rank writes only its own RNG
    state beside it (``last.rank1.rng.pt``), so a resumed run continues every
    rank's augmentation stream; a sharded model (FSDP2) goes to a
    ``torch.distributed.checkpoint`` folder instead (``last.dcp/``, see
    ``save_sharded``). In a world of one it is a plain file.

    Example:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=7)
        >>> path = save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "x.pt", state)
        >>> load_checkpoint(path)["state"]["step"]
        7
    """
    if dist.is_sharded(state.model):
        return save_sharded(Path(path).with_suffix(SHARDED_SUFFIX), state, meta=meta)
    if dist.world_size() == 1:
        return atomic_save({"format": FORMAT, "state": state.state_dict(), "meta": meta or {}}, path)
    path = Path(path)
    if dist.is_main():
        atomic_save({"format": FORMAT, "state": state.state_dict(), "meta": meta or {}}, path)
    else:
        atomic_save({"format": FORMAT, "rng": rng_state()}, _rank_rng_path(path, dist.rank()))
    dist.barrier()
    return path


def _rank_rng_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}.rng.pt")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; refuse anything unsafe or broken.

    Args:
        path: The checkpoint file.

    Returns:
        The saved payload: ``{"format", "state", "meta", "rng"}`` (tensors on the CPU).

    Raises:
        CheckpointError: naming the file, for a missing, truncated or unsafe (code-running) one.

    Example:
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
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt file ({err})") from None
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
        CheckpointError: naming ``path``, for missing or unexpected keys or a shape mismatch.

    Example:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> path = save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "x.pt",
        ...                        TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=4))
        >>> wider = torch.nn.Linear(3, 1)
        >>> try:
        ...     restore(TrainState(wider, torch.optim.SGD(wider.parameters(), lr=0.1)),
        ...             load_checkpoint(path), path)
        ... except CheckpointError as err:
        ...     print(str(err).replace(str(path), "x.pt"))
        x.pt: was saved from another model: shape mismatch weight: saved (1, 2), here (1, 3)
    """
    saved = payload["state"]
    _check_fits(path, "model", unwrap(state.model).state_dict(), saved.get("model", {}))
    if state.target is not None and "target" in saved:
        _check_fits(path, "target", target_state_dict(state.target), saved["target"])
    try:
        state.load_state_dict(saved)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit this run: {err}") from None


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

    Example:
        >>> import tempfile
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
    last = ckpt_dir / LAST
    sharded = last.with_suffix(SHARDED_SUFFIX)
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


def _resume_from(path: Path, state: TrainState) -> bool:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    try:
        if path.is_dir():
            load_sharded(path, state)
            return True
        restore(state, load_checkpoint(path), path)
    except CheckpointError as err:
        if "does not fit" in str(err) or "saved from another" in str(err):
            raise
        raise CheckpointError(f"{err}; {_readable_alternative(path)}") from None
    rank_rng = _rank_rng_path(path, dist.rank())
    if dist.rank() > 0 and rank_rng.exists():
        set_rng_state(load_checkpoint(rank_rng)["rng"])
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
            if p.is_dir():
                json.loads((p / "state.json").read_text())
            else:
                load_checkpoint(p)
        except (CheckpointError, OSError, ValueError):
            continue
        return (f"the newest readable checkpoint beside it is {p} (step {step}): "
                f"continue from it with --resume-from {p}")
    return f"no other readable checkpoint in {broken.parent}"


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
    """Save ``ckpt_dir/last.pt`` (what ``resume`` continues from).

    Args:
        ckpt_dir: The checkpoint folder.
        state: What to save.
        meta: JSON-like facts saved beside it (e.g. the config).

    Returns:
        The path written.

    Example:
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

    Example:
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
    import shutil

    path.unlink(missing_ok=True)
    for rng in path.parent.glob(f"{path.stem}.rank*.rng.pt"):
        rng.unlink(missing_ok=True)
    shutil.rmtree(path.with_suffix(SHARDED_SUFFIX), ignore_errors=True)


def _prune_periodic(ckpt_dir: Path, keep_last: int) -> None:
    import shutil

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

    Example:
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

    Example:
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

    Example:
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
        elif dist.is_main():
            _link_or_copy(last, _periodic_path(ckpt_dir, state.step))
        else:  # this rank's RNG beside the periodic copy, so that one resumes every rank too
            periodic = _periodic_path(ckpt_dir, state.step)
            _link_or_copy(_rank_rng_path(last, dist.rank()), _rank_rng_path(periodic, dist.rank()))
        if dist.is_main():
            _prune_periodic(Path(ckpt_dir), keep_last)
        dist.barrier()
    return True


# --- sharded checkpoints (FSDP2), with torch.distributed.checkpoint ------------------------------

# Exactly the globals a DCP ``.metadata`` pickle names in the torch versions stepkit supports
# (torch >= 2.4; read from torch/distributed/checkpoint/metadata.py and filesystem.py, and from
# how torch pickles sizes, dtypes, layouts and paths). Nothing by prefix and no dotted names:
# pickle protocol 4 resolves ``module`` + ``a.b.c`` attribute by attribute, so a prefix rule
# reaches whatever an allowed module imports (``os.system`` through ``...filesystem``).
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
SAFE_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *((_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how a torch.layout pickles: a look-up by name
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    *(("pathlib._local", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                             "PureWindowsPath")),  # where Python 3.13 keeps them
    *(("torch", name) for name in (
        "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128",
        "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "qint8", "quint8", "qint32", "quint4x2", "quint2x4")),
})


def _metadata_unpickler(file):
    """A pure-Python unpickler (so BUILD can be checked too) that rebuilds only DCP's records.

    ``find_class`` answers only the exact pairs of ``SAFE_METADATA_GLOBALS``; BUILD (which sets
    an object's state, or calls its ``__setstate__``) is allowed only on instances of DCP's own
    record classes, with a state made of their declared fields.
    """
    import dataclasses

    class Unpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python one: its opcodes can be checked
        dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

        def find_class(self, module: str, name: str):
            if (module, name) not in SAFE_METADATA_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
            return super().find_class(module, name)

        def load_build(self):
            state = self.stack.pop()
            inst = self.stack[-1]
            cls = type(inst)
            if ((cls.__module__, cls.__qualname__) not in SAFE_METADATA_GLOBALS
                    or not dataclasses.is_dataclass(cls)):
                raise pickle.UnpicklingError(f"sets the state of a {cls.__module__}.{cls.__qualname__}, "
                                             "which is not one of DCP's records")
            if "__setstate__" in vars(cls):  # TensorProperties: a tuple of its fields
                if not isinstance(state, tuple):
                    raise pickle.UnpicklingError(f"{cls.__qualname__}: state {type(state).__name__} "
                                                 "is not the tuple its __setstate__ takes")
                inst.__setstate__(state)
                return
            fields = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(state, dict) or not all(isinstance(k, str) and k in fields for k in state):
                raise pickle.UnpicklingError(f"{cls.__qualname__}: state is not a dict of its fields "
                                             f"{sorted(fields)}")
            vars(inst).update(state)

        dispatch[pickle.BUILD[0]] = load_build

    return Unpickler(file)


def _read_metadata(path: Path):
    """``path/.metadata``, rebuilt safely and checked: its storage files must lie inside ``path``."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _metadata_unpickler(f).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a hostile or broken pickle is a refusal
        raise CheckpointError(
            f"{path / '.metadata'}: refused: not a plain checkpoint index ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path / '.metadata'}: refused: it holds a {type(metadata).__name__}, "
                              "not DCP's Metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{path / '.metadata'}: refused: it points at {name!r}, "
                                  "outside the checkpoint's folder")
    return metadata


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        # DCP's own load_bytes unpickles non-tensor values (optimizer hyper-parameters)
        # with weights_only=False; the same, restricted to plain data.
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafePlanner()


def save_sharded(path: str | os.PathLike, state: TrainState, *, meta: dict | None = None) -> Path:
    """Save a sharded (FSDP2) ``state`` into the folder ``path`` with ``torch.distributed.checkpoint``.

    Every rank writes its own shards of the model, optimizer and EMA target
    (never gathered on one rank) and its RNG state; buffers are first made
    equal to rank 0's (``dist.broadcast_buffers``); rank 0 writes
    ``state.json`` (counters, non-tensor extras, the world size). The
    folder is written under a temporary name and renamed into place, so an
    interrupted save leaves the previous checkpoint whole. Outside
    torch.distributed (one process, any model) it writes the same folder.

    Args:
        path: The folder to write (``last.dcp`` in the recipes).
        state: What to save; every rank passes its own shards.
        meta: JSON-like facts saved in ``state.json``.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=5)
        >>> folder = save_sharded(pathlib.Path(tempfile.mkdtemp()) / "last.dcp", state)
        >>> sorted(p.name for p in folder.iterdir())
        ['.metadata', '__0_0.distcp', 'rng_rank0.pt', 'state.json']
    """
    import shutil

    import torch.distributed.checkpoint as dcp

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
    tensors = _sharded_tensors(state)
    with _one_process_is_intended():
        dcp.save(tensors, checkpoint_id=tmp)
    atomic_save({"format": FORMAT, "rng": rng_state()}, tmp / f"rng_rank{dist.rank()}.pt")
    if dist.is_main():
        info = {
            "format": FORMAT, "sharded": True, "world_size": dist.world_size(),
            "step": state.step, "micro_step": state.micro_step, "accum": state.accum,
            "data_position": state.data_position, "run_id": state.run_id, "meta": meta or {},
            "extras": {k: v for k, v in state.extras.items() if not isinstance(v, torch.Tensor)},
        }
        atomic_write_bytes(tmp / "state.json", json.dumps(info).encode())
    dist.barrier()
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


def _sharded_tensors(state: TrainState) -> dict[str, Any]:
    """What DCP saves and loads in place: model, optimizer, EMA target and the tensor extras."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    tensors: dict[str, Any] = {
        "model": model_sd,
        "optimizer": optim_sd,
        "skipped_steps": state.skipped_steps,
        "extras": {k: v for k, v in state.extras.items() if isinstance(v, torch.Tensor)},
    }
    if isinstance(state.target, torch.nn.Module):
        tensors["target"] = get_model_state_dict(state.target)
    elif state.target is not None:
        tensors["target"] = dict(state.target)
    return tensors


def load_sharded(path: str | os.PathLike, state: TrainState) -> None:
    """Load a ``save_sharded`` folder into a sharded ``state`` (any world size DCP can reshard to).

    Only DCP's own metadata records are unpickled (``SAFE_METADATA_GLOBALS``):
    a ``.metadata`` file that would run code is refused. A folder saved by
    FSDP ranks loads into one process too.

    Args:
        path: The folder ``save_sharded`` wrote.
        state: The run's state (sharded as it will train), loaded in place.

    Raises:
        CheckpointError: naming the folder, for an incomplete or unsafe one or one that does not fit.

    Example:
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
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    try:
        info = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a complete sharded checkpoint ({err})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stepkit checkpoint (format {info.get('format')!r})")
    tensors = _sharded_tensors(state)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process_is_intended():
            dcp.load(tensors, storage_reader=_safe_reader(path), planner=_safe_planner())
    except CheckpointError:
        raise
    except (CheckpointException, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        refused = re.search(r"refused: [^\n]*", str(err))  # DCP wraps the reader's error in its own
        if refused:
            raise CheckpointError(f"{path / '.metadata'}: {refused.group(0)}") from None
        raise CheckpointError(f"{path}: does not fit this run: {err}") from None
    set_state_dict(state.model, state.optimizer, model_state_dict=tensors["model"],
                   optim_state_dict=tensors["optimizer"])
    if isinstance(state.target, torch.nn.Module):
        set_model_state_dict(state.target, tensors["target"])
    state.step, state.micro_step = int(info["step"]), int(info["micro_step"])
    state.accum, state.data_position = int(info["accum"]), int(info["data_position"])
    state.run_id = info["run_id"]
    state.extras = load_extras(state.extras, {**info["extras"], **tensors["extras"]})
    state.grad_norm = None
    rng = path / f"rng_rank{dist.rank()}.pt"
    if rng.exists():  # a different world size: the new ranks keep their seeds
        set_rng_state(load_checkpoint(rng)["rng"])

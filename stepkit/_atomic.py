"""Atomic file writes: readers see the old file or the new one, never a mix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_bytes", "atomic_save"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    _atomic(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    A failed write (disk full, quota, file size limit) raises its ``OSError``,
    which ``torch.save`` would otherwise turn into an opaque ``RuntimeError``.
    """
    def write(f) -> None:
        recording = _RecordingWriter(f)
        try:
            torch.save(obj, recording)  # type: ignore[arg-type]  # it has write and flush
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise

    return _atomic(Path(path), write)


class _RecordingWriter:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write (its C++ writer drops it)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

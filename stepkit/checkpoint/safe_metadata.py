"""Reading a sharded checkpoint's index without running code.

``torch.distributed.checkpoint`` keeps a folder's index (``.metadata``) as a
pickle, and unpickles the non-tensor values it saved (optimizer
hyper-parameters, counters) with ``weights_only=False``. Both are replaced
here: the index is rebuilt by an unpickler that knows only DCP's own record
classes, and values load with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from stepkit.checkpoint.errors import CheckpointError

__all__ = ["SAFE_METADATA_GLOBALS", "read_metadata", "safe_planner", "safe_reader"]

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


def read_metadata(path: Path) -> Any:
    """``path/.metadata``, rebuilt safely and checked: its storage files must lie inside ``path``.

    Args:
        path: A sharded checkpoint folder.

    Returns:
        DCP's ``Metadata`` record.

    Raises:
        CheckpointError: naming the file, for an index that names anything but DCP's records, or
            points at a storage file outside ``path``.

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_sharded
        >>> model = torch.nn.Linear(2, 1)
        >>> folder = save_sharded(pathlib.Path(tempfile.mkdtemp()) / "last.dcp",
        ...                       TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1)))
        >>> type(read_metadata(folder)).__name__
        'Metadata'
    """
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


def safe_reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` of ``path`` whose index is read by ``read_metadata``.

    Examples:
        >>> import pathlib
        >>> type(safe_reader(pathlib.Path("last.dcp"))).__name__
        'SafeReader'
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def safe_planner() -> Any:
    """DCP's default load planner, loading non-tensor values with ``weights_only=True``.

    Examples:
        >>> type(safe_planner()).__name__
        'SafePlanner'
    """
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



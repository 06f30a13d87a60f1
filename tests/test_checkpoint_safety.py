"""Hostile checkpoint files: nothing in them may run code, and every refusal names the file.

The sharded (DCP) format keeps its index as a pickle. These tests build hostile ``.metadata``
files opcode by opcode (pickle's own GLOBAL / STACK_GLOBAL / REDUCE / INST / OBJ / NEWOBJ /
BUILD) and check each is refused with ``CheckpointError``, runs nothing, creates no file and
leaves the checkpoint as it was.
"""

import hashlib
import importlib
import io
import pickle
import shutil
import types

import pytest
import torch

from stepkit import TrainState
from stepkit.checkpoint import (
    SAFE_METADATA_GLOBALS,
    CheckpointError,
    best_checkpoints,
    load_sharded,
    save_best,
    save_sharded,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def fresh(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1))


@pytest.fixture(scope="session")
def genuine(tmp_path_factory):
    state = fresh()
    state.model(torch.randn(4, 3)).sum().backward()
    state.optimizer.step()
    state.step = 5
    return save_sharded(tmp_path_factory.mktemp("ckpt") / "last.dcp", state)


def folder_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def s(text):  # a protocol-0 string argument
    return f"S'{text}'\n".encode()


def u(text):  # a protocol-4 SHORT_BINUNICODE
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def route_to_os_system(module_name):
    """A dotted name that reaches os.system from the module, if the module imports os."""
    module = importlib.import_module(module_name)
    for attr, value in vars(module).items():
        if isinstance(value, types.ModuleType) and value.__name__ in ("os", "posix"):
            return f"{attr}.system"
    return "__class__.__init__"  # still a dotted name: must be refused all the same


def importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


ALLOWED_MODULES = sorted({m for m, _ in SAFE_METADATA_GLOBALS if importable(m)})


def hostile_payloads(marker):
    cmd = f"touch {marker}"
    out = {
        "REDUCE on os.system (GLOBAL, protocol 0)": b"cos\nsystem\n(" + s(cmd) + b"tR.",
        "REDUCE on builtins.eval (STACK_GLOBAL)": b"\x80\x04" + u("builtins") + u("eval") + b"\x93"
                                                   + u(f"__import__('os').system('{cmd}')") + b"\x85R.",
        "INST of os.system": b"(" + s(cmd) + b"ios\nsystem\n.",
        "OBJ of os.system": b"(cos\nsystem\n" + s(cmd) + b"o.",
        "NEWOBJ of subprocess.Popen": b"\x80\x02csubprocess\nPopen\n(" + s(cmd) + b"t\x81.",
        "BUILD: TensorProperties.__setstate__ given a dict": (
            b"\x80\x04" + u("torch.distributed.checkpoint.metadata") + u("TensorProperties") + b"\x93"
            + b")\x81}" + u("dtype") + b"K\x01sb."),
        "BUILD: a __setstate__ planted in a record's dict, then called": (
            b"\x80\x04" + u("torch.distributed.checkpoint.metadata") + u("MetadataIndex") + b"\x93"
            + b")\x81}" + u("__setstate__") + u("torch") + u("Size") + b"\x93sb" + b"(K\x01tb."),
    }
    for module in ALLOWED_MODULES:
        dotted = route_to_os_system(module)
        for proto in (0, 2, 3):
            head = b"" if proto == 0 else b"\x80" + bytes([proto])
            out[f"GLOBAL {module} {dotted}, protocol {proto}"] = (
                head + f"c{module}\n{dotted}\n".encode() + b"(" + s(cmd) + b"tR.")
        out[f"GLOBAL {module} {dotted}, protocol 4"] = (
            b"\x80\x04" + f"c{module}\n{dotted}\n".encode() + b"(" + s(cmd) + b"tR.")
        out[f"STACK_GLOBAL {module} {dotted}"] = (
            b"\x80\x04" + u(module) + u(dotted) + b"\x93" + u(cmd) + b"\x85R.")
    return out


def test_every_payload_is_a_valid_pickle_that_would_run_without_a_guard(tmp_path):
    # The payloads are real attacks, not malformed bytes: the plain unpickler runs the first one.
    kinds = ("REDUCE on os.system (GLOBAL, protocol 0)",
             "STACK_GLOBAL torch.distributed.checkpoint.filesystem os.system")  # the old prefix rule's hole
    for i, kind in enumerate(kinds):
        marker = tmp_path / f"ran{i}"
        pickle.loads(hostile_payloads(marker)[kind])
        assert marker.exists()


@pytest.mark.parametrize("kind", sorted(hostile_payloads("X")))
def test_hostile_metadata_is_refused_and_runs_nothing(kind, genuine, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "last.dcp"
    shutil.copytree(genuine, ckpt)
    (ckpt / ".metadata").write_bytes(hostile_payloads(marker)[kind])
    before = folder_digest(tmp_path)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
        load_sharded(ckpt, fresh(1))
    assert not marker.exists()
    assert folder_digest(tmp_path) == before  # nothing created, nothing changed
    other = fresh(2)
    load_sharded(genuine, other)  # the genuine checkpoint still loads
    assert other.step == 5


def test_metadata_that_points_outside_its_folder_is_refused(genuine, tmp_path):
    from stepkit.checkpoint import read_metadata

    ckpt = tmp_path / "last.dcp"
    shutil.copytree(genuine, ckpt)
    metadata = read_metadata(ckpt)
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint's folder"):
        load_sharded(ckpt, fresh(1))


def test_the_allowed_globals_are_exactly_the_pinned_list():
    # Pinned so that widening the set is a visible decision. Read from torch's
    # distributed/checkpoint/metadata.py and filesystem.py (torch 2.4 to 2.13).
    records = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    records.add(("torch.distributed.checkpoint.filesystem", "_StorageInfo"))
    plain = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    paths = {(m, n) for m in ("pathlib", "pathlib._local")
             for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
    dtypes = {(m, n) for m, n in SAFE_METADATA_GLOBALS if m == "torch" and n != "Size"}
    assert all(isinstance(getattr(torch, n, torch.float32), torch.dtype) for _, n in dtypes)
    assert SAFE_METADATA_GLOBALS == records | plain | paths | dtypes
    assert not any("." in name for _, name in SAFE_METADATA_GLOBALS)  # no dotted names at all


def test_a_genuine_checkpoint_names_only_allowed_globals(genuine):
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO((genuine / ".metadata").read_bytes())).load()
    assert seen and seen <= SAFE_METADATA_GLOBALS


def test_an_edited_best_index_cannot_point_outside_its_folder(tmp_path):
    ckpt = tmp_path / "checkpoints"
    state = fresh()
    state.step = 3
    save_best(ckpt, state, 0.5, keep_best=1)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (ckpt / "best.json").write_text('[{"file": "../precious.txt", "step": 1, "value": 0.1}]')
    state.step = 4
    with pytest.raises(CheckpointError, match="best.json: refused"):
        save_best(ckpt, state, 0.9, keep_best=1)
    assert victim.read_text() == "keep me"
    (ckpt / "best.json").write_text("not json")
    with pytest.raises(CheckpointError, match="best.json: not a readable index"):
        best_checkpoints(ckpt)

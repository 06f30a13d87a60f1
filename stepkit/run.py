"""The run directory every recipe writes, and the config pieces every recipe's CLI shares.

A run writes into ``--run-dir DIR``::

    config.json      the resolved config
    metrics.jsonl    one JSON object per log event, always with "step"
    checkpoints/     last.pt, the best N by a metric, periodic saves
    tb/              TensorBoard events (--log.tensorboard)
    wandb/           wandb's files (--log.wandb; WANDB_MODE=offline works)
    summary.json     final metrics, evaluation results, wall_s, steps, params_digest

``--resume`` continues from ``DIR/checkpoints/last.pt``. A fresh run refuses
a directory that already holds a run, so nothing on disk is overwritten.
The shared flags: ``--run-dir --resume --device --amp --train.steps
--train.seed --train.accum --log.every --log.tensorboard --log.wandb
--ckpt.every --ckpt.keep-best`` (and ``--optim.lr`` from the recipe's optim).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from stepkit import _check, dist
from stepkit._atomic import atomic_write_bytes
from stepkit.checkpoint import LAST
from stepkit.state import unwrap

Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["none", "bf16", "fp16"]
CONFIG_FILE, SUMMARY_FILE, CKPT_DIR = "config.json", "summary.json", "checkpoints"


@dataclass
class TrainConfig:
    """The run's length and randomness (``--train.steps``, ``--train.seed``, ``--train.accum``)."""

    steps: int = 300
    """Optimizer updates in the run."""
    seed: int = 0
    """Seeds python, numpy and torch."""
    accum: int = 1
    """Micro-batches accumulated into one update."""

    def __post_init__(self) -> None:
        _check.integer_at_least("steps", self.steps, 1)
        _check.integer_at_least("seed", self.seed, 0)
        _check.integer_at_least("accum", self.accum, 1)


@dataclass
class CkptConfig:
    """Which checkpoints to write (``--ckpt.every``, ``--ckpt.keep-best``)."""

    every: int = 100
    """Updates between two saves of last.pt (0: only at the end)."""
    keep_last: int = 1
    """Periodic step_<N>.pt files to keep besides last.pt (0: none)."""
    keep_best: int = 1
    """Best checkpoints to keep by ``metric`` (0: none)."""
    metric: str = "loss"
    """The summary metric that ranks best checkpoints."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher ``metric`` is better."""

    def __post_init__(self) -> None:
        _check.integer_at_least("every", self.every, 0)
        _check.integer_at_least("keep_last", self.keep_last, 0)
        _check.integer_at_least("keep_best", self.keep_best, 0)
        _check.one_of("mode", self.mode, ("min", "max"))


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    _check.one_of("device", name, ("auto", "cpu", "cuda"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' is not allowed here: no CUDA device is available; use 'cpu' or 'auto'"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_jsonable(obj: Any) -> Any:
    """A config dataclass as JSON-ready values (paths and enums as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.name
    return obj


def start_run(run_dir: str | os.PathLike, config: Any, *, resume: bool) -> Path:
    """Create or reopen ``run_dir`` and write ``config.json``; return ``run_dir/checkpoints``.

    A fresh run (``resume=False``) refuses a folder that already holds a run
    (a checkpoint or a metrics file), naming ``--resume`` and ``--run-dir``.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CKPT_DIR
    if not resume and ((ckpt_dir / LAST).exists() or (run_dir / "metrics.jsonl").exists()):
        raise ValueError(
            f"run_dir={str(run_dir)!r} is not allowed: it already holds a run; "
            "pass --resume to continue it, or choose another --run-dir"
        )
    # Every rank checks (and so raises alike); rank 0 writes, the others wait for the folder.
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / CONFIG_FILE, json.dumps(to_jsonable(config), indent=2).encode() + b"\n")
    dist.barrier()
    return ckpt_dir


def params_digest(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state_dict's names and tensors' bytes in key order: equal iff bit-identical.

    FSDP2 shards are gathered first (a collective: call it on every rank).
    """
    state = unwrap(model).state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name, tensor in state.items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``run_dir/summary.json`` atomically (rank 0 only under torch.distributed)."""
    path = Path(run_dir) / SUMMARY_FILE
    if dist.is_main():
        atomic_write_bytes(path, json.dumps(to_jsonable(summary), indent=2).encode() + b"\n")
    return path


def cli(config_type: type, presets: Mapping[str, tuple[str, Any]], argv: list[str] | None = None,
        description: str | None = None) -> Any:
    """Parse ``[PRESET] [--flags]``: an optional preset name first picks the defaults, flags override.

    ``presets`` maps a name to ``(one-line description, config instance)``;
    the first is the default. ``--help`` lists them. The presets are not
    modified.
    """
    import copy
    import sys

    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    names = list(presets)
    chosen = argv.pop(0) if argv and argv[0] in presets else names[0]
    listing = "\n".join(f"  {name}: {doc}" for name, (doc, _) in presets.items())
    text = f"{description or ''}\n\nPresets (an optional first argument; default {names[0]}):\n{listing}"
    default = copy.deepcopy(presets[chosen][1])
    return tyro.cli(config_type, default=default, args=argv, description=text.strip())

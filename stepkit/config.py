"""The config pieces every recipe shares, and how a config is read and written as data.

A recipe's ``Config`` is a tree of dataclasses that tyro turns into flags.
It inherits ``RunArgs`` (``--run-dir``, ``--resume`` ...) and holds
``TrainConfig`` (``--train.*``) and ``CkptConfig`` (``--ckpt.*``). A field
a resumed run may set differently (where it logs, how often it saves) says
so where it is defined: ``may_change_on_resume(default)``, or a config class
with ``MAY_CHANGE_ON_RESUME = True`` for all of its fields.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from stepkit import check as _check

__all__ = ["INVOCATION_FIELDS", "RESUME_MAY_CHANGE", "Amp", "BestCkptConfig", "CkptConfig", "Device",
           "PATTERN_FIELDS", "RunArgs", "TrainConfig", "absolute_paths", "config_yaml", "field_docs",
           "flat_config", "may_change_on_resume",
           "resume_free_fields", "to_jsonable"]

Device = Literal["auto", "cpu", "cuda"]

Amp = Literal["none", "bf16", "fp16"]


RESUME_MAY_CHANGE = "stepkit.may_change_on_resume"
"""The dataclass field metadata key that ``may_change_on_resume`` sets."""


def may_change_on_resume(default: Any = dataclasses.MISSING, *,
                         default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that a resumed run may set differently without breaking it.

    Use it for fields that change where or how often a run logs, saves or
    evaluates, or where it runs; ``start_run`` refuses a resume that changes
    any other field unless ``--resume-allow`` names it. A config class whose
    fields all may change sets ``MAY_CHANGE_ON_RESUME = True`` instead.

    Args:
        default: The field's default.
        default_factory: Or a factory for it (as ``dataclasses.field`` takes).

    Returns:
        A ``dataclasses.field`` marked with ``RESUME_MAY_CHANGE``.

    Examples:
        >>> @dataclass
        ... class Eval:
        ...     every: int = may_change_on_resume(0)
        ...     k: int = 20
        >>> resume_free_fields(Eval())
        ['every']
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RESUME_MAY_CHANGE: True})


@dataclass
class TrainConfig:
    """The run's length and randomness (``--train.steps``, ``--train.seed``, ``--train.accum``), and when
    a broken run stops (``--train.max-skipped``).

    Examples:
        >>> TrainConfig(steps=100).seed
        0
    """

    steps: int = 300
    """Optimizer updates in the run."""
    seed: int = 0
    """Seeds python, numpy and torch."""
    accum: int = 1
    """Micro-batches accumulated into one update."""
    max_skipped: int = may_change_on_resume(100)
    """Stop the run (exit code 65) after this many non-finite, skipped updates in a row, naming the
    first non-finite term and the checkpoint to go back to (0: never stop)."""

    def __post_init__(self) -> None:
        _check.integer_at_least("steps", self.steps, 1)
        _check.integer_at_least("seed", self.seed, 0)
        _check.integer_at_least("accum", self.accum, 1)
        _check.integer_at_least("max_skipped", self.max_skipped, 0)

@dataclass
class CkptConfig:
    """Which checkpoints to write (``--ckpt.every``, ``--ckpt.keep-last``).

    Examples:
        >>> CkptConfig(every=50).every
        50
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True
    """Every field may differ on --resume (how often and how many checkpoints are written)."""

    every: int = 100
    """Updates between two saves of last.pt (0: only at the end)."""
    keep_last: int = 1
    """Periodic step_<N>.pt files to keep besides last.pt (0: none)."""

    def __post_init__(self) -> None:
        _check.integer_at_least("every", self.every, 0)
        _check.integer_at_least("keep_last", self.keep_last, 0)


@dataclass
class BestCkptConfig(CkptConfig):
    """``CkptConfig`` and ``--ckpt.keep-best``, for a recipe that ranks its checkpoints by a validation
    metric of its own (the autoencoder: the validation loss). A recipe without one takes ``CkptConfig``,
    so no flag is accepted that does nothing.

    Examples:
        >>> BestCkptConfig(keep_best=3).keep_best
        3
    """

    keep_best: int = 1
    """Best checkpoints to keep by the recipe's validation metric (0: none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check.integer_at_least("keep_best", self.keep_best, 0)


@dataclass
class RunArgs:
    """The flags every recipe shares: ``--run-dir``, ``--resume`` and its options, ``--threads``.

    A recipe's ``Config`` inherits them (and may redefine ``run_dir``'s default).

    Examples:
        >>> RunArgs().resuming
        False
    """

    run_dir: Path = Path("runs/run")
    """Where config.json, metrics.jsonl, checkpoints/ and summary.json go."""
    resume: bool = False
    """Continue the run in RUN_DIR from its last checkpoint (refused when RUN_DIR has none)."""
    resume_from: Path | None = None
    """Continue from this checkpoint (a step_/best_ .pt file or a .dcp folder) instead of
    RUN_DIR/checkpoints/last.pt; implies --resume."""
    resume_allow: tuple[str, ...] = ()
    """Config fields a resumed run may change on purpose (e.g. train.steps to extend it); each
    change is appended to RUN_DIR/config_history.jsonl, config.json stays as it was."""
    resume_or_start: bool = False
    """Continue the run in RUN_DIR from its last checkpoint if it has one, else start it there: the
    flag for a job that is requeued or restarted by torchrun --max-restarts."""
    stop_on_signal: bool = True
    """On SIGTERM, SIGUSR1 or Ctrl-C: finish the update, save last, exit 75 (see StopSignals)."""
    threads: int = may_change_on_resume(0)
    """torch's CPU threads; 0: torch's choice, less one per DataLoader worker on a CPU (see
    stepkit.run.set_threads). A resume under another count goes on, but not bit for bit."""

    @property
    def resuming(self) -> bool:
        """Whether this run continues a saved one: ``--resume``, ``--resume-from``, or
        ``--resume-or-start`` where RUN_DIR holds a checkpoint."""
        if self.resume or self.resume_from is not None:
            return True
        ckpt = Path(self.run_dir) / "checkpoints"
        return self.resume_or_start and any(
            (ckpt / name).exists() for name in ("last.pt", "last.dcp", "last.dcp.old"))

def to_jsonable(obj: Any) -> Any:
    """A config dataclass as JSON-ready values (paths and enums as strings).

    Examples:
        >>> to_jsonable({"run_dir": Path("runs/x"), "steps": (1, 2)})
        {'run_dir': 'runs/x', 'steps': [1, 2]}
    """
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


# String fields that hold a brace pattern of files (tar shards); made absolute as paths are.
PATTERN_FIELDS = ("shards", "val_shards")


def absolute_paths(config: Any, *, top: bool = True) -> Any:
    """``config`` with its sections' relative paths that exist made absolute, as ``config.json`` keeps them.

    A run evaluated (``stepkit eval``) or resumed from another folder then reads the same files. Only
    paths that name an existing file or folder change (a shard pattern: when its folder exists), so a
    missing path's error still names what was typed, and ``--init.from timm:NAME`` stays a name. The
    run's own flags at the top level (``--run-dir``, ``--resume-from``) stay as given.

    Examples:
        >>> import dataclasses, os, tempfile
        >>> @dataclasses.dataclass
        ... class Data:
        ...     root: Path | None = None
        ...     shards: str | None = None
        >>> @dataclasses.dataclass
        ... class Config:
        ...     run_dir: Path = Path("runs/x")
        ...     data: Data = dataclasses.field(default_factory=Data)
        >>> here = os.getcwd(); os.chdir(tempfile.mkdtemp()); os.makedirs("photos")
        >>> cfg = absolute_paths(Config(data=Data(root=Path("photos"), shards="gone/{0..1}.tar")))
        >>> cfg.data.root == Path.cwd() / "photos", cfg.data.shards, cfg.run_dir
        (True, 'gone/{0..1}.tar', PosixPath('runs/x'))
        >>> os.chdir(here)
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = absolute_paths(value, top=False)
        elif top:
            continue
        elif isinstance(value, Path) and not value.is_absolute() and value.exists():
            changes[f.name] = Path(os.path.abspath(value))
        elif (f.name in PATTERN_FIELDS and isinstance(value, str) and "://" not in value
              and not os.path.isabs(value) and os.path.isdir(os.path.dirname(value.split("{")[0]) or ".")):
            changes[f.name] = os.path.abspath(value)
    return dataclasses.replace(config, **changes) if changes else config


def flat_config(config: Any) -> dict[str, Any]:
    """A config (dataclass or mapping) as ``{"dotted.field": JSON value}``; lists stay values.

    Examples:
        >>> flat_config({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "steps": 5})
        {'optim.lr': 0.1, 'optim.betas': [0.9, 0.99], 'steps': 5}
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", json.loads(json.dumps(to_jsonable(config))))
    return out



def resume_free_fields(config: Any, prefix: str = "") -> list[str]:
    """The dotted names (or prefixes) of every field of ``config`` that a resumed run may change.

    Args:
        config: A config dataclass instance (nested ones are walked).
        prefix: Prepended to every name (used by the recursion).

    Returns:
        Names such as ``device`` and ``eval.every``, and prefixes such as ``log`` for a
        nested config class with ``MAY_CHANGE_ON_RESUME = True``.

    Examples:
        >>> @dataclass
        ... class Config:
        ...     ckpt: CkptConfig = dataclasses.field(default_factory=CkptConfig)
        ...     device: str = may_change_on_resume("cpu")
        ...     train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
        >>> resume_free_fields(Config())
        ['ckpt', 'device', 'train.max_skipped']
    """
    if getattr(type(config), "MAY_CHANGE_ON_RESUME", False):
        return [prefix]
    names = []
    for f in dataclasses.fields(config):
        name = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(config, f.name)
        if f.metadata.get(RESUME_MAY_CHANGE):
            names.append(name)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            names += resume_free_fields(value, name)
    return names


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``), its bases'
    too: what tyro shows in ``--help``, read from the source (empty where it cannot be read).

    Examples:
        >>> field_docs(TrainConfig)["steps"]
        'Optimizer updates in the run.'
    """
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs

def config_yaml(config: Any, header: str = "") -> str:
    """``config`` (a dataclass) as an editable YAML file for ``--config``: every field, nested as the
    flags are, each with its ``--help`` text as a comment; ``--config`` reads it back to the same config.

    Examples:
        >>> print(config_yaml(CkptConfig(every=5)).splitlines()[0])  # doctest: +ELLIPSIS
        every: 5...
    """
    import yaml

    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    def walk(obj: Any, indent: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            if f.name in INVOCATION_FIELDS:
                continue
            value = getattr(obj, f.name)
            doc = f"  # {docs[f.name]}" if docs.get(f.name) else ""
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                lines.append(f"{indent}{f.name}:{doc}")
                walk(value, indent + "  ")
            else:
                lines.append(f"{indent}{f.name}: {scalar(to_jsonable(value))}{doc}")

    walk(config, "")
    return "\n".join(lines) + "\n"

# Fields that describe one invocation, not the run: a run's config.json read back with --config skips them.
INVOCATION_FIELDS = ("resume", "resume_from", "resume_allow", "resume_or_start")

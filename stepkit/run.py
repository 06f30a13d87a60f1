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

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import os
import random
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from stepkit import check as _check
from stepkit import dist
from stepkit._atomic import atomic_write_bytes
from stepkit.checkpoint import LAST, has_checkpoint
from stepkit.state import unwrap

Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["none", "bf16", "fp16"]
CONFIG_FILE, SUMMARY_FILE, CKPT_DIR = "config.json", "summary.json", "checkpoints"


@dataclass
class TrainConfig:
    """The run's length and randomness (``--train.steps``, ``--train.seed``, ``--train.accum``).

    Example:
        >>> TrainConfig(steps=100).seed
        0
    """

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
    """Which checkpoints to write (``--ckpt.every``, ``--ckpt.keep-best``).

    Example:
        >>> CkptConfig(every=50).every
        50
    """

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
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``).

    Returns:
        The device.

    Raises:
        ValueError: for ``cuda`` on a machine without a GPU.

    Example:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    _check.one_of("device", name, ("auto", "cpu", "cuda"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' is not allowed here: no CUDA device is available; use 'cpu' or 'auto'"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CUDA included).

    Example:
        >>> seed_everything(0); a = torch.rand(1)
        >>> seed_everything(0); torch.equal(a, torch.rand(1))
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_jsonable(obj: Any) -> Any:
    """A config dataclass as JSON-ready values (paths and enums as strings).

    Example:
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


# Config fields a resumed run may change without breaking it: where and how often it logs,
# saves and evaluates, and where it runs. Everything else (model, data, batch size, run length,
# seed, loss, optimizer, ...) must match the saved config unless ``allow`` names it.
MAY_CHANGE_ON_RESUME = ("device", "log.*", "ckpt.*", "eval.every", "data.workers", "compile", "dist.*",
                        "mask_image_every", "tune.*")
# The resume flags themselves: never compared, never recorded.
_RUN_FLAGS = ("run_dir", "resume", "resume_from", "resume_allow", "resume_or_start", "stop_on_signal")
HISTORY_FILE = "config_history.jsonl"


@dataclass
class RunArgs:
    """The run-directory flags every recipe shares: ``--run-dir``, ``--resume`` and its options.

    A recipe's ``Config`` inherits them (and may redefine ``run_dir``'s default).

    Example:
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
    """With --resume: start a fresh run when RUN_DIR holds no checkpoint yet (requeued jobs)."""
    stop_on_signal: bool = True
    """On SIGTERM, SIGUSR1 or Ctrl-C: finish the update, save last, exit 75 (see StopSignals)."""

    @property
    def resuming(self) -> bool:
        """Whether this run continues a saved one (``--resume`` or ``--resume-from``)."""
        return self.resume or self.resume_from is not None


def flat_config(config: Any) -> dict[str, Any]:
    """A config (dataclass or mapping) as ``{"dotted.field": JSON value}``; lists stay values.

    Example:
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


def _matches(field: str, patterns: Any) -> bool:
    import fnmatch

    return any(field == p or field.startswith(p + ".") or fnmatch.fnmatchcase(field, p) for p in patterns)


def saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The config a run directory's run is under now: ``config.json`` with every change from
    ``config_history.jsonl`` applied, flattened as ``flat_config``; None without a config.json.

    Example:
        >>> import tempfile
        >>> saved_config(tempfile.mkdtemp()) is None  # no run there
        True
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = flat_config(json.loads(path.read_text()))
        history = run_dir / HISTORY_FILE
        for line in history.read_text().splitlines() if history.exists() else []:
            if line.strip():
                for name, (_, new) in json.loads(line)["changes"].items():
                    config[name] = new
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read the saved config to compare the resumed run with "
                         f"({type(err).__name__}: {err})") from None
    return config


def config_changes(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, given)}`` for every flattened field that differs (resume flags ignored).

    Example:
        >>> config_changes({"optim.lr": 0.1, "steps": 5}, {"optim.lr": 0.2, "steps": 5})
        {'optim.lr': (0.1, 0.2)}
    """
    return {k: (saved.get(k, _ABSENT), given.get(k, _ABSENT)) for k in sorted(saved.keys() | given.keys())
            if not _matches(k, _RUN_FLAGS) and saved.get(k, _ABSENT) != given.get(k, _ABSENT)}


_ABSENT = "<absent>"


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {json.dumps(a)} → {json.dumps(b)}" for k, (a, b) in changes.items())


def start_run(
    run_dir: str | os.PathLike,
    config: Any,
    *,
    resume: bool,
    resume_from: str | os.PathLike | None = None,
    allow: Any = (),
    or_start: bool = False,
) -> Path:
    """Check ``run_dir`` for a fresh or a resumed run; return ``run_dir/checkpoints``.

    A fresh run (``resume=False``) refuses a folder that already holds a run
    (a checkpoint or a metrics file), naming ``--resume`` and ``--run-dir``,
    and writes ``config.json``.

    A resumed run writes nothing here (``record_resume`` does, once the
    checkpoint has loaded). It needs a checkpoint (``last.pt``/``last.dcp``,
    or ``resume_from``); without one it is refused, or with ``or_start``
    starts fresh. Its config is compared with the saved one (``config.json``
    plus ``config_history.jsonl``): a differing field that shapes the run
    raises ``ValueError`` listing every such field as ``name: saved → given``;
    fields matching ``MAY_CHANGE_ON_RESUME`` or ``allow`` (exact names,
    prefixes such as ``train``, or globs) may differ and are printed in one
    line. Every rank checks, so under torchrun every rank raises alike.

    Args:
        run_dir: The run directory.
        config: The run's config (a dataclass), saved as ``config.json``.
        resume: Continue the run there (``--resume``).
        resume_from: Resume from this checkpoint instead of ``last``.
        allow: Fields that may differ on resume (names, prefixes or globs).
        or_start: With ``resume``, start fresh when there is no checkpoint.

    Returns:
        ``run_dir/checkpoints``.

    Raises:
        ValueError: one line naming the flag to use, for a fresh run over an old one, a resume without a
            checkpoint, or a resume whose config differs in a field that shapes the run.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> start_run(run, TrainConfig(steps=10), resume=False).name, (run / "config.json").exists()
        ('checkpoints', True)
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CKPT_DIR
    given = flat_config(config)
    for name in allow:
        if not any(_matches(k, [name]) for k in given):
            import difflib

            close = difflib.get_close_matches(name, list(given), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            _check.fail("resume_allow", name, f"names of config fields such as train.steps{hint}")
    if resume and resume_from is not None and not Path(resume_from).exists():
        _check.fail("resume_from", str(resume_from), "an existing checkpoint file or .dcp folder")
    if resume and resume_from is None and not has_checkpoint(ckpt_dir):
        if not or_start:
            raise ValueError(
                f"run_dir={str(run_dir)!r}: --resume found no checkpoint to continue (no {ckpt_dir / LAST}); "
                "check --run-dir, or pass --resume-or-start to start a fresh run there when it has none")
        resume = False  # a requeued job whose first attempt saved nothing: start over
    else:
        if not resume and (has_checkpoint(ckpt_dir) or (run_dir / "metrics.jsonl").exists()):
            raise ValueError(
                f"run_dir={str(run_dir)!r} is not allowed: it already holds a run; "
                "pass --resume to continue it, or choose another --run-dir"
            )
    if resume:
        saved = saved_config(run_dir)
        changes = config_changes(saved, given) if saved is not None else {}
        # A field only one side has comes from another stepkit or recipe version (a field added
        # or removed since): nothing to compare, so it is listed, not refused.
        refused = {k: v for k, v in changes.items() if _ABSENT not in v
                   and not _matches(k, MAY_CHANGE_ON_RESUME) and not _matches(k, allow)}
        if refused:
            raise ValueError(
                f"run_dir={str(run_dir)!r} cannot resume with another config: {_describe(refused)} "
                "(saved → given; these fields shape the run: pass them as saved, or --resume-allow "
                "FIELD to change one on purpose, or choose another --run-dir)")
        if changes and dist.is_main():
            print(f"resume: changed on purpose or allowed: {_describe(changes)}")
        return ckpt_dir
    # Every rank checks (and so raises alike); rank 0 writes, the others wait for the folder.
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, config)
    dist.barrier()
    return ckpt_dir


def _write_config(run_dir: Path, config: Any) -> None:
    atomic_write_bytes(run_dir / CONFIG_FILE, json.dumps(to_jsonable(config), indent=2).encode() + b"\n")


def record_resume(run_dir: str | os.PathLike, config: Any, step: int) -> dict[str, tuple[Any, Any]]:
    """After a resumed checkpoint has loaded: append the config's changes to ``config_history.jsonl``.

    ``config.json`` is never rewritten; each resume that changed anything
    adds one line ``{"step", "time", "changes": {field: [saved, given]}}``.
    A run directory without a ``config.json`` (a user's own loop) gets one.
    Rank 0 writes. Returns the changes.

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> _ = start_run(run, TrainConfig(steps=10), resume=False)
        >>> record_resume(run, TrainConfig(steps=20), step=10)
        {'steps': (10, 20)}
    """
    import time

    run_dir = Path(run_dir)
    saved = saved_config(run_dir)
    if saved is None:
        if dist.is_main():
            _write_config(run_dir, config)
        return {}
    changes = config_changes(saved, flat_config(config))
    if changes and dist.is_main():
        line = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changes": {k: list(v) for k, v in changes.items()}}
        with open(run_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return changes


def params_digest(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state_dict's names and tensors' bytes in key order: equal iff bit-identical.

    FSDP2 shards are gathered first (a collective: call it on every rank).

    Example:
        >>> _ = torch.manual_seed(0); a = torch.nn.Linear(2, 1)
        >>> _ = torch.manual_seed(0); b = torch.nn.Linear(2, 1)
        >>> params_digest(a) == params_digest(b), len(params_digest(a))
        (True, 64)
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


def environment() -> dict[str, Any]:
    """What a run's numbers depend on beyond its config: versions, threads and the CPU's vector kernels.

    The same command gives bit-identical results only with the same torch
    build, thread count and ``cpu_capability`` (torch picks AVX2 or AVX512
    kernels by the CPU, and they round differently): a run on an AVX2
    machine drifts from one on an AVX512 machine from the first update.

    Returns:
        ``{"python", "torch", "numpy", "cpu_capability", "threads", "cuda"}``
        (``cuda``: the device's name, or None).

    Example:
        >>> sorted(environment())
        ['cpu_capability', 'cuda', 'numpy', 'python', 'threads', 'torch']
    """
    import platform

    import numpy as np

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cuda": cuda}


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``run_dir/summary.json`` atomically (rank 0 only under torch.distributed), with the run's
    ``environment()`` added under ``"environment"`` unless the summary has one.

    Example:
        >>> import tempfile, json
        >>> path = write_summary(tempfile.mkdtemp(), {"acc": 0.9})
        >>> sorted(json.loads(path.read_text()))
        ['acc', 'environment']
    """
    path = Path(run_dir) / SUMMARY_FILE
    if dist.is_main():
        summary = {**summary, "environment": summary.get("environment") or environment()}
        atomic_write_bytes(path, json.dumps(to_jsonable(summary), indent=2).encode() + b"\n")
    return path


def cli(config_type: type, presets: Mapping[str, tuple[str, Any]] | None = None,
        argv: list[str] | None = None, description: str | None = None) -> Any:
    """Parse ``[PRESET] [--flags]``: an optional preset name first picks the defaults, flags override.

    ``presets`` maps a name to ``(one-line description, config instance)``;
    the first is the default (None: the config's own defaults, no presets).
    ``--help`` lists them. The presets are not modified. A failed check in
    any nested config raises ``ValueError`` naming the field by its flag
    path (``data.image_size=3 is not allowed: ...``).

    Args:
        config_type: The recipe's ``Config`` dataclass.
        presets: ``{name: (description, config)}``.
        argv: The arguments (default ``sys.argv[1:]``).
        description: ``--help``'s first line.

    Returns:
        The parsed config.

    Raises:
        ValueError: naming the flag path of a failed check, or an unknown preset with the list.

    Example:
        >>> cli(TrainConfig, argv=["--steps", "7"]).steps
        7
    """
    import copy

    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if presets:
        names = list(presets)
        if argv and not argv[0].startswith("-") and argv[0] not in presets:
            raise ValueError(f"unknown preset {argv[0]!r}; presets: {', '.join(names)} "
                             "(an optional first argument; flags start with --)")
        chosen = argv.pop(0) if argv and argv[0] in presets else names[0]
        listing = "\n".join(f"  {name}: {doc}" for name, (doc, _) in presets.items())
        text = f"{description or ''}\n\nPresets (an optional first argument; default {names[0]}):\n{listing}"
    else:
        presets, chosen, text = {"default": ("", config_type())}, "default", description or ""
    default = copy.deepcopy(presets[chosen][1])
    argv = config_file_flags(argv, default)  # --config FILE: after the preset, before the flags
    text += ("\n\n--config FILE: a YAML or JSON file of fields (nested or dotted keys; a run's config.json "
             "as it is), applied after the preset and before the other flags.")
    with _check.collected_errors() as errors:
        try:
            with _stderr_unless_unknown_flags(argv, default):
                config = tyro.cli(config_type, default=default, args=argv, description=text.strip())
        except Exception:
            if not errors:
                raise
            config = None  # a failed check let later code trip: report the check
    if errors:
        error, owner = errors[0]
        raise ValueError(_with_path(str(error), owner, config, config_type)) from None
    return config


def known_flags(config: Any) -> list[str]:
    """Every flag a config takes: ``--a.b-c`` for each field, and ``--a.no-flag`` for each boolean.

    Args:
        config: A config instance (nested dataclasses), as the recipe's preset gives it.

    Returns:
        The flags as tyro spells them (dashes), in field order.

    Example:
        >>> from stepkit.log import LogConfig
        >>> known_flags(LogConfig())[:3]
        ['--every', '--console', '--no-console']
    """
    flags = []
    for key, value in flat_config(config).items():
        flags.append(_flag(key))
        if isinstance(value, bool):
            flags.append(_no_flag(key))
    return flags


# Other projects' words for stepkit's flags, so that e.g. ``--learning-rate`` is pointed to ``--optim.lr``.
FLAG_SYNONYMS = {"learning-rate": "lr", "weight-decay": "wd", "epochs": "steps", "iterations": "steps",
                 "iters": "steps", "max-steps": "steps", "bs": "batch-size", "warmup": "warmup-steps",
                 "output-dir": "run-dir", "out-dir": "run-dir", "logdir": "run-dir"}


def unknown_flag_error(argv: Sequence[str], config: Any) -> str | None:
    """The first flag in ``argv`` that ``config`` does not take, with the three closest; None if none.

    Close means alike as a whole or in its last part (``--lr`` is close to
    ``--optim.lr``), or another project's word for it (``FLAG_SYNONYMS``:
    ``--learning-rate`` is ``lr``), so even a far-off spelling gets suggestions.

    Args:
        argv: The command line's flags (``--name value`` or ``--name=value``).
        config: The config they are for (``known_flags``).

    Returns:
        ``"unknown flag '--x'; the closest: ... (--help lists all N)"``, or None when every flag is known.

    Example:
        >>> from stepkit.log import LogConfig
        >>> unknown_flag_error(["--evry", "5"], LogConfig())
        "unknown flag '--evry'; the closest: --every, --tensorboard, --heartbeat-s (--help lists all 9)"
        >>> unknown_flag_error(["--every", "5"], LogConfig()) is None
        True
    """
    import difflib

    known = known_flags(config)
    for arg in argv:
        if not arg.startswith("--") or arg in ("--help", "--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag.replace("_", "-") in known:
            continue

        def likeness(candidate: str, flag: str = flag) -> float:
            whole = difflib.SequenceMatcher(None, flag, candidate).ratio()
            typed = flag.rsplit(".", 1)[-1].lstrip("-").replace("_", "-")
            last = candidate.rsplit(".", 1)[-1].lstrip("-")
            return max(whole, *(difflib.SequenceMatcher(None, name, last).ratio()
                                for name in (typed, FLAG_SYNONYMS.get(typed, typed))))

        closest = sorted(known, key=lambda c: -likeness(c))[:3]
        return (f"unknown flag {flag!r}; the closest: {', '.join(closest)} "
                f"(--help lists all {len(known)})")
    return None


@contextlib.contextmanager
def _stderr_unless_unknown_flags(argv: Sequence[str], config: Any) -> Iterator[None]:
    """tyro's own error, unless the trouble is an unknown flag: then one line with suggestions."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except SystemExit as exit:
        message = unknown_flag_error(argv, config) if exit.code not in (0, None) else None
        if message is not None:
            raise ValueError(message) from None
        sys.stderr.write(buffer.getvalue())
        raise
    sys.stderr.write(buffer.getvalue())


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``), its bases'
    too: what tyro shows in ``--help``, read from the source (empty where it cannot be read).

    Example:
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

    Example:
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


def config_file_flags(argv: list[str], default: Any) -> list[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's fields as flags, first (later flags win).

    The file is YAML (``.yaml`` / ``.yml``) or JSON: a mapping of fields,
    nested (``optim: {lr: 0.001}``) or dotted (``optim.lr: 0.001``), e.g. a
    finished run's ``config.json`` (its ``resume*`` fields are skipped). Each
    field becomes the flag a user would type (``--optim.lr 0.001``), so
    the values are parsed and checked exactly as flags are. An unknown key
    is a ``ValueError`` naming it and the closest field of ``default``.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = path.write_text("steps: 30\\n")
        >>> config_file_flags(["--config", str(path), "--seed", "2"], TrainConfig())
        ['--steps', '30', '--seed', '2']
    """
    argv = list(argv)
    spots = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not spots:
        return argv
    if len(spots) > 1:
        raise ValueError("--config is given more than once; give one file (later flags override it)")
    i = spots[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ValueError("--config needs a file: --config FILE.yaml (or .json)")
        path, rest = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    else:
        path, rest = Path(argv[i].split("=", 1)[1]), argv[:i] + argv[i + 1:]
    return _file_flags(path, flat_config(default)) + rest


def _file_flags(path: Path, known: dict[str, Any]) -> list[str]:
    import difflib

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise ValueError(f"--config {path}: cannot read it ({reason})") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        if kind == "JSON":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # the parser's own message, first line: where the syntax broke
        raise ValueError(f"--config {path}: not valid {kind}: {str(err).splitlines()[0]}") from None
    if data is None:
        return []
    if not isinstance(data, Mapping):
        raise ValueError(f"--config {path}: expected a mapping of fields (name: value), "
                         f"got a {type(data).__name__}")
    flags: list[str] = []
    for key, value in flat_config(data).items():
        key = key.replace("-", "_")
        if key.split(".")[0] in INVOCATION_FIELDS:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else " (see --help for the fields)"
            raise ValueError(f"--config {path}: unknown key {key!r}{hint}")
        flags += _as_flags(key, value, known[key])
    return flags


def _flag(key: str) -> str:
    """``optim.warmup_steps`` -> ``--optim.warmup-steps``, as tyro spells it."""
    return "--" + key.replace("_", "-")


def _no_flag(key: str) -> str:
    """A boolean's false flag: ``log.console`` -> ``--log.no-console``."""
    head, _, last = key.rpartition(".")
    return _flag((head + "." if head else "") + "no_" + last)


def _as_flags(key: str, value: Any, current: Any) -> list[str]:
    flag = _flag(key)
    if isinstance(value, bool) and isinstance(current, bool):  # tyro's --name / --no-name
        return [flag] if value else [_no_flag(key)]
    if value is None:
        return [flag, "None"]
    if isinstance(value, list):
        return [flag, *(str(v) for v in value)]
    return [flag, str(value)]


def _with_path(message: str, owner: Any, config: Any, config_type: type) -> str:
    """``image_size=3 ...`` -> ``data.image_size=3 ...``: where ``owner`` sits in the config tree."""
    path = _path_to(config, owner) if config is not None else None
    if path is None and owner is not None:
        paths = _paths_of(config_type, type(owner))
        path = paths[0] if len(paths) == 1 else None
    if not path or message.startswith(path + "."):
        return message
    return f"{path}.{message}"


def _path_to(tree: Any, target: Any, prefix: str = "") -> str | None:
    if tree is target:
        return prefix
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            found = _path_to(getattr(tree, f.name), target, f"{prefix}.{f.name}" if prefix else f.name)
            if found is not None:
                return found
    return None


def _paths_of(config_type: type, wanted: type, prefix: str = "") -> list[str]:
    """Every dotted path in a tree of dataclass types where a field has type ``wanted``."""
    import typing

    if config_type is wanted:
        return [prefix]
    if not dataclasses.is_dataclass(config_type):
        return []
    try:
        hints = typing.get_type_hints(config_type)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no path
        return []
    out = []
    for f in dataclasses.fields(config_type):
        kind = hints.get(f.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out += _paths_of(kind, wanted, f"{prefix}.{f.name}" if prefix else f.name)
    return out


# --- stopping on a signal (preemption, Ctrl-C) -----------------------------------------------

EXIT_STOPPED = 75
"""The exit code of a run stopped by a signal after saving its checkpoint (``EX_TEMPFAIL``:
try again later). A job script requeues on it: ``python recipe.py ... --resume-or-start --resume;
[ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"``."""


class StopSignals:
    """Turn SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) into a request to stop after the current update.

    ::

        with StopSignals() as stop:
            while state.step < steps:
                ...                                  # one update
                if stop.requested():                 # every rank agrees (one tiny all-reduce)
                    break
        save_last(ckpt_dir, state)
        if stop.signal_name:
            log.close()
            stop.exit(state.step)                    # prints where and how to resume; exits 75

    The first signal only sets a flag, so the update in progress finishes and
    the loop saves ``last`` as usual (atomically, every rank, single-file and
    sharded formats alike). A second Ctrl-C restores the default handlers and
    raises ``KeyboardInterrupt`` at once (an atomic save it interrupts leaves
    the previous checkpoint whole); a repeated SIGTERM or SIGUSR1 changes
    nothing (a scheduler and torchrun may both send one). Under torch.distributed, ``requested()``
    is a collective: ranks share a MAX all-reduce of the flag over gloo (a
    CPU group is made for it under nccl), so when one rank is signalled every
    rank stops at the same update; call it at the same point on every rank,
    e.g. once per update, or less often with ``every``. ``enabled=False``
    (recipes: ``--no-stop-on-signal``) installs nothing. Handlers can only be
    set from the main thread; elsewhere it installs nothing either.

    Example:
        >>> with StopSignals() as stop:
        ...     stop.requested()
        False
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, *, enabled: bool = True, every: int = 1) -> None:
        _check.integer_at_least("every", every, 1)
        self.enabled, self.every = enabled, every
        self.signal_name: str | None = None
        self._received: str | None = None
        self._previous: dict[int, Any] = {}
        self._calls = 0
        self._group = None

    def __enter__(self) -> StopSignals:
        if not self.enabled or not _on_main_thread():
            return self
        for name in self.SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        if dist.world_size() > 1 and torch.distributed.get_backend() != "gloo":
            self._group = torch.distributed.new_group(backend="gloo")
        return self

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if self._received is not None:
            if number == signal.SIGINT:  # Ctrl-C twice: the user wants out now
                self._restore()
                raise KeyboardInterrupt("second Ctrl-C")
            return  # a repeated SIGTERM (a scheduler and torchrun both send one): already stopping
        self._received = name
        print(f"\n{name} received: finishing the current update, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether the loop should stop now (True on every rank once any rank got a signal)."""
        self._calls += 1
        if self._calls % self.every:
            return False
        flag = self._received is not None
        if dist.world_size() > 1:
            t = torch.tensor([int(flag)], dtype=torch.int32)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
            flag = bool(t.item())
        if flag:
            self.signal_name = self._received or "a signal on another rank"
        return flag

    def exit(self, step: int, ckpt_dir: str | os.PathLike | None = None) -> None:
        """Say where the run stopped and how to continue it, leave the process group, exit 75."""
        import shlex

        if dist.is_main():
            args = sys.argv[1:]
            again = " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *args])
            if "--resume" not in args:
                again += " --resume"
            where = f" (checkpoint in {ckpt_dir})" if ckpt_dir is not None else ""
            print(f"stopped by {self.signal_name} at step {step}{where}; continue with the same command "
                  f"and --resume: {again}", file=sys.stderr, flush=True)
        # torchrun SIGTERMs the other workers as soon as one exits non-zero: the checkpoint is
        # saved, so let every rank finish its exit and report 75 rather than die of it.
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name) and _on_main_thread():
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        dist.shutdown()
        raise SystemExit(EXIT_STOPPED)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _one_line(err: BaseException) -> str:
    """The error's own message: a DataLoader worker's error arrives wrapped in its traceback text."""
    message = str(err)
    if "Original Traceback" in message:  # "Caught X in DataLoader worker ... Original Traceback ... X: msg"
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def _on_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_main(main: Any, parse: Any) -> None:
    """A recipe's ``__main__``: ``main(parse())`` with one-line errors instead of tracebacks.

    A config or data error (``ValueError``, ``CheckpointError``) or a missing
    optional extra (an ``ImportError`` that says what to ``pip install``)
    prints ``error: ...`` and exits 1; Ctrl-C outside the training loop (or twice
    inside it) prints one line and exits 130, the shell's code for SIGINT.

    Example:
        >>> def main(cfg):
        ...     raise ValueError("optim.lr=-1 is not allowed")
        >>> try:
        ...     run_main(main, lambda: None)
        ... except SystemExit as exit:
        ...     print(exit.code)  # uncaught, Python prints this one line to stderr and exits 1
        error: optim.lr=-1 is not allowed
    """
    try:
        main(parse())
    except ValueError as err:
        sys.exit(f"error: {_one_line(err)}")
    except ImportError as err:
        if "pip install" not in str(err):  # not one of stepkit's "install the extra" messages
            raise
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopped at once; checkpoints already on disk are as they were",
              file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # output piped into a reader that closed early (``--help | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)

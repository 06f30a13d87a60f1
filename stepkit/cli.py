"""A recipe's command line: ``[PRESET] [--config FILE] [--flags]``, and one-line errors.

``cli`` parses a recipe's ``Config`` with tyro, after an optional preset
name and a ``--config`` file; an unknown flag gets the three closest;
``run_main`` turns a config or data error into one line (``error: ...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import io
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stepkit import dist
from stepkit.checkpoint.errors import SaveFailed
from stepkit.config import INVOCATION_FIELDS, absolute_paths, flat_config
from stepkit.faults import EXIT_DIVERGED, EXIT_SAVE_FAILED, DataError, DataStalled, Diverged, error_line

__all__ = ["FLAG_SYNONYMS", "check_config", "cli", "config_file_flags", "known_flags", "run_main",
           "unknown_flag_error"]

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

    Examples:
        >>> from stepkit.config import TrainConfig
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
    # Checks wait until the whole config exists, then run bottom-up with each node's flag path known:
    # a failed one names the field as the user typed it (data.image_size=3 ...).
    with _checks_deferred(_config_types(config_type, default)):
        with _stderr_unless_unknown_flags(argv, default):
            config = tyro.cli(config_type, default=default, args=argv, description=text.strip())
    check_config(config)
    return absolute_paths(config)  # config.json names the files wherever stepkit eval or a resume runs


def check_config(config: Any, path: str = "") -> None:
    """Run every nested config's ``__post_init__`` checks, children first, naming a failure by its path.

    Args:
        config: A config dataclass instance.
        path: Its flag path (``""`` for the root).

    Raises:
        ValueError: the first failed check, its field prefixed with the path (``data.image_size=3 ...``).

    Examples:
        >>> import dataclasses
        >>> from stepkit.config import TrainConfig
        >>> @dataclasses.dataclass
        ... class Config:
        ...     train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
        >>> cfg = Config()
        >>> cfg.train.steps = 0  # set after construction: no check ran
        >>> check_config(cfg)
        Traceback (most recent call last):
        ValueError: train.steps=0 is not allowed: expected an integer >= 1
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_config(value, f"{path}.{f.name}" if path else f.name)
    checks = getattr(type(config), "__post_init__", None)
    if checks is None:
        return
    try:
        checks(config)
    except ValueError as err:
        message = str(err)
        if path and not message.startswith(path + "."):
            message = f"{path}.{message}"
        raise ValueError(message) from None


def _config_types(config_type: type, default: Any) -> set[type]:
    """Every dataclass type a config tree is built of: the annotations' and the default's, bases too."""
    import typing

    found: set[type] = set()

    def walk(kind: Any) -> None:
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)) or kind in found:
            return
        found.update(k for k in kind.__mro__ if dataclasses.is_dataclass(k))
        try:
            hints = typing.get_type_hints(kind)
        except Exception:  # noqa: BLE001 - unresolvable annotations: the default's values still count
            hints = {}
        for f in dataclasses.fields(kind):
            walk(hints.get(f.name))

    def walk_values(obj: Any) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            walk(type(obj))
            for f in dataclasses.fields(obj):
                walk_values(getattr(obj, f.name))

    walk(config_type)
    walk_values(default)
    return found


@contextlib.contextmanager
def _checks_deferred(types: set[type]) -> Iterator[None]:
    """While tyro builds the config, its classes' ``__post_init__`` checks do nothing (``check_config``
    runs them afterwards, knowing each one's flag path)."""
    saved = {kind: kind.__dict__["__post_init__"] for kind in types if "__post_init__" in kind.__dict__}
    try:
        for kind in saved:
            kind.__post_init__ = _no_checks  # type: ignore[attr-defined]
        yield
    finally:
        for kind, checks in saved.items():
            kind.__post_init__ = checks  # type: ignore[attr-defined]


def _no_checks(self: Any) -> None:
    return None


def known_flags(config: Any) -> list[str]:
    """Every flag a config takes: ``--a.b-c`` for each field, and ``--a.no-flag`` for each boolean.

    Args:
        config: A config instance (nested dataclasses), as the recipe's preset gives it.

    Returns:
        The flags as tyro spells them (dashes), in field order.

    Examples:
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

    Examples:
        >>> from stepkit.log import LogConfig
        >>> unknown_flag_error(["--evry", "5"], LogConfig())
        "unknown flag '--evry'; the closest: --every, --tensorboard, --heartbeat-s (--help lists all 9)"
        >>> unknown_flag_error(["--every", "5"], LogConfig()) is None
        True
    """

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

def config_file_flags(argv: list[str], default: Any) -> list[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's fields as flags, first (later flags win).

    The file is YAML (``.yaml`` / ``.yml``) or JSON: a mapping of fields,
    nested (``optim: {lr: 0.001}``) or dotted (``optim.lr: 0.001``), e.g. a
    finished run's ``config.json`` (its ``resume*`` fields are skipped). Each
    field becomes the flag a user would type (``--optim.lr 0.001``), so
    the values are parsed and checked exactly as flags are. An unknown key
    is a ``ValueError`` naming it and the closest field of ``default``.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = path.write_text("steps: 30\\n")
        >>> from stepkit.config import TrainConfig
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
    spelt = {_flag(k)[2:].replace("-", "_"): k for k in known}  # init.from: the field init.from_
    for key, value in flat_config(data).items():
        key = key.replace("-", "_")
        key = key if key in known else spelt.get(key, key)
        if key.split(".")[0] in INVOCATION_FIELDS:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else " (see --help for the fields)"
            raise ValueError(f"--config {path}: unknown key {key!r}{hint}")
        flags += _as_flags(key, value, known[key])
    return flags

def _flag(key: str) -> str:
    """``optim.warmup_steps`` -> ``--optim.warmup-steps``, as tyro spells it; a field named with a
    trailing underscore for a Python keyword (``init.from_``) is spelt without it (``--init.from``)."""
    return "--" + ".".join(part.rstrip("_") if part.endswith("_") and part.strip("_") else part
                           for part in key.split(".")).replace("_", "-")

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

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def run_main(main: Any, parse: Any) -> None:
    """A recipe's ``__main__``: ``main(parse())`` with one-line errors instead of tracebacks.

    A config or data error (``ValueError``, ``CheckpointError``), a sample
    that cannot be read while training (``DataError``), a loader that
    stalled (``DataStalled``) or a missing optional extra (an
    ``ImportError`` that says what to ``pip install``) prints ``error: ...``
    and exits 1, the loader's workers already ended (``stepkit.data.loader``);
    under torchrun a data error is noted for the other ranks, which stop
    with its line too, and for the agent's restarts, which refuse to run
    into it again (``stepkit.dist.note_data_error``). A run stopped for
    non-finite updates (``stepkit.faults.Diverged``) prints its line and
    exits 65, one that could not write a checkpoint (``SaveFailed``) or any
    file for a full disk or quota exits 74; Ctrl-C outside the training
    loop (or twice inside it) prints one line and exits 130, the shell's
    code for SIGINT.

    Examples:
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
    except DataError as err:
        line = error_line(err)
        dist.note_data_error(line)
        sys.exit(f"error: {line}")
    except DataStalled as err:
        sys.exit(f"error: {err}")
    except Diverged as err:
        print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except SaveFailed as err:
        print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_SAVE_FAILED)
    except ValueError as err:
        sys.exit(f"error: {error_line(err)}")
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
    except OSError as err:  # a log or summary write that found the disk full: as a failed save
        if err.errno not in _DISK_FULL:
            raise
        print(f"error: {err.filename or 'a write'}: {err.strerror}; the checkpoints already saved are whole: "
              "free space (or choose another --run-dir) and continue with --resume",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_SAVE_FAILED)
    except Exception:
        noted = dist.noted_data_error()  # under torchrun: a collective that lost the rank that stopped
        if noted is None:
            raise
        sys.exit(f"error: {noted} (rank {dist.rank()} stopped with it)")

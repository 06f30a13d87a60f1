"""The run directory every recipe writes, and the guard that keeps a resumed run what it was.

A run writes into ``--run-dir DIR``::

    config.json           the resolved config
    config_history.jsonl  what each resume changed on purpose (--resume-allow)
    provenance.jsonl      per start: the recipe and its sha256, stepkit's version, the git commit, threads
    recipe.py             a copy of the recipe that ran (recipe-<sha>.py for an edited one on resume)
    metrics.jsonl         one JSON object per log event, always with "step"
    checkpoints/          last.pt, periodic saves, the best N by a metric
    tb/                   TensorBoard events (--log.tensorboard)
    wandb/                wandb's files (--log.wandb; WANDB_MODE=offline works)
    summary.json          final metrics, evaluation results, wall_s, steps, params_digest, environment

A fresh run refuses a directory that already holds a run, so nothing on
disk is overwritten; ``--resume`` continues from ``DIR/checkpoints/last.pt``
and refuses a config that differs in a field that shapes the run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepkit import check as _check
from stepkit import dist
from stepkit._atomic import atomic_write_bytes
from stepkit.checkpoint import LAST, has_checkpoint, recover_interrupted_saves
from stepkit.config import flat_config, resume_free_fields, to_jsonable

__all__ = ["CKPT_DIR", "CONFIG_FILE", "HISTORY_FILE", "KERNEL_ENV", "KERNEL_FLAGS", "PROVENANCE_FILE",
           "SUMMARY_FILE", "run_of", "config_changes", "environment", "record_provenance", "record_resume",
           "saved_config", "start_run", "write_summary"]

CONFIG_FILE, SUMMARY_FILE, CKPT_DIR = "config.json", "summary.json", "checkpoints"
PROVENANCE_FILE = "provenance.jsonl"


# The resume flags themselves: never compared, never recorded.
_RUN_FLAGS = ("run_dir", "resume", "resume_from", "resume_allow", "resume_or_start", "stop_on_signal")

HISTORY_FILE = "config_history.jsonl"


def _matches(field: str, patterns: Any) -> bool:

    return any(field == p or field.startswith(p + ".") or fnmatch.fnmatchcase(field, p) for p in patterns)

def saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The config a run directory's run is under now: ``config.json`` with every change from
    ``config_history.jsonl`` applied, flattened as ``flat_config``; None without a config.json.

    Examples:
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
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read the saved config to compare the resumed run with "
                         f"({type(err).__name__}: {err})") from None
    history = run_dir / HISTORY_FILE
    try:
        lines = history.read_text().splitlines() if history.exists() else []
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{history}: cannot read it ({type(err).__name__}: {err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            for name, (_, new) in json.loads(line)["changes"].items():
                config[name] = new
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{history}, line {number}: not a record of changed fields "
                             '({"step", "time", "changes": {field: [saved, given]}}): '
                             f"{type(err).__name__}: {err}; repair or remove that line") from None
    return config

def config_changes(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, given)}`` for every flattened field that differs (resume flags ignored).

    Examples:
        >>> config_changes({"optim.lr": 0.1, "steps": 5}, {"optim.lr": 0.2, "steps": 5})
        {'optim.lr': (0.1, 0.2)}
    """
    return {k: (saved.get(k, _ABSENT), given.get(k, _ABSENT)) for k in sorted(saved.keys() | given.keys())
            if not _matches(k, _RUN_FLAGS) and not _same(saved.get(k, _ABSENT), given.get(k, _ABSENT))}


def _same(saved: Any, given: Any) -> bool:
    """Equal, or a relative path saved by an older stepkit that is the absolute one given now."""
    if saved == given:
        return True
    return (isinstance(saved, str) and isinstance(given, str) and os.path.isabs(given)
            and not os.path.isabs(saved) and os.path.abspath(saved) == given)

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
    fields the config declares free to change (``may_change_on_resume``) or
    that ``allow`` names (exact names,
    prefixes such as ``train``, or globs) may differ and are printed in one
    line. Every rank checks, so under torchrun every rank raises alike.

    Args:
        run_dir: The run directory.
        config: The run's config (a dataclass), saved as ``config.json``.
        resume: Continue the run there (``--resume``).
        resume_from: Resume from this checkpoint instead of ``last``.
        allow: Fields that may differ on resume (names, prefixes or globs).
        or_start: Resume when there is a checkpoint, else start fresh (a requeued job's first attempt
            may have saved nothing, or been killed before its first save).

    Returns:
        ``run_dir/checkpoints``.

    Raises:
        ValueError: one line naming the flag to use, for a fresh run over an old one, a resume without a
            checkpoint, or a resume whose config differs in a field that shapes the run.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> from stepkit.config import TrainConfig
        >>> start_run(run, TrainConfig(steps=10), resume=False).name, (run / "config.json").exists()
        ('checkpoints', True)
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CKPT_DIR
    resume = resume or or_start
    given = flat_config(config)
    for name in allow:
        if not any(_matches(k, [name]) for k in given):
            import difflib

            close = difflib.get_close_matches(name, list(given), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            _check.fail("resume_allow", name, f"names of config fields such as train.steps{hint}")
    if resume and resume_from is not None and not Path(resume_from).exists():
        _check.fail("resume_from", str(resume_from), "an existing checkpoint file or .dcp folder")
    source_run = run_of(resume_from) if resume and resume_from is not None else run_dir
    branch = source_run.resolve() != run_dir.resolve()  # another run's checkpoint, continued here
    if branch and (has_checkpoint(ckpt_dir) or (run_dir / "metrics.jsonl").exists()):
        raise ValueError(f"run_dir={str(run_dir)!r} already holds a run, and --resume-from names a "
                         f"checkpoint of another one ({source_run}): continue that run in its own folder "
                         "(--run-dir), or choose a new --run-dir for the branch")
    if resume and resume_from is None:
        recover_interrupted_saves(ckpt_dir)  # a save killed midway: its partial files go, the old one stays
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
        saved = saved_config(source_run)
        if branch and saved is None:
            raise ValueError(f"resume_from={str(resume_from)!r}: its run directory {source_run} has no "
                             f"{CONFIG_FILE} to check this config against; to start from its weights "
                             "instead, use --init.from")
        changes = config_changes(saved, given) if saved is not None else {}
        if branch:
            changes.pop("run_dir", None)
        free = resume_free_fields(config) if dataclasses.is_dataclass(config) else []
        # A field only one side has comes from another stepkit or recipe version (a field added
        # or removed since): nothing to compare, so it is listed, not refused.
        refused = {k: v for k, v in changes.items() if _ABSENT not in v
                   and not _matches(k, free) and not _matches(k, allow)}
        if refused:
            who = (f"resume_from={str(resume_from)!r} (run {source_run})" if branch
                   else f"run_dir={str(run_dir)!r}")
            raise ValueError(
                f"{who} cannot resume with another config: {_describe(refused)} "
                "(saved → given; these fields shape the run: pass them as saved, or --resume-allow "
                "FIELD to change one on purpose, or choose another --run-dir)")
        if changes and dist.is_main():
            print(f"resume: changed on purpose or allowed: {_describe(changes)}")
        if not branch:
            return ckpt_dir
        if dist.is_main():  # a branch: a run of its own from here on, under the checked config
            print(f"resume: continuing {resume_from} (a checkpoint of {source_run}) in {run_dir}")
    # Every rank checks (and so raises alike); rank 0 writes, the others wait for the folder.
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, config)
    dist.barrier()
    return ckpt_dir

def run_of(checkpoint: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/last.pt`` -> ``RUN``).

    Examples:
        >>> run_of("runs/a/checkpoints/step_00000100.pt")
        PosixPath('runs/a')
    """
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == CKPT_DIR else path.parent


def _write_config(run_dir: Path, config: Any) -> None:
    atomic_write_bytes(run_dir / CONFIG_FILE, json.dumps(to_jsonable(config), indent=2).encode() + b"\n")

def record_resume(run_dir: str | os.PathLike, config: Any, step: int) -> dict[str, tuple[Any, Any]]:
    """After a resumed checkpoint has loaded: append the config's changes to ``config_history.jsonl``.

    ``config.json`` is never rewritten; each resume that changed anything
    adds one line ``{"step", "time", "changes": {field: [saved, given]}}``.
    A run directory without a ``config.json`` (a user's own loop) gets one.
    Rank 0 writes. Returns the changes.

    Examples:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> from stepkit.config import TrainConfig
        >>> _ = start_run(run, TrainConfig(steps=10), resume=False)
        >>> record_resume(run, TrainConfig(steps=20), step=10)
        {'steps': (10, 20)}
    """

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

# The CPU features oneDNN and torch pick kernels by: two machines that differ in one of these may
# round convolutions and matrix products differently from the first update on.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8")
# Variables that override those choices (torch's vector kernels, oneDNN's instruction set) or the threads.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS")


def environment() -> dict[str, Any]:
    """What a run's numbers depend on beyond its config: versions, threads, the CPU and its kernels.

    The same command gives bit-identical results only with the same torch
    build, thread count, CPU kernels and oneDNN version: torch picks AVX2 or
    AVX512 kernels by the CPU (``cpu_capability``), and oneDNN picks its
    convolution kernels by the CPU's features (``cpu_flags``: VNNI, BF16,
    AMX ...), so two CPUs with the same ``cpu_capability`` can still round
    convolutions differently. Measured on one machine (AMD EPYC, AVX512):
    capping oneDNN at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, torch's kernels still
    AVX512) changes a 30-update DINO run's ``params_digest``.

    Returns:
        ``{"python", "torch", "numpy", "onednn", "cpu", "cpu_flags", "cpu_capability", "threads",
        "kernel_env", "cuda"}`` (``cpu``: the model name; ``cpu_flags``: which of ``KERNEL_FLAGS`` it
        has; ``kernel_env``: the variables of ``KERNEL_ENV`` that are set; ``cuda``: the device's
        name, or None).

    Examples:
        >>> sorted(environment())  # doctest: +NORMALIZE_WHITESPACE
        ['cpu', 'cpu_capability', 'cpu_flags', 'cuda', 'kernel_env', 'numpy', 'onednn', 'python', 'threads',
         'torch']
    """
    import platform

    import numpy as np
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name", cpu)
        if "cache size" in fields:  # oneDNN sizes its blocks by the caches
            cpu += f", {fields['cache size']} cache"
        flags = set(fields.get("flags", "").split())
    except OSError:  # not Linux: the model name platform gives, no flags
        pass
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v([\d.]+)", torch.__config__.show())
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "onednn": onednn.group(1) if onednn else None, "cpu": cpu,
            "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}, "cuda": cuda}



def _git_commit(folder: Path, file: Path) -> dict[str, Any] | None:
    """The commit of the repository ``file`` lives in, and whether the file differs from it (None: no git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", file.name],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or a hung file system
        return None
    return {"commit": head.stdout.strip(), "recipe_edited": bool(status.stdout.strip())}


def record_provenance(run_dir: str | os.PathLike, recipe: str | os.PathLike | None, *,
                      resumed: bool) -> dict[str, Any]:
    """Append where this start (or resume) of a run came from to ``run_dir/provenance.jsonl``.

    One line per start: the time, the command line, the recipe file (absolute) with its sha256 and
    a copy in the run directory (``recipe.py``; a resume under an edited recipe adds
    ``recipe-<sha256[:12]>.py``), stepkit's version, the git commit of the repository the recipe is
    in (and whether the recipe differs from it), and torch's thread count. A resume whose thread
    count or recipe differs from the last start's says so in a line: a resume is bit-exact only
    under the same threads. Rank 0 writes; the other ranks return the same record.

    Args:
        run_dir: The run directory (it exists: ``start_run`` made it).
        recipe: The script that runs (None: not known; nothing copied).
        resumed: Whether this start continues a saved run.

    Returns:
        The line written.

    Examples:
        >>> import tempfile, pathlib, json
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> script = run / "my_loop.py"; _ = script.write_text("print('hi')\\n")
        >>> line = record_provenance(run, script, resumed=False)
        >>> line["recipe_sha256"][:12], (run / "recipe.py").read_text()
        ('caf026f25d71', "print('hi')\\n")
    """
    import hashlib
    import importlib.metadata
    import shutil
    import sys

    import torch

    run_dir = Path(run_dir)
    path = run_dir / PROVENANCE_FILE
    try:
        version: str | None = importlib.metadata.version("stepkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = None
    line: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed": resumed,
                            "argv": list(sys.argv), "stepkit": version, "torch": torch.__version__,
                            "threads": torch.get_num_threads()}
    if recipe is not None:
        recipe = Path(recipe).resolve()
        text = recipe.read_bytes()
        line.update(recipe=str(recipe), recipe_sha256=hashlib.sha256(text).hexdigest(),
                    git=_git_commit(recipe.parent, recipe))
    if not dist.is_main():
        return line
    before = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []
    last = before[-1] if before else None
    if recipe is not None:
        copy = "recipe.py" if not before else None
        if last is not None and last.get("recipe_sha256") != line["recipe_sha256"]:
            copy = f"recipe-{line['recipe_sha256'][:12]}.py"
            print(f"resume: the recipe differs from the last start's ({last.get('recipe')}, sha256 "
                  f"{str(last.get('recipe_sha256'))[:12]} -> {line['recipe_sha256'][:12]}); this one is kept "
                  f"as {run_dir / copy}", flush=True)
        if copy is not None and not (run_dir / copy).exists():
            shutil.copyfile(recipe, run_dir / copy)
        line["recipe_copy"] = copy or (last or {}).get("recipe_copy")
    if last is not None and last.get("threads") != line["threads"]:
        print(f"resume: torch threads {last.get('threads')} -> {line['threads']} since the last start; "
              "the run goes on, but not bit for bit as it would have (pass --threads "
              f"{last.get('threads')} to keep it exact)", flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return line


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``run_dir/summary.json`` atomically (rank 0 only under torch.distributed), with the run's
    ``environment()`` added under ``"environment"`` unless the summary has one.

    Examples:
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

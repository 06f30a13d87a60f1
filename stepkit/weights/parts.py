"""The parts of a run worth keeping (a DINO teacher's backbone, a JEPA target encoder, a contrastive
tower) and reading one part's weights out of a checkpoint, single-file or sharded.

A recipe names its parts once (``describe_part``) and saves the list in
every checkpoint's ``meta["parts"]``; ``read_part`` then needs nothing but
the checkpoint: where the part lives in the saved state (``source`` and
``prefix``), how to rebuild it (``arch``, see ``stepkit.models.arch_record``)
and what it expects as input.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepkit.checkpoint import (
    BEST_INDEX,
    LAST,
    SHARDED_SUFFIX,
    CheckpointError,
    best_checkpoints,
    load_checkpoint,
    read_info,
)
from stepkit.models.arguments import arch_record

__all__ = ["WRAPPER_PREFIXES", "checkpoint_parts", "describe_part", "find_checkpoint", "merge_lora_state",
           "read_part", "strip_prefixes"]

# What DDP, torch.compile, FSDP (1) and activation checkpointing put in front of parameter names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def describe_part(module: nn.Module, *, source: str, prefix: str, about: str, **facts: Any) -> dict[str, Any]:
    """One exportable part of a recipe's model, as saved in ``meta["parts"]``.

    Args:
        module: The part (its class must be in ``stepkit.models.ARCHITECTURES``; LoRA adapters added
            after it was built are not part of its record: export merges them).
        source: Where its weights are in ``TrainState.state_dict()``: ``"model"`` or ``"target"``.
        prefix: Its name prefix there (``"backbone."``; ``""`` for the whole thing).
        about: One line for ``stepkit export``'s listing.
        **facts: What a user needs beside the weights (input size, channels, normalisation mean/std,
            a tokenizer, ``lora_scale`` when peft adapters are to be merged).

    Examples:
        >>> from stepkit.models import SmallCNN
        >>> part = describe_part(SmallCNN(1, (8,)), source="target", prefix="backbone.", about="teacher")
        >>> part["source"], part["arch"]["class"]
        ('target', 'SmallCNN')
    """
    if source not in ("model", "target"):
        raise ValueError(f"source={source!r} is not allowed: 'model' or 'target'")
    return {"source": source, "prefix": prefix, "about": about, "arch": arch_record(module), **facts}


def find_checkpoint(source: str | os.PathLike, which: str = "last") -> Path:
    """The checkpoint ``which`` names in a run directory, or ``source`` itself when it is one.

    Args:
        source: A run directory, its ``checkpoints/`` folder, a ``.pt`` checkpoint or a ``.dcp`` folder.
        which: ``last``, ``best`` (the best kept by ``save_best``), ``step_N`` (a periodic one), or a
            file name in ``checkpoints/``.

    Raises:
        CheckpointError: one line naming the folder and what it holds, when there is no such checkpoint.

    Examples:
        >>> import tempfile
        >>> find_checkpoint(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stepkit.checkpoint.CheckpointError: ...: no checkpoints here (a run directory holds checkpoints/...)
    """
    path = Path(source)
    if path.is_file() or path.suffix == SHARDED_SUFFIX:
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint")
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    held = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", SHARDED_SUFFIX)
                  and ".rank" not in p.name) if folder.is_dir() else []
    if not held:
        raise CheckpointError(f"{path}: no checkpoints here (a run directory holds checkpoints/{LAST})")
    if which == "best":
        best = best_checkpoints(folder)
        if not best:
            raise CheckpointError(f"{folder}: no best checkpoints ({BEST_INDEX} missing); "
                                  f"it holds: {', '.join(held)}")
        return folder / best[0]["file"]
    if which == "last":
        names = [LAST, Path(LAST).with_suffix(SHARDED_SUFFIX).name]
    elif re.fullmatch(r"step_\d+", which):
        step = int(which.removeprefix("step_"))
        names = [f"step_{step:08d}.pt", f"step_{step:08d}{SHARDED_SUFFIX}"]
    else:
        names = [which]
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"checkpoint={which!r} is not in {folder}; it holds: {', '.join(held)} "
                          "(use last, best, step_N or one of those names)")


def _read(path: Path) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """A checkpoint's ``meta``, its step, and (single-file) the whole saved state, read once."""
    if path.is_dir():
        info = read_info(path)
        return info.get("meta") or {}, int(info.get("step", 0)), None
    payload = load_checkpoint(path)
    return payload.get("meta") or {}, int(payload["state"].get("step", 0)), payload["state"]


def _parts_of(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    parts = meta.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise CheckpointError(f"{path}: names no parts to export (meta['parts'] is missing: a recipe "
                              "saves it; your own loop can pass meta={'parts': {...}} with "
                              "stepkit.weights.describe_part)")
    return parts


def checkpoint_parts(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The parts a checkpoint's recipe described (``meta["parts"]``), by name.

    Raises:
        CheckpointError: for a checkpoint saved without them (by your own loop, or an older stepkit).

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_last
        >>> from stepkit.models import SmallCNN
        >>> net = SmallCNN(1, (4,))
        >>> parts = {"encoder": describe_part(net, source="model", prefix="", about="a CNN")}
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=3)
        >>> _ = save_last(run / "checkpoints", state, meta={"parts": parts})
        >>> sorted(checkpoint_parts(run / "checkpoints" / "last.pt"))
        ['encoder']
    """
    return _parts_of(_read(Path(path))[0], path)


def strip_prefixes(state: dict[str, Tensor],
                   prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Tensor]:
    """Drop each of ``prefixes`` wherever it starts a name or follows a dot (wrappers nest).

    Examples:
        >>> sorted(strip_prefixes({"module.backbone._orig_mod.w": 1}))
        ['backbone.w']
    """
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(p) for p in prefixes) + r")+")
    return {pattern.sub(r"\1", name): value for name, value in state.items()}


def merge_lora_state(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Fold peft LoRA adapters into plain weights, in the state dict: ``W + scale * B @ A``.

    Names lose peft's ``base_model.model.`` and ``.base_layer`` and the
    adapters go, so the result loads into the model without adapters (what
    ``merge_lora`` gives, computed without building the model).

    Args:
        state: A state dict with ``X.base_layer.weight``, ``X.lora_A.default.weight`` and
            ``X.lora_B.default.weight`` entries.
        scale: ``lora_alpha / r``.

    Examples:
        >>> s = {"l.base_layer.weight": torch.zeros(2, 2), "l.lora_A.default.weight": torch.ones(1, 2),
        ...      "l.lora_B.default.weight": torch.ones(2, 1)}
        >>> merge_lora_state(s, 0.5)["l.weight"].tolist()
        [[0.5, 0.5], [0.5, 0.5]]
    """
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if ".lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            layer = name.removesuffix(".base_layer.weight")
            a, b = state.get(f"{layer}.lora_A.default.weight"), state.get(f"{layer}.lora_B.default.weight")
            if a is not None and b is not None:
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
        out[name.replace("base_model.model.", "").replace(".base_layer.", ".")] = value
    return out


def read_part(source: str | os.PathLike, part: str, *, checkpoint: str = "last"
              ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One part's weights (names as the rebuilt module has them) and its description.

    A sharded (FSDP) checkpoint is gathered in this one process, reading only
    the part's tensors. peft adapters are merged. The description gains
    ``step`` (the checkpoint's), ``checkpoint`` (its path) and
    ``config_sha256`` (of the run's ``config.json``, when there is one).

    Raises:
        CheckpointError: for a missing checkpoint, or a part name it does not have (listing those).

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_last
        >>> from stepkit.models import SmallCNN
        >>> net = SmallCNN(1, (4,))
        >>> parts = {"encoder": describe_part(net, source="model", prefix="", about="a CNN")}
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=3)
        >>> _ = save_last(run / "checkpoints", state, meta={"parts": parts})
        >>> weights, info = read_part(run, "encoder")
        >>> info["step"], torch.equal(weights["features.0.weight"], net.features[0].weight)
        (3, True)
    """
    path = find_checkpoint(source, checkpoint)
    meta, step, saved = _read(path)  # a single-file checkpoint is loaded this once
    parts = _parts_of(meta, path)
    if part not in parts:
        listing = "; ".join(f"{name} ({p.get('about', '')})" for name, p in parts.items())
        raise CheckpointError(f"part={part!r} is not one {path} has; parts: {listing}")
    info = dict(parts[part])
    want = info["source"] + "." + info["prefix"]
    if saved is None:
        state = _sharded_tensors(path, want)
    else:
        flat = {f"{info['source']}.{k}": v for k, v in strip_prefixes(saved.get(info["source"], {})).items()}
        state = {k[len(want):]: v for k, v in flat.items() if k.startswith(want)}
    if not state:
        raise CheckpointError(f"{path}: holds no weights under {want!r} for part {part!r}")
    if info.get("lora_scale"):
        state = merge_lora_state(state, float(info["lora_scale"]))
    config = path.parent.parent / "config.json" if path.parent.name == "checkpoints" else None
    info.update(step=step, checkpoint=str(path), part=part)
    if config is not None and config.is_file():
        info["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    return state, info


def _sharded_tensors(path: Path, want: str) -> dict[str, Tensor]:
    """The tensors under ``want`` of a ``.dcp`` folder, gathered whole in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from stepkit.checkpoint.safe_metadata import read_metadata, safe_planner, safe_reader
    from stepkit.checkpoint.sharded import _one_process_is_intended

    records = read_metadata(path).state_dict_metadata
    source = want.split(".", 1)[0]
    buffers = {fqn[len(source) + 1:]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
               for fqn, md in records.items()
               if fqn.startswith(want) and isinstance(md, TensorStorageMetadata)}
    with _one_process_is_intended():
        dcp.load({source: buffers}, storage_reader=safe_reader(path), planner=safe_planner())
    prefix = want[len(source) + 1:]
    return {k[len(prefix):]: v for k, v in strip_prefixes(buffers).items()}

"""Start a run from weights: a finished run's part, an export, or a timm / DINO / I-JEPA / DINOv2 state dict.

Weights only: the optimizer, the schedules and the step start fresh (to
continue a run use ``--resume``). A recipe loads them into its online
network before it copies the EMA target from it, so both start alike.
ViT position embeddings are resized to the new patch grid; keys the two
sides do not share are listed, never silently dropped; a shape that differs
is refused before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from stepkit.checkpoint import FORMAT, CheckpointError
from stepkit.weights.export import read_exported
from stepkit.weights.parts import WRAPPER_PREFIXES, read_part, strip_prefixes
from stepkit.weights.vit_keys import resize_pos_embed, vit_names

try:  # tyro's flag name: --init.from (``from`` is a Python keyword, so the field is ``from_``)
    from tyro.conf import arg as _flag_name
    _FROM = _flag_name(name="from")
except ImportError:  # pragma: no cover - tyro is a dependency
    _FROM = None

__all__ = ["FOREIGN_KEYS", "InitConfig", "InitReport", "init_from", "read_weights"]

# In a state-dict file that holds several networks, the one to take when --init.key is not given:
# I-JEPA's EMA encoder, DINO's teacher, then the usual containers.
FOREIGN_KEYS = ("target_encoder", "teacher", "model", "state_dict", "encoder")


@dataclasses.dataclass
class InitConfig:
    """``--init.*``: the weights a run starts from (weights only; a fresh optimizer, step 0).

    Examples:
        >>> InitConfig().load_into(torch.nn.Linear(2, 2), part="teacher") is None  # no --init.from
        True
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True  # a resumed run reads its checkpoint instead

    from_: Annotated[Path | None, _FROM] = None
    """A run directory, a stepkit checkpoint, an exported .safetensors or timm folder, a Hugging Face
    DINOv2 folder, or a state dict (.pth/.pt/.bin/.safetensors) in timm's, DINO's, I-JEPA's or
    DINOv2's layout; None: random init."""
    part: str = ""
    """The part of a run or checkpoint to take ('' : the recipe's own, e.g. DINO's teacher)."""
    checkpoint: str = "last"
    """Which checkpoint of a run directory: last, best or step_N."""
    key: str = ""
    """A state-dict file holding several networks: the entry to take ('': the first of
    target_encoder, teacher, model, state_dict, encoder)."""

    def load_into(self, module: nn.Module, *, part: str) -> InitReport | None:
        """``init_from`` with these flags (``part`` unless ``--init.part`` names another); None when
        ``--init.from`` is not set."""
        if self.from_ is None:
            return None
        return init_from(module, self.from_, part=self.part or part, checkpoint=self.checkpoint, key=self.key)


@dataclasses.dataclass
class InitReport:
    """What ``init_from`` loaded: ``loaded`` tensors; ``missing`` (kept as initialised) and
    ``unexpected`` (in the file, not in the model) keys; ``notes`` on resized positions.

    Examples:
        >>> print(InitReport("vit.pth", 52, ["cls_token"], [], [], {}).line())
        init: 52 tensors from vit.pth; missing (kept as initialised): cls_token
    """

    source: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    notes: list[str]
    described: dict[str, Any]

    def line(self) -> str:
        """One line for the console."""
        what = self.described.get("part")
        step = self.described.get("step")
        origin = f" (part {what}, step {step})" if what else ""
        text = f"init: {self.loaded} tensors from {self.source}{origin}"
        text += f"; missing (kept as initialised): {_short(self.missing)}" if self.missing else ""
        text += f"; unexpected (not loaded): {_short(self.unexpected)}" if self.unexpected else ""
        return text + "".join(f"; {n}" for n in self.notes)

    def as_dict(self) -> dict[str, Any]:
        """For ``summary.json``."""
        return {"source": self.source, "loaded": self.loaded, "missing": self.missing,
                "unexpected": self.unexpected, "notes": self.notes,
                **{k: self.described[k] for k in ("part", "step", "config_sha256") if k in self.described}}


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_weights(source: str | os.PathLike, *, part: str, checkpoint: str = "last", key: str = ""
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors ``source`` holds for one network, and what is known of them (empty for a foreign file).

    Args:
        source: See ``InitConfig.from_``.
        part: For a run or a stepkit checkpoint: the part to take.
        checkpoint: For a run directory: ``last``, ``best`` or ``step_N``.
        key: For a state-dict file of several networks: the entry to take.

    Raises:
        ValueError: naming ``init.from`` and the file, for a path that is none of those.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "release.pth"
        >>> torch.save({"teacher": {"backbone.w": torch.ones(2)}, "epoch": 100}, path)
        >>> weights, described = read_weights(path, part="")
        >>> sorted(weights), described
        (['backbone.w'], {'part': 'teacher'})
    """
    path = Path(source)
    if not path.exists():
        raise ValueError(f"init.from={str(path)!r}: no such file or folder")
    if path.is_dir():
        if (path / "stepkit.json").is_file():
            return read_exported(path)
        if (path / "model.safetensors").is_file():  # a timm / Hugging Face folder
            return _foreign(_safetensors(path / "model.safetensors"), path, key)
        return read_part(path, part, checkpoint=checkpoint)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"init.from={str(path)!r}: not a readable safetensors file ({err})") from None
        if "stepkit" in header:
            return read_exported(path)
        return _foreign(_safetensors(path), path, key)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one line
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"init.from={str(path)!r}: not a checkpoint or state dict that loads without "
                         f"running code ({reason})") from None
    if isinstance(loaded, dict) and loaded.get("format") == FORMAT:
        return read_part(path, part)
    return _foreign(loaded, path, key)


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"init.from={str(path)!r}: not a readable safetensors file ({err})") from None


def _foreign(loaded: Any, path: Path, key: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A state dict from another project: the entry ``key`` (or the first of ``FOREIGN_KEYS``)."""
    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, Tensor) for v in d.values())

    if key:
        if not isinstance(loaded, dict) or key not in loaded or not is_state(loaded[key]):
            entries = sorted(k for k, v in loaded.items() if is_state(v)) if isinstance(loaded, dict) else []
            raise ValueError(f"init.key={key!r} is not an entry of {path} holding tensors; "
                             f"entries: {', '.join(entries) or 'none'}")
        return dict(loaded[key]), {}
    if is_state(loaded):
        return dict(loaded), {}
    if isinstance(loaded, dict):
        for name in FOREIGN_KEYS:
            if is_state(loaded.get(name)):
                return dict(loaded[name]), {"part": name}
        entries = sorted(k for k, v in loaded.items() if is_state(v))
        if entries:
            raise ValueError(f"init.from={str(path)!r} holds several networks ({', '.join(entries)}): "
                             "pass --init.key NAME")
    raise ValueError(f"init.from={str(path)!r}: holds no state dict (a dict of tensors)")


def init_from(module: nn.Module, source: str | os.PathLike, *, part: str, checkpoint: str = "last",
              key: str = "") -> InitReport:
    """Load ``source``'s weights into ``module`` (in place), weights only.

    A foreign state dict is matched to the module's names: wrapper prefixes
    (``module.``, ``_orig_mod.``) dropped, the one leading prefix kept that
    matches most names (DINO's ``backbone.``), timm's ViT names mapped to
    stepkit's, as are Hugging Face's DINOv2 names. ViT position embeddings are resized to the module's grid (a
    saved grid without a class-token row, as I-JEPA's, gets the module's
    own); a ViT with fixed sine-cosine positions keeps its own.

    Args:
        module: The network to fill (before any DDP / FSDP wrapping).
        source: See ``InitConfig.from_``.
        part: For a run or a stepkit checkpoint, the part to take.
        checkpoint: For a run directory: ``last``, ``best`` or ``step_N``.
        key: For a state-dict file of several networks: the entry to take.

    Returns:
        What was loaded (``InitReport``; ``.line()`` to print, ``.as_dict()`` for the summary).

    Raises:
        ValueError: one line naming ``init.from`` and the key, for another architecture (a shape,
            a patch size or a class that differs), or a source with nothing that fits.

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit.models import VisionTransformer
        >>> trained = VisionTransformer.preset("toy", img_size=16)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "timm_layout.pth"
        >>> from stepkit.weights.vit_keys import to_timm
        >>> released = {"module.backbone." + k: v for k, v in to_timm(trained.state_dict()).items()}
        >>> torch.save({"teacher": released}, path)
        >>> larger = VisionTransformer.preset("toy", img_size=32)  # a 8 x 8 grid instead of 4 x 4
        >>> report = init_from(larger, path, part="")
        >>> report.loaded, report.missing, torch.equal(larger.blocks[0].attn.qkv.weight,
        ...                                            trained.blocks[0].attn.qkv.weight)
        (54, [], True)
    """
    try:
        state, described = read_weights(source, part=part, checkpoint=checkpoint, key=key)
    except CheckpointError as err:
        raise ValueError(f"init.from={str(source)!r}: {err}") from None
    arch = described.get("arch", {}).get("class")
    encoder = getattr(module, "encoder", None)
    if arch and arch != type(module).__name__ and isinstance(encoder, nn.Module) \
            and type(encoder).__name__ == arch:
        module = encoder  # a tower's encoder alone (e.g. a DINO backbone into a contrastive image tower)
    if arch and arch != type(module).__name__:
        raise ValueError(f"init.from={str(source)!r} holds a {arch}, and this run builds a "
                         f"{type(module).__name__}: choose the same architecture (--model.*)")
    state = strip_prefixes(state, WRAPPER_PREFIXES)
    if not arch and isinstance(encoder, nn.Module) and _hits(state, encoder) > _hits(state, module):
        module = encoder  # a foreign state dict of the tower's encoder
    own = module.state_dict()
    # peft adapters in this model: saved plain weights go to their base layers, the adapters start fresh
    plain = {_without_adapters(k): k for k in own if ".lora_" not in k}
    vit = hasattr(module, "pos_embed_for")
    matched = _matched(state, {k: own[v] for k, v in plain.items()}, vit=vit)
    state = {plain.get(k, k): v for k, v in matched.items()}
    notes: list[str] = []
    if vit and "pos_embed" in state:
        positions, note = _positions(module, state["pos_embed"], own["pos_embed"])
        if note:
            notes.append(note)
        if positions is None:
            del state["pos_embed"]
        else:
            state["pos_embed"] = positions
    shared = [k for k in state if k in own]
    if not shared:
        raise ValueError(f"init.from={str(source)!r}: none of its {len(state)} tensors has a name this "
                         f"{type(module).__name__} has (e.g. {next(iter(state), 'none')!r} vs "
                         f"{next(iter(own))!r}): another architecture")
    for name in shared:
        if tuple(state[name].shape) != tuple(own[name].shape):
            hint = _shape_hint(name, state[name], own[name])
            raise ValueError(f"init.from={str(source)!r}: {name}: saved {tuple(state[name].shape)}, this "
                             f"model {tuple(own[name].shape)}{hint}: another architecture")
    with torch.no_grad():
        module.load_state_dict({k: state[k] for k in shared}, strict=False)
    missing = [k for k in own if k not in state and ".lora_" not in k]
    if "pos_embed" in missing and getattr(module, "fixed_positions", False):
        missing.remove("pos_embed")
    if any(".lora_" in k for k in own):
        notes.append("LoRA adapters start fresh")
    unexpected = [k for k in state if k not in own]
    return InitReport(str(source), len(shared), missing, unexpected, notes, described)


def _without_adapters(name: str) -> str:
    """A parameter's name in the model without peft's wrapping (``base_model.model.``, ``.base_layer``)."""
    return name.replace("base_model.model.", "").replace(".base_layer.", ".")


def _hits(state: dict[str, Tensor], module: nn.Module) -> int:
    """How many of ``state``'s tensors find their name in ``module`` (see ``_matched``)."""
    own = {_without_adapters(k) for k in module.state_dict()}
    vit = hasattr(module, "pos_embed_for")
    return sum(k in own for k in _matched(state, dict.fromkeys(own), vit=vit))  # type: ignore[arg-type]


def _matched(state: dict[str, Tensor], own: dict[str, Tensor], *, vit: bool) -> dict[str, Tensor]:
    """``state`` under the module's names: the leading prefix (or none) that matches most names."""
    swiglu = any(".mlp.w12." in k for k in own)

    def convert(s: dict[str, Tensor]) -> dict[str, Tensor]:
        return vit_names(s, swiglu=swiglu) if vit else s

    firsts = {k.split(".", 1)[0] + "." for k in state if "." in k}
    best = convert(state)
    best_hits = sum(k in own for k in best)
    for prefix in sorted(firsts):
        under = convert({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        hits = sum(k in own for k in under)
        if hits > best_hits:
            best, best_hits = under, hits
    return best


def _positions(module: nn.Module, saved: Tensor, own: Tensor) -> tuple[Tensor | None, str]:
    """Saved position embeddings fitted to the module's grid, and a note when they were changed."""
    if getattr(module, "fixed_positions", False):
        return None, "pos_embed: this ViT's fixed sine-cosine positions kept"
    grid = int(module.grid)  # type: ignore[arg-type]
    n_saved = saved.shape[1]
    with_class = n_saved != int(round(n_saved ** 0.5)) ** 2  # 1 + side^2 rows, or side^2
    resized = resize_pos_embed(saved, (grid, grid), class_token=with_class)
    has_class = bool(getattr(module, "pos_prefix", 1))
    if has_class and not with_class:  # I-JEPA's grid into a ViT with a class token: its own position
        resized = torch.cat([own[:, :1].to(resized), resized], dim=1)
    if with_class and not has_class:  # the other way: the class token's position has no place
        resized = resized[:, 1:]
    notes = []
    side = int(round((n_saved - with_class) ** 0.5))
    if side != grid:
        notes.append(f"pos_embed: {side}x{side} grid resized to {grid}x{grid}")
    if has_class and not with_class:
        notes.append("the class token's position kept as initialised")
    if with_class and not has_class:
        notes.append("the class token's position left out (this ViT has no class token)")
    return resized, ", ".join(notes)


def _shape_hint(name: str, saved: Tensor, own: Tensor) -> str:
    if name == "patch_embed.weight" and saved.ndim == own.ndim == 4 and saved.shape[-1] != own.shape[-1]:
        return f" (patch size {saved.shape[-1]} saved, {own.shape[-1]} here: --model.patch-size)"
    if saved.ndim == own.ndim == 4 and saved.shape[1] != own.shape[1]:
        return f" ({saved.shape[1]} input channels saved, {own.shape[1]} here)"
    return ""


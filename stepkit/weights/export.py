"""A part of a run as plain weights in the format the rest of your work uses, and back as a module.

    stepkit export runs/dino --part teacher --out teacher.safetensors
    stepkit export runs/ijepa --part target --format timm --out vit_target/
    stepkit export runs/contrastive --part text --format sentence-transformers --out st_text/

Formats:

- ``safetensors``: one file (tensors only, nothing that runs code), with the
  part's description in its header (architecture, input size, channels,
  normalisation, step, the run's config hash) and again beside it in ``STEM.json``.
  ``load_exported(PATH)`` rebuilds the module from it, without the recipe.
- ``timm`` (ViT parts): a folder timm reads as it is, ``config.json`` and
  ``model.safetensors`` under timm's names, e.g.
  ``timm.create_model("local-dir:PATH", pretrained=True)``.
- ``sentence-transformers`` (text towers on a Hugging Face encoder): a folder
  ``SentenceTransformer(PATH)`` loads, giving the tower's embeddings
  (encoder, mean pooling, the projection, L2 normalisation).
- ``hf``: for those towers, the encoder alone as ``AutoModel.from_pretrained``
  reads it (with its tokenizer), and the projection beside it in
  ``projection.safetensors``; for a ViT with a class token and learned
  positions, a ``Dinov2Model`` (``Dinov2WithRegistersModel`` with registers)
  folder under the hub's names, giving the ViT's features (a ViT without
  LayerScale gets scales of one).

Every export gets a model card (``stepkit.weights.card``): ``README.md`` in a folder, ``STEM.md``
beside a file. Nothing is ever written over an existing path unless ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepkit._atomic import atomic_write_bytes
from stepkit.models.arguments import build_arch
from stepkit.weights.card import model_card
from stepkit.weights.parts import read_part
from stepkit.weights.vit_keys import hf_dinov2_config, timm_model_name, to_hf_dinov2, to_timm, vit_names

__all__ = ["EXPORT_FORMATS", "export", "load_exported", "read_exported"]

EXPORT_FORMATS = ("safetensors", "timm", "sentence-transformers", "hf")
_HEADER_KEY = "stepkit"


def export(source: str | os.PathLike, part: str, out: str | os.PathLike, *, format: str = "safetensors",
           checkpoint: str = "last", force: bool = False) -> Path:
    """Write ``part`` of the run (or checkpoint) ``source`` to ``out`` in ``format``.

    Args:
        source: A run directory, a ``.pt`` checkpoint or a ``.dcp`` folder (gathered in one process).
        part: A part the recipe named (``stepkit export RUN`` without ``--part`` lists them).
        out: A file (``safetensors``) or a folder (the other formats).
        format: One of ``EXPORT_FORMATS``.
        checkpoint: ``last``, ``best`` or ``step_N`` when ``source`` is a run directory.
        force: Replace ``out`` if it exists.

    Returns:
        The path written.

    Raises:
        ValueError: for a format the part cannot take, or an ``out`` that exists (without ``force``).
        CheckpointError: for a missing checkpoint or part.

    Examples:
        >>> from stepkit.weights import describe_part
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_last
        >>> from stepkit.models import SmallCNN
        >>> net = SmallCNN(1, (4,))
        >>> parts = {"encoder": describe_part(net, source="model", prefix="", about="a CNN")}
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=3)
        >>> _ = save_last(run / "checkpoints", state, meta={"parts": parts})
        >>> out = export(run, "encoder", run / "encoder.safetensors")
        >>> torch.equal(load_exported(out).features[0].weight, net.features[0].weight)
        True
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is not allowed: one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if format == "safetensors" and not out.suffix:
        out = out.with_suffix(".safetensors")
    if out.exists() and not force:
        raise ValueError(f"out={str(out)!r} exists; choose another path or pass --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"out={str(out)!r}: {out.parent} is a file, not a folder; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)  # as torch.save users expect of a new path
    state, info = read_part(source, part, checkpoint=checkpoint)
    arch = info["arch"]
    if format == "timm" and arch["class"] != "VisionTransformer":
        raise ValueError(f"format='timm' needs a ViT part; {part!r} is a {arch['class']} "
                         "(use --format safetensors)")
    vit = arch["class"] == "VisionTransformer"
    if format == "timm" and vit and arch["arguments"].get("ffn", "mlp") != "mlp":
        raise ValueError(f"format='timm': {part!r} has a SwiGLU feed-forward, which timm builds only under "
                         "its DINOv2 giant's name; use --format hf or safetensors")
    if (format == "sentence-transformers" or (format == "hf" and not vit)) and not _hf_text_tower(arch):
        raise ValueError(f"format={format!r} needs a text tower on a Hugging Face encoder"
                         f"{' or a ViT' if format == 'hf' else ''}; {part!r} is a "
                         f"{_describe_arch(arch)} (use --format safetensors)")
    if format == "hf" and vit:
        hf_dinov2_config(arch["arguments"])  # refuses a ViT DINOv2's model cannot be, before any writing
    writer = {"safetensors": _write_safetensors, "timm": _write_timm,
              "sentence-transformers": _write_sentence_transformers,
              "hf": _write_hf_dinov2 if vit else _write_hf}[format]
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = writer(state, info, staging / out.name)
        card = written / "README.md" if written.is_dir() else written.with_suffix(".md")
        atomic_write_bytes(card, model_card(info, format, out.name).encode())
        _replace(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _replace(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an old ``out`` goes only once the new one is complete."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    for beside in (".json", ".md"):  # a file's description and card
        if new.suffix == ".safetensors" and new.with_suffix(beside).exists():
            os.replace(new.with_suffix(beside), out.with_suffix(beside))
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _describe_arch(arch: dict) -> str:
    inner = arch.get("arguments", {}).get("encoder")
    return f"{arch['class']} over a {inner['class']}" if isinstance(inner, dict) else arch["class"]


def _hf_text_tower(arch: dict) -> bool:
    inner = arch.get("arguments", {}).get("encoder")
    return arch["class"] == "ProjectedTower" and isinstance(inner, dict) \
        and inner.get("class") == "PretrainedTextEncoder"


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _safetensors_bytes(state: dict[str, Tensor], header: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(_contiguous(state), metadata=header)


def _write_safetensors(state: dict[str, Tensor], info: dict[str, Any], path: Path) -> Path:
    atomic_write_bytes(path, _safetensors_bytes(state, {_HEADER_KEY: json.dumps(info)}))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(info, indent=2).encode() + b"\n")
    return path


def _write_timm(state: dict[str, Tensor], info: dict[str, Any], folder: Path) -> Path:
    folder.mkdir()
    a = info["arch"]["arguments"]
    name = timm_model_name(a["dim"], a["depth"], a["heads"], a["patch_size"], a["img_size"],
                           dinov2=a.get("layer_scale") is not None, registers=a.get("registers", 0))
    class_token = a.get("class_token", True)
    # without a class token: the mean of the normed patch tokens, timm's "avg" pool with no fc_norm
    pool = {"global_pool": "token"} if class_token else {"global_pool": "avg", "class_token": False,
                                                          "fc_norm": False}
    model_args = {"img_size": a["img_size"], "patch_size": a["patch_size"], "in_chans": a["in_chans"],
                  "embed_dim": a["dim"], "depth": a["depth"], "num_heads": a["heads"],
                  "mlp_ratio": a["mlp_ratio"], **pool}
    if a.get("layer_scale") is not None:
        model_args["init_values"] = a["layer_scale"]
    if a.get("registers", 0):  # as timm's DINOv2 ViTs with registers: no position on the prefix tokens
        model_args.update(reg_tokens=a["registers"], no_embed_class=True)
    facts = info.get("input", {})
    size = facts.get("size", a["img_size"])
    pretrained_cfg = {"input_size": [a["in_chans"], size, size], "mean": facts.get("mean"),
                      "std": facts.get("std"), "num_classes": 0, "interpolation": "bicubic",
                      "crop_pct": facts.get("crop_pct", 1.0)}
    config = {"architecture": name, "num_classes": 0, "global_pool": pool["global_pool"],
              "model_args": model_args,
              "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None}}
    atomic_write_bytes(folder / "model.safetensors", _safetensors_bytes(to_timm(state)))
    atomic_write_bytes(folder / "config.json", json.dumps(config, indent=2).encode() + b"\n")
    atomic_write_bytes(folder / "stepkit.json", json.dumps(info, indent=2).encode() + b"\n")
    return folder


def _write_hf_dinov2(state: dict[str, Tensor], info: dict[str, Any], folder: Path) -> Path:
    folder.mkdir()
    config = hf_dinov2_config(info["arch"]["arguments"], image_size=info.get("input", {}).get("size"))
    weights = _safetensors_bytes(to_hf_dinov2(state), {"format": "pt"})
    atomic_write_bytes(folder / "model.safetensors", weights)
    atomic_write_bytes(folder / "config.json", json.dumps(config, indent=2).encode() + b"\n")
    atomic_write_bytes(folder / "stepkit.json", json.dumps(info, indent=2).encode() + b"\n")
    return folder


def _text_parts(state: dict[str, Tensor], info: dict[str, Any]) -> tuple[nn.Module, dict[str, Tensor], Any]:
    """The tower's Hugging Face encoder (loaded), its projection's tensors and its tokenizer."""
    tower = build_arch(info["arch"])
    tower.load_state_dict(state)
    tokenizer = None
    path = info.get("tokenizer", {}).get("path")
    if path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    projection = {k.removeprefix("proj."): v for k, v in state.items() if k.startswith("proj.")}
    return tower.encoder.model, projection, tokenizer  # type: ignore[union-attr,return-value]


def _write_hf(state: dict[str, Tensor], info: dict[str, Any], folder: Path) -> Path:
    encoder, projection, tokenizer = _text_parts(state, info)
    encoder.save_pretrained(folder)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    atomic_write_bytes(folder / "projection.safetensors", _safetensors_bytes(projection))
    atomic_write_bytes(folder / "stepkit.json", json.dumps(info, indent=2).encode() + b"\n")
    return folder


def _write_sentence_transformers(state: dict[str, Tensor], info: dict[str, Any], folder: Path) -> Path:
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]

    encoder, projection, tokenizer = _text_parts(state, info)
    if tokenizer is None:
        raise ValueError("format='sentence-transformers' needs the tower's tokenizer, and this part "
                         "names none (use --format hf)")
    hf = folder.with_name(folder.name + ".encoder")
    encoder.save_pretrained(hf)  # type: ignore[operator]
    tokenizer.save_pretrained(hf)
    max_len = int(info.get("tokenizer", {}).get("max_len", 256))
    transformer = models.Transformer(str(hf), max_seq_length=max_len)
    width = encoder.config.hidden_size  # type: ignore[union-attr]
    dense = models.Dense(width, projection["weight"].shape[0], bias=True,
                         activation_function=nn.Identity())
    dense.linear.load_state_dict(projection)
    model = SentenceTransformer(modules=[transformer, models.Pooling(width, pooling_mode="mean"), dense,
                                         models.Normalize()], device="cpu")
    model.save(str(folder))
    atomic_write_bytes(folder / "stepkit.json", json.dumps(info, indent=2).encode() + b"\n")
    shutil.rmtree(hf)
    return folder


def read_exported(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An exported part's tensors (stepkit's names) and description: a ``safetensors`` file, or a
    ``timm`` or ViT ``hf`` folder that ``export`` wrote.

    Raises:
        ValueError: naming the path, for a file that is not an export of stepkit's (or cannot be read).

    Examples:
        >>> from stepkit.weights import describe_part
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_last
        >>> from stepkit.models import SmallCNN
        >>> net = SmallCNN(1, (4,))
        >>> parts = {"encoder": describe_part(net, source="model", prefix="", about="a CNN")}
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=3)
        >>> _ = save_last(run / "checkpoints", state, meta={"parts": parts})
        >>> weights, info = read_exported(export(run, "encoder", run / "encoder.safetensors"))
        >>> info["arch"]["class"], info["step"], sorted(weights)[0]
        ('SmallCNN', 3, 'features.0.weight')
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    timm_folder = path.is_dir() and (path / "stepkit.json").is_file() \
        and (path / "model.safetensors").is_file()
    file = path / "model.safetensors" if timm_folder else path
    if not file.is_file():
        raise ValueError(f"{path}: no such exported weights file (a .safetensors file, or a folder "
                         "stepkit export wrote)")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(file))
        text = (path / "stepkit.json").read_text() if timm_folder else header[_HEADER_KEY]
        info = json.loads(text)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not weights exported by stepkit ({type(err).__name__}: {err})") from None
    return (_vit_from_folder(state, info["arch"]) if timm_folder else state), info


def _vit_from_folder(state: dict[str, Tensor], arch: dict[str, Any]) -> dict[str, Tensor]:
    """A ``timm`` or ``hf`` folder's ViT tensors under stepkit's names, as the recorded ViT has them: the
    scales of one and the zero mask token an ``hf`` export adds dropped, the mask token timm has no place
    for back at zero."""
    a = arch.get("arguments", {})
    state = vit_names(state, swiglu=a.get("ffn", "mlp") == "swiglu")
    if a.get("layer_scale") is None:
        state = {k: v for k, v in state.items() if not k.endswith((".ls1.gamma", ".ls2.gamma"))}
    if not a.get("mask_token", False):
        state.pop("mask_token", None)
    elif "mask_token" not in state:
        state["mask_token"] = torch.zeros(1, a["dim"])
    return state


def load_exported(path: str | os.PathLike) -> nn.Module:
    """The module an exported part describes, with its weights, in eval mode (no recipe needed).

    Args:
        path: What ``export`` wrote in the ``safetensors`` or ``timm`` format.

    Returns:
        The module (``module.exported`` holds its description: input size, mean/std, step...).

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit.weights.export import _write_safetensors
        >>> from stepkit.weights.parts import describe_part
        >>> from stepkit.models import SmallCNN
        >>> net = SmallCNN(1, (4,)).eval()
        >>> info = describe_part(net, source="model", prefix="", about="a CNN")
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "cnn.safetensors"
        >>> path = _write_safetensors(net.state_dict(), info, path)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> torch.equal(load_exported(path)(x), net(x))
        True
    """
    state, info = read_exported(path)
    module = build_arch(info["arch"])
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit its architecture ({err})") from None
    module.exported = info  # type: ignore[assignment]
    return module.eval()

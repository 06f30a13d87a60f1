"""A model card beside exported weights: what the run trained on, its settings, its numbers, how to load it.

``stepkit export`` writes one with every part, in the style of the Hugging Face hub's README files that
sentence-transformers and timm publish (YAML front matter, then Markdown): ``README.md`` inside a
folder export, ``STEM.md`` beside a ``.safetensors`` file. Everything in it is read from the run
directory (``config.json``, ``summary.json``, ``provenance.jsonl``) and the part's description; a
checkpoint outside a run directory gets a card that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["model_card", "CARD_NUMBERS"]

CARD_NUMBERS = ("knn_acc", "linear_acc", "recall_at_", "mrr_at_", "ndcg_at_", "voxel_corr", "effective_rank")
"""The summary keys a card reports (a key starting with one of these)."""

_LOAD = {  # format -> (the hub's library_name, how to load it)
    "safetensors": ("stepkit", "from stepkit.weights import load_exported\n\n"
                    'model = load_exported("{path}")'),
    "timm": ("timm", 'import timm\n\nmodel = timm.create_model("local-dir:{path}", pretrained=True)'),
    "sentence-transformers": ("sentence-transformers",
                              "from sentence_transformers import SentenceTransformer\n\n"
                              'model = SentenceTransformer("{path}")\nembeddings = model.encode(["a text"])'),
    "hf": ("transformers", "from transformers import AutoModel\n\n"
           'model = AutoModel.from_pretrained("{path}")'),
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_provenance(run: Path) -> dict[str, Any]:
    try:
        lines = (run / "provenance.jsonl").read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def model_card(info: dict[str, Any], format: str, name: str) -> str:
    """The card of an exported part (``info``: what ``read_part`` returned for it; ``name``: the file or
    folder written, as the loading example names it).

    Args:
        info: The part's description (``arch``, ``about``, ``part``, ``step``, ``checkpoint``, input facts).
        format: The export format (``stepkit.weights.EXPORT_FORMATS``).
        name: The exported file or folder's name.

    Returns:
        The card's Markdown, YAML front matter first.

    Examples:
        >>> card = model_card({"arch": {"class": "SmallCNN"}, "about": "a CNN", "part": "encoder", "step": 3,
        ...                    "checkpoint": "/nowhere/last.pt"}, "safetensors", "encoder.safetensors")
        >>> card.splitlines()[:3], "load_exported(\\"encoder.safetensors\\")" in card
        (['---', 'library_name: stepkit', 'tags:'], True)
    """
    checkpoint = Path(info.get("checkpoint", ""))
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    config = _read_json(run / "config.json") if run else None
    summary = _read_json(run / "summary.json") if run else None
    provenance = _last_provenance(run) if run else {}
    recipe = Path(provenance.get("recipe", "")).stem or "unknown"
    library, load = _LOAD[format]
    by = " ".join(["stepkit", provenance.get("stepkit", "")]).strip()
    about = info.get("about") or "a part"
    lines = ["---", f"library_name: {library}", "tags:", "- stepkit", f"- {recipe}", "---", "",
             f"# {info.get('part', 'part')} of {run.name if run else checkpoint.name}", "",
             f"{about[0].upper() + about[1:]}: a `{info['arch']['class']}`, exported by {by} "
             f"from `{checkpoint.name}` (update {info.get('step', '?')}).", ""]
    lines += ["## Training", ""]
    if run is None:
        lines += ["The checkpoint was exported on its own, outside its run directory: no settings or numbers "
                  "travel with it.", ""]
    else:
        argv = " ".join(provenance.get("argv", [])) or "(not recorded)"
        lines += [f"- recipe: `{recipe}` (sha256 `{provenance.get('recipe_sha256', '?')}`)",
                  f"- command: `{argv}`",
                  f"- torch {provenance.get('torch', '?')}, {provenance.get('threads', '?')} threads",
                  f"- config sha256: `{info.get('config_sha256', '?')}`", ""]
        if config is not None:
            data = config.get("data", {})
            lines += [f"Data (`--data.*`): `{json.dumps(data, sort_keys=True)}`", "",
                      "<details><summary>The whole config (config.json)</summary>", "", "```json",
                      json.dumps(config, indent=2, sort_keys=True), "```", "", "</details>", ""]
    facts = {k: info[k] for k in ("input", "tokenizer") if k in info}
    if facts:
        lines += ["## Input", "", "```json", json.dumps(facts, indent=2, sort_keys=True), "```", ""]
    lines += ["## Evaluation", ""]
    numbers = {k: v for k, v in (summary or {}).items()
               if k.startswith(CARD_NUMBERS) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if summary and numbers:
        at = summary.get("steps", "?")
        other = f"; this export is of update {info['step']}" if info.get("step") not in (None, at) else ""
        lines += [f"The run's own held-out numbers at its end (`summary.json`, update {at}{other}):", "",
                  "| metric | value |", "| --- | --- |",
                  *(f"| `{k}` | {v:.4f} |" for k, v in numbers.items()), ""]
    else:
        lines += ["No evaluation numbers: the run has no `summary.json` (unfinished, or exported on its "
                  "own); `stepkit eval RUN` measures a checkpoint.", ""]
    lines += ["## How to load", "", "```python", load.format(path=name), "```", ""]
    return "\n".join(lines)

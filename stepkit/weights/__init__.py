"""Weights in and out: a part of a run exported as plain weights (safetensors, timm, Hugging Face,
sentence-transformers), rebuilt without the recipe, and weights loaded into a new run.

- ``parts``: what a recipe calls its parts, and one part's tensors read from a checkpoint.
- ``export``: ``export(run, part, out, format=...)``, ``load_exported(path)``; ``card``: the model
  card written beside every export.
- ``init``: ``init_from(module, source, ...)``: weights only, from a run, an export, or a timm /
  DINO / I-JEPA / DINOv2 (original or Hugging Face) state dict; position embeddings resized; missing
  and unexpected keys reported.
"""

from stepkit.weights.export import EXPORT_FORMATS, export, load_exported, read_exported
from stepkit.weights.init import InitConfig, InitReport, init_from, read_weights
from stepkit.weights.parts import (
           checkpoint_parts,
           describe_part,
           find_checkpoint,
           merge_lora_state,
           read_part,
)
from stepkit.weights.vit_keys import (
    from_hf_dinov2,
    from_timm,
    hf_dinov2_config,
    resize_pos_embed,
    timm_model_name,
    to_hf_dinov2,
    to_timm,
    vit_names,
)

__all__ = ["EXPORT_FORMATS", "InitConfig", "InitReport", "checkpoint_parts", "describe_part", "export",
           "find_checkpoint", "from_hf_dinov2", "from_timm", "hf_dinov2_config", "init_from", "load_exported",
           "merge_lora_state", "read_exported",
           "read_part", "read_weights", "resize_pos_embed", "timm_model_name", "to_hf_dinov2", "to_timm",
           "vit_names"]

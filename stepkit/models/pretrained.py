"""Pretrained Hugging Face encoders as towers, and LiT-style locking of a tower's first layers.

``PretrainedImageEncoder`` wraps any image model ``transformers.AutoModel``
loads (ViT, DINOv2, DeiT, BEiT, CLIP's or SigLIP's vision tower) and gives
one vector per image; ``pretrained_image_stats`` reads the normalisation its
folder was trained with; ``lock`` freezes a tower whole or its embeddings and
first N blocks (Zhai et al. 2022, "LiT": a locked image tower, a text tower
tuned to it).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from stepkit.models.arguments import records_arguments
from stepkit.models.text import text_extra

__all__ = ["PretrainedImageEncoder", "lock", "pretrained_image_stats"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Vision towers whose pooled output is the normed class token (the class token of their last hidden
# state is taken before the final norm).
_POOLED = ("clip_vision_model", "siglip_vision_model")


@records_arguments
class PretrainedImageEncoder(nn.Module):
    """A Hugging Face image encoder: one ``(B, dim)`` vector per image, its class token (or the pooled
    output of CLIP's and SigLIP's vision towers), positions interpolated for other image sizes.

    One-channel images are repeated to the model's three. A CLIP or SigLIP folder (both towers) gives
    its vision tower.

    Args:
        path: A folder (or, where a network exists, a hub name) for ``AutoModel.from_pretrained``.
        config: Instead, a Hugging Face config as a dict: the architecture, for weights loaded next.

    Examples:
        >>> import torch
        >>> from transformers import ViTConfig
        >>> config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                    intermediate_size=64, image_size=32, patch_size=8).to_dict()
        >>> encoder = PretrainedImageEncoder(config=config)
        >>> encoder(torch.rand(3, 1, 16, 16)).shape  # any size, one channel repeated
        torch.Size([3, 32])
    """

    def __init__(self, path: str | None = None, config: dict | None = None) -> None:
        super().__init__()
        transformers = text_extra("transformers")
        if config is not None:
            settings = dict(config)
            built = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
            model = transformers.AutoModel.from_config(built)
        elif path is not None:
            model = transformers.AutoModel.from_pretrained(path)
        else:
            raise ValueError("PretrainedImageEncoder needs a path (a Hugging Face folder) or a config")
        # CLIP / SigLIP (both towers) and their vision models: the vision transformer inside, so that
        # a folder of either kind and a rebuild from its config hold the same weight names
        self.model = model.vision_model if hasattr(model, "vision_model") else model
        settings = self.model.config
        self.dim = int(settings.hidden_size)
        self.channels = int(getattr(settings, "num_channels", 3))
        self.image_size = int(getattr(settings, "image_size", 224))

    def arch_arguments(self) -> dict:
        """Rebuilt from the model's config, not from the folder it was read from (``arch_record``)."""
        return {"config": self.model.config.to_dict()}

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        other_size = x.shape[-1] != self.image_size or x.shape[-2] != self.image_size
        try:
            out = self.model(pixel_values=x, interpolate_pos_encoding=other_size) if other_size \
                else self.model(pixel_values=x)
        except TypeError:  # a model that always interpolates (DINOv2) takes no such argument
            out = self.model(pixel_values=x)
        if self.model.config.model_type in _POOLED:
            return out.pooler_output
        return out.last_hidden_state[:, 0]


def pretrained_image_stats(path: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a Hugging Face image model's folder normalises with
    (``preprocessor_config.json``); ImageNet's when it says nothing.

    Examples:
        >>> pretrained_image_stats(None)
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    """
    config = Path(path) / "preprocessor_config.json" if path else None
    if config is None or not config.is_file():
        return _IMAGENET
    try:
        saved = json.loads(config.read_text())
        return tuple(saved["image_mean"]), tuple(saved["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return _IMAGENET


def _blocks(module: nn.Module) -> nn.ModuleList | None:
    """The first list of two or more blocks inside ``module`` (a ViT's blocks, a HF encoder's layers)."""
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1:
            return child
    return None


def lock(module: nn.Module, blocks: int | None = None) -> list[str]:
    """Freeze ``module`` (``blocks=None``), or its input embedding and first ``blocks`` blocks.

    Frozen parameters stop requiring gradients; the frozen modules are put in
    eval mode (dropout off, BatchNorm statistics kept), and stay so when the
    model is put back in training mode. Returns the frozen parameters' names.

    Examples:
        >>> from stepkit.models import VisionTransformer
        >>> vit = VisionTransformer.preset("toy", img_size=16)
        >>> names = lock(vit, blocks=2)
        >>> "blocks.1.attn.qkv.weight" in names, "blocks.2.attn.qkv.weight" in names, "cls_token" in names
        (True, False, True)
        >>> vit.train().blocks[0].training, vit.blocks[2].training
        (False, True)
    """
    if blocks is None:
        frozen = [module]
    else:
        stack = _blocks(module)
        if stack is None:
            raise ValueError(f"lock_image_blocks={blocks}: {type(module).__name__} has no list of blocks to "
                             "lock the first of (lock it whole)")
        if not 0 <= blocks <= len(stack):
            raise ValueError(f"lock_image_blocks={blocks} is not allowed: at most its {len(stack)} blocks")
        # everything that runs before the blocks: the embeddings (not the blocks' own or later norms)
        before = [m for name, m in module.named_children() if "embed" in name]
        before += [m for name, m in module.named_modules() if name.endswith("embeddings")]
        frozen = [*before, *list(stack)[:blocks]]
        for name, p in module.named_parameters(recurse=False):
            if name in ("cls_token", "pos_embed", "mask_token"):
                p.requires_grad_(False)
    for part in frozen:
        part.requires_grad_(False)
        _keep_eval(part)
    return [name for name, p in module.named_parameters() if not p.requires_grad]


def _keep_eval(module: nn.Module) -> None:
    """``module.train()`` leaves it in eval mode from now on."""
    def train(mode: bool = True, _module: nn.Module = module) -> nn.Module:
        return nn.Module.train(_module, False)

    module.train = train  # type: ignore[method-assign]
    module.eval()

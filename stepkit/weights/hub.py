"""timm's ViTs by name, as stepkit's ``VisionTransformer``, with their pretrained weights from the
Hugging Face hub where a network exists (timm itself is not needed: it would import torchvision).

``timm:vit_small_patch16_224.augreg_in21k_ft_in1k`` names the architecture
(``vit_<size>_patch<P>_<image size>``) and the weights (the hub repository
``timm/<name>``, whose ``model.safetensors`` is in timm's layout and whose
``config.json`` holds the normalisation).
"""

from __future__ import annotations

import json
import re
from typing import Any

from stepkit.models.vit import VisionTransformer
from stepkit.weights.vit_keys import TIMM_NAMES, from_timm

__all__ = ["TIMM_PREFIX", "timm_vit", "timm_vit_arguments"]

TIMM_PREFIX = "timm:"
_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(\.[\w.-]+)?")


def timm_vit_arguments(name: str) -> dict[str, Any]:
    """``VisionTransformer`` arguments of a timm ViT name (``vit_small_patch16_224[.tag]``).

    Raises:
        ValueError: naming ``model.image`` and the pattern, for a name that is not a plain timm ViT.

    Examples:
        >>> timm_vit_arguments("vit_base_patch16_224.augreg_in21k")
        {'dim': 768, 'depth': 12, 'heads': 12, 'patch_size': 16, 'img_size': 224}
    """
    match = _NAME.fullmatch(name.removeprefix(TIMM_PREFIX))
    if match is None:
        raise ValueError(f"model.image={name!r} is not allowed: a timm ViT name such as "
                         "timm:vit_small_patch16_224[.tag] (vit_tiny|small|base|large|huge_patch<P>_<size>)")
    size, patch, image = match.group(1), int(match.group(2)), int(match.group(3))
    dim, depth, heads = next(k for k, v in TIMM_NAMES.items() if v == f"vit_{size}")
    return {"dim": dim, "depth": depth, "heads": heads, "patch_size": patch, "img_size": image}


def timm_vit(name: str, *, pretrained: bool = True
             ) -> tuple[VisionTransformer, tuple[float, ...], tuple[float, ...]]:
    """stepkit's ViT of a timm name, with the hub's weights when ``pretrained``; and its mean / std.

    Args:
        name: ``[timm:]vit_<size>_patch<P>_<image size>[.tag]``.
        pretrained: Download ``timm/<name>`` from the Hugging Face hub (needs a network, or the hub's
            cache); False: the architecture alone (weights from ``--init.from``, say).

    Raises:
        ValueError: one line naming ``model.image``, for another name or weights that cannot be had.

    Examples:
        >>> vit, mean, std = timm_vit("timm:vit_tiny_patch16_224", pretrained=False)
        >>> vit.dim, vit.patch_size, mean
        (192, 16, (0.485, 0.456, 0.406))
    """
    arguments = timm_vit_arguments(name)
    model = VisionTransformer(**arguments)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if not pretrained:
        return model, mean, std
    repo = "timm/" + name.removeprefix(TIMM_PREFIX)
    try:
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        weights = load_file(hf_hub_download(repo, "model.safetensors"))
        config = json.loads(open(hf_hub_download(repo, "config.json"), encoding="utf-8").read())
    except Exception as err:  # noqa: BLE001 - offline, unknown repository, no hub package: one line
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.image={name!r}: cannot fetch the weights of {repo} from the Hugging Face "
                         f"hub ({reason}); where there is no network, pass the weights with --init.from FILE "
                         "(a timm state dict)") from None
    state = from_timm({k: v for k, v in weights.items() if not k.startswith(("head.", "fc_norm."))})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"model.image={name!r}: {repo}'s weights do not fit a plain ViT "
                         f"({str(err).splitlines()[0]})") from None
    cfg = config.get("pretrained_cfg", {})
    return model, tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))

"""DINO's projection head, and running a backbone over multi-crop views grouped by resolution."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit import check as _check

__all__ = ["DINOHead", "DINOModel", "WeightNormLinear", "cancel_last_layer_gradients", "resolution_groups",
           "multi_crop_forward"]


class DINOHead(nn.Module):
    """MLP (GELU, optional BatchNorm) -> bottleneck -> L2 normalise -> weight-normalised linear.

    ``nlayers`` linear layers before the bottleneck output (DINO: 3,
    hidden 2048, bottleneck 256). The last layer is ``weight_norm`` with one
    norm per output unit, ``W = g * V / ||V||`` row-wise; with
    ``norm_last_layer=True`` (DINO's default) ``g`` is fixed at 1, so its
    logits are cosine similarities in [-1, 1]. ``last_layer_init``: ``V``
    a truncated normal of std 0.02 (``stepkit``) or ``nn.Linear``'s default,
    uniform within +-1/sqrt(bottleneck) (``dino``, as DINO's code leaves it):
    only ``V``'s directions reach the logits, but its norm sets how far an
    update turns them.

    Examples:
        >>> head = DINOHead(16, 100, hidden=32, bottleneck=8)
        >>> head(torch.randn(4, 16)).shape
        torch.Size([4, 100])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden: int = 2048,
        bottleneck: int = 256,
        nlayers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
        last_layer_init: str = "stepkit",
    ) -> None:
        super().__init__()
        _check.integer_at_least("nlayers", nlayers, 1)
        dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(b)] if batch_norm else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fixed_norm=norm_last_layer,
                                           init=last_layer_init)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


class WeightNormLinear(nn.Module):
    """``y = x @ (g * V / ||V||_row)^T``, no bias (``torch.nn.utils.weight_norm`` with ``dim=0``).

    Examples:
        >>> layer = WeightNormLinear(3, 2)
        >>> [round(v, 4) for v in layer(torch.eye(3)).norm(dim=0).tolist()]  # unit-norm rows, g = 1
        [1.0, 1.0]
    """

    def __init__(self, in_dim: int, out_dim: int, *, fixed_norm: bool = True, init: str = "stepkit") -> None:
        super().__init__()
        _check.one_of("init", init, ("stepkit", "dino"))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        if init == "dino":  # nn.Linear's default, which DINO's weight-normed last layer keeps
            nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        else:
            nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


def cancel_last_layer_gradients(head: DINOHead, step: int, freeze_steps: int) -> None:
    """During the first ``freeze_steps`` updates, drop the last layer's gradients (DINO's
    ``freeze_last_layer``): it stays at its initial value while the rest of the head settles.
    Call between the backward pass and ``apply_update``.

    Examples:
        >>> head = DINOHead(4, 10, hidden=8, bottleneck=4)
        >>> head(torch.randn(2, 4)).sum().backward()
        >>> cancel_last_layer_gradients(head, step=0, freeze_steps=1)
        >>> all(p.grad is None for p in head.last_layer.parameters())
        True
    """
    if step < freeze_steps:
        for p in head.last_layer.parameters():
            p.grad = None


def resolution_groups(views: Sequence[Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` runs of consecutive views with the same spatial size.

    Examples:
        >>> resolution_groups([torch.zeros(1, 3, 8, 8)] * 2 + [torch.zeros(1, 3, 4, 4)] * 3)
        [(0, 2), (2, 5)]
    """
    groups: list[tuple[int, int]] = []
    for i, view in enumerate(views):
        if groups and views[groups[-1][0]].shape[-2:] == view.shape[-2:]:
            groups[-1] = (groups[-1][0], i + 1)
        else:
            groups.append((i, i + 1))
    return groups


def multi_crop_forward(backbone: nn.Module, head: nn.Module | None, views: Sequence[Tensor]) -> Tensor:
    """Backbone once per resolution (views of one size concatenated), head once over all.

    Returns ``(len(views) * B, out)``, views in order (view-major), as the
    DINO loss expects.

    Examples:
        >>> views = [torch.rand(2, 3, 8, 8)] * 2 + [torch.rand(2, 3, 4, 4)] * 3
        >>> multi_crop_forward(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), None,
        ...                    views).shape  # 5 views of 2 images, view-major
        torch.Size([10, 3])
    """
    features = [backbone(torch.cat(list(views[a:b]))) for a, b in resolution_groups(views)]
    out = torch.cat(features)
    return out if head is None else head(out)


class DINOModel(nn.Module):
    """A backbone and a DINO head over a list of views: ``(backbone features, head logits)``, view-major
    (the backbone once per resolution, ``multi_crop_forward``).

    Examples:
        >>> backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        >>> model = DINOModel(backbone, DINOHead(3, 5, hidden=8, bottleneck=4))
        >>> features, logits = model([torch.rand(2, 3, 8, 8)] * 2 + [torch.rand(2, 3, 4, 4)])
        >>> tuple(features.shape), tuple(logits.shape)
        ((6, 3), (6, 5))
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        features = multi_crop_forward(self.backbone, None, views)
        return features, self.head(features)

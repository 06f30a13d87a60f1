"""A contrastive tower: an encoder, then a linear map to the shared embedding space, L2-normalised."""

from __future__ import annotations

import torch  # noqa: F401  (the doctest's)
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit.models.arguments import records_arguments

__all__ = ["ProjectedTower"]


@records_arguments
class ProjectedTower(nn.Module):
    """``normalize(proj(encoder(...)))``: one tower of a two-tower (CLIP-style) model.

    Args:
        encoder: Any encoder with a ``dim`` attribute (its output width).
        embed_dim: The shared space's width (None: no projection, the encoder's own embeddings, as
            sentence-transformers' models give them).

    Examples:
        >>> from stepkit.models import SmallCNN
        >>> tower = ProjectedTower(SmallCNN(1, (8, 16)), 4)
        >>> emb = tower(torch.rand(3, 1, 8, 8))
        >>> tuple(emb.shape), torch.allclose(emb.norm(dim=1), torch.ones(3))
        ((3, 4), True)
    """

    def __init__(self, encoder: nn.Module, embed_dim: int | None) -> None:
        super().__init__()
        width = int(encoder.dim)  # type: ignore[arg-type]
        self.encoder = encoder
        self.proj = nn.Linear(width, embed_dim) if embed_dim is not None else nn.Identity()
        self.dim = embed_dim or width

    def forward(self, *args, **kwargs) -> Tensor:
        return F.normalize(self.proj(self.encoder(*args, **kwargs)), dim=-1)

"""In-batch contrastive losses for two towers, and distillation between embedding models.

Embeddings are L2-normalised before they arrive here; similarities are dot
products scaled by a learnable logit scale (CLIP, Radford et al. 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.dist import all_gather_with_grad, rank, world_size
from stepkit.step import at_least_float32

__all__ = ["LogitScale", "info_nce", "clip_loss", "similarity_distillation_loss", "embedding_mse"]


class LogitScale(nn.Module):
    """A learnable temperature: ``forward()`` = ``exp(min(log_scale, log(max_scale)))``.

    Starts at ``1 / init_temperature`` (CLIP: 1/0.07) and is clamped at
    ``max_scale`` (CLIP: 100), past which its gradient is zero, so a long run
    cannot sharpen the softmax without bound.

    OpenCLIP instead clamps the parameter itself after each optimizer step
    (``logit_scale.clamp_(0, log(100))``), so its gradient never vanishes and
    the stored value never passes the bound. The forward values agree while
    below the bound; to follow OpenCLIP exactly, pass a ``max_scale`` it never
    reaches (``1e6``) and clamp after ``apply_update``:
    ``with torch.no_grad(): scale.log_scale.clamp_(0, math.log(100))``.

    Args:
        init_temperature: The starting temperature, > 0 (the scale starts at its inverse).
        max_scale: The largest scale ``forward`` returns.

    Examples:
        >>> scale = LogitScale(init_temperature=0.5)
        >>> round(scale().item(), 4)
        2.0
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        _check.in_range("init_temperature", init_temperature, 1e-4, 1e4)
        _check.at_least("max_scale", max_scale, 1.0)
        self.max_log = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()


def info_nce(queries: Tensor, keys: Tensor, logit_scale: Tensor | float, offset: int = 0) -> Tensor:
    """Mean cross-entropy of ``softmax(scale * queries @ keys.T)``, row i's positive at key ``offset + i``.

    ``-1/B sum_i log( exp(s q_i.k_{o+i}) / sum_j exp(s q_i.k_j) )``; ``offset``
    places this rank's rows among keys gathered from all ranks.

    Args:
        queries: ``(B, D)`` rows, normalised by the caller as wanted.
        keys: ``(N, D)``, ``N >= offset + B``.
        logit_scale: The inverse temperature ``s``.
        offset: Index of row 0's positive among ``keys``.

    Returns:
        A 0-d tensor, at least float32.

    Examples:
        >>> q = k = torch.eye(2)
        >>> round(info_nce(q, k, 1.0).item(), 6)  # -1 + log(e + 1)
        0.313262
    """
    logits = logit_scale * at_least_float32(queries) @ at_least_float32(keys).T
    targets = torch.arange(offset, offset + len(queries), device=queries.device)
    return F.cross_entropy(logits, targets)


def clip_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, *, gather: bool = True, local_loss: bool = True
) -> Tensor:
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropies.

    Row i of ``image`` and of ``text`` are a pair; every other row of the
    batch is a negative. Under torch.distributed with ``gather`` the other
    ranks' rows are gathered with their gradient, so every rank's negatives
    count. ``local_loss`` (OpenCLIP's): each rank scores only its own rows
    against all gathered columns (``B x W*B`` logits), which gives the same
    gradient as the full ``W*B x W*B`` matrix on every rank, for ``1/W`` of
    its cost; ``local_loss=False`` computes the full matrix.

    Args:
        image: ``(B, D)`` image embeddings, L2-normalised by the caller.
        text: ``(B, D)`` text embeddings, L2-normalised.
        logit_scale: The inverse temperature (``LogitScale()``).
        gather: Under torch.distributed, use every rank's rows as negatives.
        local_loss: Score this rank's rows only (OpenCLIP's), else the full matrix.

    Returns:
        A 0-d tensor, at least float32.

    Examples:
        >>> e = torch.eye(2)
        >>> round(clip_loss(e, e, 1.0).item(), 6)  # both directions as in info_nce
        0.313262
    """
    if gather and world_size() > 1:
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
        if local_loss:
            offset = rank() * len(image)
            return (info_nce(image, all_text, logit_scale, offset)
                    + info_nce(text, all_image, logit_scale, offset)) / 2
        image, text = all_image, all_text
    return (info_nce(image, text, logit_scale) + info_nce(text, image, logit_scale)) / 2


def similarity_distillation_loss(
    student_queries: Tensor,
    student_keys: Tensor,
    teacher_queries: Tensor,
    teacher_keys: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(teacher || student) between in-batch similarity distributions, times ``temperature**2``.

    Each query's distribution over the batch's keys is ``softmax(q.k / T)``;
    the loss is ``T^2 / B sum_i KL(p_teacher_i || p_student_i)`` (Hinton et
    al. 2015: the ``T^2`` keeps gradients comparable across temperatures).
    Zero when the student's similarities equal the teacher's.

    Args:
        student_queries: ``(B, D)`` student query embeddings.
        student_keys: ``(N, D)`` student key embeddings.
        teacher_queries: ``(B, E)`` teacher query embeddings (no gradient needed).
        teacher_keys: ``(N, E)`` teacher key embeddings.
        temperature: ``T`` > 0.

    Returns:
        A 0-d tensor, at least float32, 0 when the similarities agree.

    Examples:
        >>> x = torch.randn(4, 3)
        >>> similarity_distillation_loss(x, x, x, x).abs().item() < 1e-6
        True
    """
    _check.at_least("temperature", temperature, 1e-6)
    student = (at_least_float32(student_queries) @ at_least_float32(student_keys).T) / temperature
    teacher = (at_least_float32(teacher_queries) @ at_least_float32(teacher_keys).T) / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1),
                  log_target=True, reduction="batchmean")
    return kl * temperature**2


def embedding_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between the student's and the teacher's embeddings (same shape).

    Args:
        student: Embeddings of any shape.
        teacher: The teacher's, the same shape.

    Returns:
        A 0-d tensor, at least float32.

    Examples:
        >>> embedding_mse(torch.zeros(2, 2), torch.ones(2, 2))
        tensor(1.)
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {tuple(student.shape)} and teacher embeddings "
                         f"{tuple(teacher.shape)} must have the same shape")
    return F.mse_loss(at_least_float32(student), at_least_float32(teacher))

"""DINO's self-distillation loss and the pieces around it (centering, temperatures, Sinkhorn, KoLeo, iBOT)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stepkit import check as _check
from stepkit.step import at_least_float32

__all__ = ["DINOLossConfig", "dino_loss", "ibot_patch_loss", "teacher_softmax", "update_center",
           "update_patch_center", "teacher_temp_at", "sinkhorn_knopp", "koleo_loss"]


@dataclass
class DINOLossConfig:
    """Self-distillation's settings (a recipe's ``--loss.*``): the teacher's targets and temperatures,
    the centre's momentum, and the KoLeo weight; checked when made.

    Examples:
        >>> DINOLossConfig().targets, DINOLossConfig(targets="centering", koleo_weight=0.0).koleo_weight
        ('sinkhorn', 0.0)
    """

    targets: Literal["centering", "sinkhorn"] = "sinkhorn"
    """Teacher targets: DINO's centred softmax, or Sinkhorn-Knopp balanced (DINOv2)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.02
    warmup_teacher_temp: float = 0.02
    teacher_temp_warmup_steps: int = 0
    center_momentum: float = 0.9
    koleo_weight: float = 0.3
    """KoLeo spreading term on the student's global-view features (DINOv2; 0: off)."""

    def __post_init__(self) -> None:
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _check.at_least(name, getattr(self, name), 1e-4)
        _check.integer_at_least("teacher_temp_warmup_steps", self.teacher_temp_warmup_steps, 0)
        _check.at_least("koleo_weight", self.koleo_weight, 0.0)
        _check.in_range("center_momentum", self.center_momentum, 0.0, 1.0)


def dino_loss(
    student_out: Tensor,
    teacher_probs: Tensor,
    *,
    student_temp: float = 0.1,
    n_student_views: int,
    n_teacher_views: int = 2,
) -> Tensor:
    """Cross-entropy of every student view against every teacher view but its own.

    ``student_out``: ``(S * B, K)`` logits, view-major; ``teacher_probs``:
    ``(T * B, K)`` target distributions (``teacher_softmax`` or
    ``sinkhorn_knopp``), views ``0..T-1`` being the same global crops as the
    student's first ``T``. With ``p_j = softmax(s_j / student_temp)``::

        loss = mean over pairs (i, j), i != j, of  mean_b  -sum_k q_i[b, k] log p_j[b, k]

    computed as one matrix of all pairs' cross-entropies.

    Args:
        student_out: ``(S * B, K)`` student logits, view-major.
        teacher_probs: ``(T * B, K)`` teacher target distributions.
        student_temp: The student's softmax temperature.
        n_student_views: ``S``.
        n_teacher_views: ``T`` (the global crops).

    Returns:
        A 0-d tensor in the wider of the two inputs' dtypes, at least float32.

    Raises:
        ValueError: when the row counts are not ``S`` and ``T`` views of the same batch, or ``T > S``.

    Examples:
        >>> q = torch.full((4, 2), 0.5)  # 2 teacher views of 2 samples, uniform targets
        >>> round(dino_loss(torch.zeros(4, 2), q, n_student_views=2).item(), 6)  # log 2
        0.693147
    """
    rows_s, rows_t = student_out.shape[0], teacher_probs.shape[0]  # shapes: no host sync, compile-safe
    if (n_teacher_views > n_student_views or rows_s % n_student_views or rows_t % n_teacher_views
            or rows_s // n_student_views != rows_t // n_teacher_views):
        raise ValueError(f"dino_loss: {rows_s} student rows as {n_student_views} views and {rows_t} teacher "
                         f"rows as {n_teacher_views} views are not views of one batch (the teacher's "
                         "views are the student's first ones)")
    dtype = _common_float(student_out, teacher_probs)
    log_p = F.log_softmax(student_out.to(dtype) / student_temp, dim=-1).chunk(n_student_views)
    q = teacher_probs.to(dtype).chunk(n_teacher_views)
    ce = -torch.einsum("ibk,jbk->ij", torch.stack(q), torch.stack(log_p)) / q[0].shape[0]
    pairs = ~torch.eye(n_teacher_views, n_student_views, dtype=torch.bool, device=ce.device)
    return ce[pairs].mean()


def _common_float(*tensors: Tensor) -> torch.dtype:
    """The dtype every input is computed in: the widest of theirs, at least float32 (bf16 / fp16 logits
    beside float32 targets, or float64 logits beside float32 targets, meet in one dtype)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def ibot_patch_loss(
    student_patches: Tensor,
    teacher_probs: Tensor,
    masks: Tensor,
    *,
    student_temp: float = 0.1,
) -> Tensor:
    """iBOT's masked-patch loss: each image's masked patches predict the teacher's view of them.

    The student saw the masked patches as the mask token; the teacher saw the image whole. With
    ``p = softmax(s / student_temp)``, ``q`` the teacher's targets for the same patch and ``M_b`` the
    masked patches of image ``b`` among ``B`` images (DINOv2's ``iBOTPatchLoss.forward_masked``)::

        loss = 1/B sum_b 1/max(|M_b|, 1) sum_{n in M_b} -sum_k q[n, k] log p[n, k]

    An image without masked patches adds 0 and still counts in ``B``. DINOv2 adds this loss with
    weight 1 beside DINO's (its ``ibot_loss_weight``; the sum over the two global crops times 1/2).

    Args:
        student_patches: ``(M, K)`` student logits of the masked patches, in the order of
            ``masks.flatten().nonzero()`` (image by image, patch by patch).
        teacher_probs: ``(M, K)`` teacher targets of the same patches (``teacher_softmax`` with the
            patch center, or ``sinkhorn_knopp``).
        masks: ``(B, N)`` booleans, True where the student's patch was masked; ``M = masks.sum()``.
        student_temp: The student's softmax temperature.

    Returns:
        A 0-d tensor in the wider of the inputs' dtypes, at least float32.

    Raises:
        ValueError: when the rows are not one per masked patch.

    Examples:
        >>> masks = torch.tensor([[True, False], [False, False]])  # one masked patch, in image 0
        >>> q = torch.tensor([[0.5, 0.5]])
        >>> round(ibot_patch_loss(torch.zeros(1, 2), q, masks).item(), 6)  # log 2 / 2 images
        0.346574
    """
    rows = masks.sum(dim=1)
    if student_patches.shape[0] != teacher_probs.shape[0]:
        raise ValueError(f"ibot_patch_loss: {student_patches.shape[0]} student rows and "
                         f"{teacher_probs.shape[0]} teacher rows; expected one per masked patch")
    dtype = _common_float(student_patches, teacher_probs)
    log_p = F.log_softmax(student_patches.to(dtype) / student_temp, dim=-1)
    cross = -(teacher_probs.to(dtype) * log_p).sum(dim=-1)  # (M,)
    weights = (1.0 / rows.clamp(min=1).to(dtype))[:, None].expand_as(masks)[masks]  # 1 / |M_b| per row
    return (cross * weights).sum() / masks.shape[0]


def teacher_softmax(teacher_out: Tensor, center: Tensor, teacher_temp: float | Tensor) -> Tensor:
    """DINO's teacher targets: ``softmax((t - center) / teacher_temp)``, without gradient.

    Args:
        teacher_out: ``(N, K)`` teacher logits.
        center: ``(1, K)`` or ``(K,)``, the running center (``update_center``).
        teacher_temp: The temperature (``teacher_temp_at``).

    Returns:
        ``(N, K)`` rows summing to 1, at least float32.

    Examples:
        >>> teacher_softmax(torch.tensor([[1.0, 1.0]]), torch.zeros(2), 0.04)
        tensor([[0.5000, 0.5000]])
    """
    return F.softmax((at_least_float32(teacher_out.detach()) - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float = 0.9) -> None:
    """``center = m * center + (1 - m) * mean(teacher_out)`` in place; the mean is over all ranks.

    Args:
        center: ``(1, K)`` buffer, updated in place.
        teacher_out: ``(N, K)`` this rank's teacher logits.
        momentum: ``m``.

    Examples:
        >>> center = torch.zeros(1, 2)
        >>> update_center(center, torch.tensor([[2.0, 4.0]]), momentum=0.5)
        >>> center
        tensor([[1., 2.]])
    """
    batch = at_least_float32(teacher_out.detach()).sum(dim=0, keepdim=True)
    count = teacher_out.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch)
        count *= dist.get_world_size()
    center.mul_(momentum).add_(batch / count, alpha=1.0 - momentum)


@torch.no_grad()
def update_patch_center(center: Tensor, teacher_patches: Tensor, momentum: float = 0.9) -> None:
    """iBOT's patch center: ``center = m * center + (1 - m) * mean over ranks of each rank's mean``, in place.

    DINOv2's ``iBOTPatchLoss.update_center``: each rank averages its own masked patches' teacher logits
    and the ranks' averages are averaged, so a rank with fewer masked patches weighs as much as
    another (``update_center``, for the class token, weighs every row alike). A rank without masked
    patches is left out of the average (DINOv2's would divide by zero); with none on any rank the
    center stays as it is.

    Args:
        center: ``(1, K)`` buffer, updated in place.
        teacher_patches: ``(M, K)`` this rank's teacher logits of the masked patches.
        momentum: ``m``.

    Examples:
        >>> center = torch.zeros(1, 2)
        >>> update_patch_center(center, torch.tensor([[2.0, 0.0], [4.0, 2.0]]), momentum=0.5)
        >>> center
        tensor([[1.5000, 0.5000]])
        >>> update_patch_center(center, torch.zeros(0, 2))  # no masked patch: no change, no NaN
        >>> center
        tensor([[1.5000, 0.5000]])
    """
    patches = at_least_float32(teacher_patches.detach())
    mean = patches.sum(dim=0, keepdim=True) / max(len(patches), 1)
    summed = torch.cat([mean, mean.new_full((1, 1), float(len(patches) > 0))], dim=1)  # + ranks with patches
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(summed)
    ranks = summed[:, -1:]
    updated = center * momentum + (1.0 - momentum) * summed[:, :-1] / ranks.clamp(min=1)
    center.copy_(torch.where(ranks > 0, updated, center))


def teacher_temp_at(step: int, *, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """DINO's teacher temperature: ``np.linspace(warmup_temp, temp, warmup_steps)``, then ``temp``.

    The reference builds the schedule per epoch with ``linspace`` (the last
    warm-up entry already equals ``temp``); this is the same array, read at
    ``step``.

    Args:
        step: The update (or epoch) to read the schedule at.
        warmup_temp: The temperature at step 0.
        temp: The temperature after the warm-up.
        warmup_steps: Steps of the linear warm-up.

    Returns:
        The temperature.

    Examples:
        >>> [round(teacher_temp_at(t, warmup_temp=0.04, temp=0.07, warmup_steps=4), 4) for t in range(5)]
        [0.04, 0.05, 0.06, 0.07, 0.07]
    """
    _check.integer_at_least("warmup_steps", warmup_steps, 0)
    if step >= warmup_steps:
        return temp
    if warmup_steps == 1:  # linspace(a, b, 1) == [a]
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * step / (warmup_steps - 1)


@torch.no_grad()
def sinkhorn_knopp(teacher_out: Tensor, teacher_temp: float, iterations: int = 3) -> Tensor:
    """Balanced teacher targets (SwAV, DINOv2): rows sum to 1, every prototype used equally.

    The procedure of SwAV's and DINOv2's ``sinkhorn_knopp``, at every
    iteration count: with ``Q = exp(t / temp)ᵀ`` (``K`` prototypes x ``B``
    samples, ``B`` counted over all ranks)::

        Q /= sum(Q)
        repeat iterations times:
            Q /= Q.sum(over samples) * K        # rows (prototypes): all ranks' samples
            Q /= Q.sum(over prototypes) * B     # columns (samples)
        return (Q * B)ᵀ

    Computed in log space in float64 (``log Q`` normalised with logsumexp,
    all-reduced as a max and a sum of ``exp`` under torch.distributed), so
    it equals the plain procedure to rounding where that is finite, and
    stays finite at sharp temperatures where ``exp(t / temp)`` overflows.
    Returns the dtype of ``teacher_out`` promoted to at least float32.

    Args:
        teacher_out: ``(B, K)`` teacher logits (this rank's rows).
        teacher_temp: The temperature, > 0.
        iterations: Alternating normalisations, at least 1.

    Returns:
        ``(B, K)`` targets, each row summing to 1.

    Raises:
        ValueError: for a temperature <= 0 or fewer than 1 iteration.

    Examples:
        >>> q = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), teacher_temp=1.0)
        >>> q.sum(dim=1).tolist(), [round(v, 3) for v in q.sum(dim=0).tolist()]  # prototypes used equally
        ([1.0, 1.0], [1.0, 1.0])
    """
    _check.integer_at_least("iterations", iterations, 0)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    log_q = (teacher_out.detach().double() / teacher_temp).t()  # (K, B)
    k, b = log_q.shape
    log_q -= _logsumexp(log_q, None, world)
    for _ in range(iterations):
        log_q -= _logsumexp(log_q, 1, world) + math.log(k)
        log_q -= torch.logsumexp(log_q, dim=0, keepdim=True) + math.log(b * world)
    return (log_q + math.log(b * world)).exp().t().to(at_least_float32(teacher_out).dtype)


def _logsumexp(x: Tensor, dim: int | None, world: int) -> Tensor:
    """``log sum exp(x)`` over ``dim`` (None: everything), the sum running over every rank's ``x``."""
    reduce = tuple(range(x.ndim)) if dim is None else (dim,)
    top = x.amax(dim=reduce, keepdim=True)
    if world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # an all -inf row stays -inf
    total = (x - top).exp().sum(dim=reduce, keepdim=True)
    if world > 1:
        dist.all_reduce(total)
    return top + total.log()


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo spreading term (DINOv2): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` on L2-normalised rows.

    The paper's form (Sablayrolles et al. 2019; DINOv2):
    ``-mean_i log(d_i + eps)`` with ``d_i`` the distance to the nearest other
    row, floored at ``eps``. DINOv2's code measures ``||x_i - x_j + eps||``
    (torch's ``PairwiseDistance`` adds eps to the difference), so the two agree
    (2e-8 against lightly's ``KoLeoLoss``) except for exact or near duplicates:
    a duplicated row gets distance ``eps`` here and about ``eps * sqrt(d)``
    there, so stepkit's value is the larger on a batch holding duplicates.

    For unit vectors ``||x_i - x_j|| = sqrt(2 - 2 x_i . x_j)``, so the nearest
    distance comes from each row's largest dot product. Written that way the
    backward pass writes one element per row; gathering the neighbours
    (``x[argmax]``) instead accumulates into shared rows, which made CPU
    training differ from run to run.

    Args:
        x: ``(N, D)`` embeddings (normalised here), ``N >= 2``.
        eps: The floor of the nearest distance.

    Returns:
        A 0-d tensor, at least float32.

    Examples:
        >>> round(koleo_loss(torch.eye(2)).item(), 6)  # -log(sqrt(2))
        -0.346574
    """
    x = F.normalize(at_least_float32(x), dim=-1, eps=eps)
    dots = x @ x.t()
    dots = dots - 4.0 * torch.eye(len(x), device=x.device, dtype=dots.dtype)  # never one's own neighbour
    nearest_sq = (2.0 - 2.0 * dots.max(dim=1).values).clamp_min(eps * eps)  # no infinite slope at 0
    return -torch.log(nearest_sq.sqrt() + eps).mean()

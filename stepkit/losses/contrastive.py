"""In-batch contrastive losses for two towers, and distillation between embedding models.

Embeddings are L2-normalised before they arrive here; similarities are dot
products scaled by a learnable logit scale (CLIP, Radford et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.dist import all_gather_with_grad, pass_to_next_rank, rank, world_size
from stepkit.step import at_least_float32

__all__ = ["LogitScale", "LogitBias", "info_nce", "clip_loss", "siglip_loss", "matryoshka_loss",
           "similarity_distillation_loss", "embedding_mse"]


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
    image: Tensor, text: Tensor, logit_scale: Tensor | float, *, negatives: Tensor | None = None,
    gather: bool = True, local_loss: bool = True,
) -> Tensor:
    """Symmetric InfoNCE (CLIP): the mean of image->text and text->image cross-entropies.

    Row i of ``image`` and of ``text`` are a pair; every other row of the
    batch is a negative. ``negatives`` (hard negatives: texts that must not
    match any image) add columns to image->text only, as
    sentence-transformers' ``MultipleNegativesRankingLoss`` scores them.
    Under torch.distributed with ``gather`` the other ranks' rows (negatives
    too) are gathered with their gradient, so every rank's negatives count;
    the columns are every rank's texts, then every rank's negatives.
    ``local_loss`` (OpenCLIP's): each rank scores only its own rows against
    all gathered columns (``B x W*B`` logits), which gives the same gradient
    as the full ``W*B x W*B`` matrix on every rank, for ``1/W`` of its cost;
    ``local_loss=False`` computes the full matrix.

    Args:
        image: ``(B, D)`` image embeddings, L2-normalised by the caller.
        text: ``(B, D)`` text embeddings, L2-normalised.
        logit_scale: The inverse temperature (``LogitScale()``).
        negatives: ``(M, D)`` hard-negative texts, L2-normalised (None: the batch's own only).
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
        negatives = None if negatives is None else all_gather_with_grad(negatives)
        if local_loss:
            offset = rank() * len(image)
            keys = all_text if negatives is None else torch.cat([all_text, negatives])
            return (info_nce(image, keys, logit_scale, offset)
                    + info_nce(text, all_image, logit_scale, offset)) / 2
        image, text = all_image, all_text
    keys = text if negatives is None else torch.cat([text, negatives])
    return (info_nce(image, keys, logit_scale) + info_nce(text, image, logit_scale)) / 2


class LogitBias(nn.Module):
    """A learnable logit bias ``b`` (SigLIP's; the paper starts it at -10, so that the many negative
    pairs start near their target and the first updates are not spent pushing them down).

    Examples:
        >>> LogitBias()().item()
        -10.0
    """

    def __init__(self, init: float = -10.0) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(init)))

    def forward(self) -> Tensor:
        return self.bias


def _sigmoid_pairs(image: Tensor, keys: Tensor, scale: Tensor | float, bias: Tensor | float,
                   positives: int) -> Tensor:
    """``-sum log sigmoid(z_ij (s x_i.y_j + b))`` over a block, z = +1 on its first ``positives``
    diagonal entries, -1 elsewhere."""
    logits = scale * at_least_float32(image) @ at_least_float32(keys).T + bias
    signs = -torch.ones_like(logits)
    signs.diagonal()[:positives] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *,
    negatives: Tensor | None = None, gather: bool = True,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every image-text pair is its own binary
    decision, so no softmax normalises over the batch.

    ``-1/B sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))`` with ``z_ij = 1``
    for a pair (``i = j``) and ``-1`` otherwise, over this rank's ``B``
    images ``x`` and every text ``y`` (the batch's, ``negatives``' rows, and
    under torch.distributed with ``gather`` every other rank's). The other
    ranks' texts come one rank at a time around a ring (``pass_to_next_rank``,
    with their gradient), as big_vision's chunked form and OpenCLIP's
    ``SigLipLoss`` do: no rank holds more than a ``B x 2B`` block of
    similarities. The mean of the ranks' losses equals the loss of one
    process over the concatenated batch, and DDP's averaged gradient its
    gradient.

    Args:
        image: ``(B, D)`` image embeddings, L2-normalised by the caller.
        text: ``(B, D)`` text embeddings, L2-normalised; row i is image i's pair.
        logit_scale: ``t`` (``LogitScale(init_temperature=0.1)``: the paper's ``log t = log 10``).
        logit_bias: ``b`` (``LogitBias()``: the paper's -10).
        negatives: ``(M, D)`` hard-negative texts, negatives for every image.
        gather: Under torch.distributed, every rank's texts are negatives too.

    Returns:
        A 0-d tensor, at least float32.

    Examples:
        >>> e = torch.eye(2)  # two matching pairs, two non-matching: 2 log(1 + e^-1) + 2 log(1 + e^0)
        >>> round(siglip_loss(e, e, 1.0, 0.0).item(), 6)
        1.006409
    """
    keys = text if negatives is None else torch.cat([text, negatives])
    total = _sigmoid_pairs(image, keys, logit_scale, logit_bias, positives=len(text))
    if gather and world_size() > 1:
        passing = keys
        for _ in range(world_size() - 1):
            passing = pass_to_next_rank(passing)
            total = total + _sigmoid_pairs(image, passing, logit_scale, logit_bias, positives=0)
    return total / len(image)


def matryoshka_loss(
    loss_fn: Callable[..., Tensor], *embeddings: Tensor, dims: Sequence[int],
    weights: Sequence[float] | None = None, **kwargs,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Matryoshka representation learning (Kusupati et al. 2022; sentence-transformers'
    ``MatryoshkaLoss``): the loss of the embeddings' leading ``d`` dimensions, L2-normalised again,
    summed over ``dims`` with ``weights``, so each prefix is an embedding of its own.

    ``sum_d w_d loss_fn(normalize(e_1[:, :d]), normalize(e_2[:, :d]), ..., **kwargs)``; at the full
    width the embeddings go in as given (the caller normalised them), so weights ``(1, 0, ...)`` train
    exactly as ``loss_fn`` alone.

    Args:
        loss_fn: A loss of normalised embeddings, e.g. ``clip_loss`` or ``siglip_loss``.
        *embeddings: Its embedding arguments (images, texts, negatives ...), each ``(N, D)``.
        dims: The prefix widths, each in ``[1, D]``.
        weights: One per width (None: 1 each).
        **kwargs: Passed to ``loss_fn`` as they are (logit scale, bias ...).

    Returns:
        ``(weighted sum, {d: loss at d})``.

    Raises:
        ValueError: for a width outside ``[1, D]``, a repeated width, or weights of another length.

    Examples:
        >>> e = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2**0.5  # orthogonal; their first dimension equal
        >>> total, each = matryoshka_loss(clip_loss, e, e, dims=(2, 1), logit_scale=1.0)
        >>> round(each[2].item(), 4), round(each[1].item(), 4)  # at 1 dimension they cannot be told apart
        (0.3133, 0.6931)
    """
    width = min(e.shape[-1] for e in embeddings)
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} Matryoshka weights for {len(dims)} dims: give one per width")
    if len(set(dims)) != len(dims) or not all(1 <= d <= width for d in dims):
        raise ValueError(f"Matryoshka dims {tuple(dims)} must be distinct widths in [1, {width}]")
    def cut(e: Tensor, d: int) -> Tensor:  # the full width as given: the loss of the embeddings themselves
        return e if d == e.shape[-1] else F.normalize(e[..., :d], dim=-1)

    each = {d: loss_fn(*(cut(e, d) for e in embeddings), **kwargs) for d in dims}
    return sum(w * each[d] for d, w in zip(dims, weights)), each  # type: ignore[return-value]


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

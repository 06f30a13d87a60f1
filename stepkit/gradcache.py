"""Gradient caching: a contrastive batch far larger than activation memory allows (Gao et al. 2021).

An in-batch loss couples every row with every other, so the batch cannot
simply be split into accumulated micro-batches. Gradient caching splits the
*encoder* work instead:

1. encode every chunk without a graph (activations freed at once);
2. compute the loss on the full batch of embeddings and backpropagate it to
   the embeddings only (cheap: the loss has no encoder inside);
3. encode each chunk again, now with a graph, under the RNG state of its
   first pass (so dropout draws the same masks), and backpropagate the
   cached embedding gradients through it.

The parameter gradients equal those of encoding the chunks with a graph and
backpropagating the loss once; peak activation memory is one chunk's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import Tensor

from stepkit import check as _check
from stepkit.state import TrainState, set_torch_rng_state, torch_rng_state
from stepkit.step import amp_dtype, at_least_float32, ddp_of, device_type_of, fsdp_of

__all__ = ["split_batch", "gradcache"]


def split_batch(batch: Any, chunk: int) -> list[Any]:
    """Split a tensor, or a dict / list / tuple of tensors (dim 0 = rows), into chunks of ``chunk`` rows.

    Examples:
        >>> [part["x"].shape[0] for part in split_batch({"x": torch.zeros(5, 2), "y": torch.zeros(5)}, 2)]
        [2, 2, 1]
    """
    if isinstance(batch, Tensor):
        return list(batch.split(chunk))
    if isinstance(batch, dict):
        parts = {k: split_batch(v, chunk) for k, v in batch.items()}
        return [dict(zip(parts, values)) for values in zip(*parts.values())]
    if isinstance(batch, (list, tuple)):
        return [type(batch)(values) for values in zip(*(split_batch(v, chunk) for v in batch))]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}: "
                    "give tensors, dicts, lists or tuples")


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)




def gradcache(
    state: TrainState,
    encode: Callable[[Any], Tensor | tuple[Tensor, ...]],
    batch: Any,
    loss_fn: Callable[..., Tensor | tuple[Tensor, dict[str, Any]]],
    *,
    chunk: int,
    amp: str | None = None,
) -> tuple[Tensor, dict[str, Any], bool]:
    """A micro-step with gradient caching: ``(loss, aux, update_due)``, as ``forward_loss`` + ``accumulate``.

    A contrastive loss over a batch too large for memory: (1) every chunk of
    ``chunk`` rows is encoded without a graph; (2) the loss over the whole
    batch is backpropagated to the embeddings alone; (3) each chunk is encoded
    again with a graph, under its first pass's RNG state, and the cached
    embedding gradients are backpropagated through it. Gradients accumulate
    into the parameters as ``accumulate`` would (divided by ``state.accum``,
    through ``state.scaler``). Under DDP they are all-reduced once, in the
    last chunk's backward of the micro-step that completes an update; under
    FSDP2 the same via ``set_requires_gradient_sync``. Parameters only the loss
    uses (a logit scale) get their gradient in step 2, outside any DDP forward:
    keep them out of the DDP module and average their gradient with
    ``stepkit.dist.all_reduce_mean`` before the update.

    Args:
        state: The loop's state.
        encode: ``chunk_of_batch -> embeddings`` through ``state.model``: a tensor,
            or a tuple such as ``(image_emb, text_emb)``.
        batch: A tensor, or a tuple / dict of tensors, split along dim 0 (``split_batch``).
        loss_fn: ``(*embeddings) -> loss`` or ``-> (loss, aux)`` over the whole batch.
        chunk: Rows per chunk.
        amp: As in ``forward_loss``.

    Returns:
        ``(loss, aux, update_due)``, the loss at least float32.

    Raises:
        ValueError: for a ``chunk`` below 1, or a ``loss_fn`` that returns something else.

    Examples:
        >>> model = torch.nn.Linear(3, 2)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> loss, aux, due = gradcache(state, lambda rows: state.model(rows), torch.randn(8, 3),
        ...                            lambda emb: emb.square().mean(), chunk=4)
        >>> due, [p.grad is not None for p in model.parameters()]
        (True, [True, True])
    """
    _check.integer_at_least("chunk", chunk, 1)
    dtype = amp_dtype(amp)
    if dtype is torch.float16 and state.scaler is None:
        raise ValueError("amp='fp16' needs a GradScaler: TrainState(scaler=torch.amp.GradScaler(device))")
    autocast = (lambda: nullcontext()) if dtype is None else (
        lambda: torch.autocast(device_type_of(state.model), dtype=dtype))
    chunks = split_batch(batch, chunk)
    ddp, fsdp = ddp_of(state.model), fsdp_of(state.model)
    boundary = (state.micro_step + 1) % state.accum == 0

    # 1. every chunk without a graph, remembering the RNG state it started from
    rng, outputs = [], []
    for part in chunks:
        rng.append(torch_rng_state())
        with torch.no_grad(), autocast():
            outputs.append(_as_tuple(encode(part)))
    rng_after = torch_rng_state()

    # 2. the loss over the whole batch, backpropagated to the embeddings (and loss-only parameters)
    embeddings = [torch.cat(column).detach().requires_grad_() for column in zip(*outputs)]
    with autocast():
        out = loss_fn(*embeddings)
    loss, aux = (out, {}) if isinstance(out, Tensor) else out
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError("loss_fn must return a scalar tensor or (scalar tensor, dict)")
    loss = at_least_float32(loss)
    scaled = loss / state.accum
    if state.scaler is not None:
        scaled = state.scaler.scale(scaled)
    scaled.backward()
    # leaves that require grad: backward filled each one's .grad
    cached = [cast(Tensor, e.grad).split(chunk) for e in embeddings]

    # 3. each chunk again with a graph, under its first pass's RNG, backpropagating the cached gradients
    for i, part in enumerate(chunks):
        sync = boundary and i == len(chunks) - 1
        if ddp is not None:
            ddp.require_backward_grad_sync = sync
        if fsdp is not None:
            fsdp.set_requires_gradient_sync(sync)
        set_torch_rng_state(rng[i])
        with autocast():
            again = _as_tuple(encode(part))
        torch.autograd.backward(list(again), [g[i].to(e.dtype) for e, g in zip(again, cached)])
    set_torch_rng_state(rng_after)  # the stream continues as after one pass over the batch

    state.micro_step += 1
    if ddp is not None:
        ddp.require_backward_grad_sync = (state.micro_step + 1) % state.accum == 0
    aux = {k: v.detach() if isinstance(v, Tensor) else v for k, v in aux.items()}
    return loss.detach(), aux, boundary

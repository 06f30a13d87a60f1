"""Exponential moving average of weights: the teacher / target network update."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepkit import _check
from stepkit.state import unwrap

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5, or a build without torch.distributed
    DTensor = None


@torch.no_grad()
def ema_update(
    target: nn.Module | dict[str, Tensor], online: nn.Module, momentum: float | Tensor
) -> None:
    """``target = momentum * target + (1 - momentum) * online``, in place; buffers copied.

    One multi-tensor ``lerp`` per device over all parameters
    (``target += (1 - momentum) * (online - target)``), so it runs near the
    memory-bandwidth limit instead of one kernel launch per tensor.
    ``momentum=1`` keeps the target, ``0`` copies the online weights.

    ``target``: a module with the online module's parameter and buffer
    names, or a dict of tensors keyed like ``online.state_dict()`` (to use
    with ``torch.func.functional_call``). ``online`` may be wrapped in DDP or
    ``torch.compile``; the plain module underneath is read. ``momentum`` may
    be a 0-d tensor (from a tensor-valued schedule, in a compiled step).
    Under FSDP2 each rank updates its own shards, nothing is gathered.
    """
    if not isinstance(momentum, Tensor):
        _check.in_range("momentum", momentum, 0.0, 1.0)
    online = unwrap(online)
    online_params = dict(online.named_parameters())
    online_buffers = dict(online.named_buffers())
    if isinstance(target, nn.Module):
        target = unwrap(target)
        target_params, target_buffers = dict(target.named_parameters()), dict(target.named_buffers())
        _check_same_names("parameters", target_params, online_params)
        _check_same_names("buffers", target_buffers, online_buffers)
    else:
        _check_same_names("parameters and buffers", target, online_params | online_buffers)
        target_params = {k: target[k] for k in online_params}
        target_buffers = {k: target[k] for k in online_buffers}

    pairs: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for name, t in target_params.items():
        t, o = _local(t), _local(online_params[name])
        if t.shape != o.shape:
            raise ValueError(
                f"ema_update: {name!r} has shape {tuple(t.shape)} in target, {tuple(o.shape)} online"
            )
        ts, os_ = pairs.setdefault((t.device, t.dtype), ([], []))
        ts.append(t)
        os_.append(o if o.dtype == t.dtype else o.to(t.dtype))
    for (device, _), (ts, os_) in pairs.items():
        if isinstance(momentum, Tensor):
            weight = (1.0 - momentum).to(device=device, dtype=ts[0].dtype)
            torch._foreach_lerp_(ts, os_, [weight] * len(ts))
        else:
            torch._foreach_lerp_(ts, os_, 1.0 - momentum)
    if target_buffers:
        names = list(target_buffers)
        torch._foreach_copy_(
            [_local(target_buffers[n]) for n in names], [_local(online_buffers[n]) for n in names]
        )


def ema_copy(online: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``online``'s parameters and buffers: a dict ``target`` for ``ema_update``.

    Evaluate it with ``torch.func.functional_call(online, target, inputs)``.
    """
    online = unwrap(online)
    named = list(online.named_parameters()) + list(online.named_buffers())
    return {k: v.detach().clone() for k, v in named}


def _check_same_names(kind: str, target: dict, online: dict) -> None:
    if target.keys() != online.keys():
        missing, unexpected = online.keys() - target.keys(), target.keys() - online.keys()
        raise ValueError(
            f"ema_update: target and online {kind} differ: missing in target {sorted(missing)}, "
            f"not in online {sorted(unexpected)}"
        )


def _local(t: Tensor) -> Tensor:
    # FSDP2 shards are DTensors; the EMA is elementwise, so each rank's shard suffices.
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t

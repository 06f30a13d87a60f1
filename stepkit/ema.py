"""Exponential moving average of weights: the teacher / target network update."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.dist import dtensor_type
from stepkit.state import unwrap

__all__ = ["ema_update", "ema_copy", "target_copy"]


@torch.no_grad()
def ema_update(
    target: nn.Module | dict[str, Tensor], online: nn.Module | dict[str, Tensor], momentum: float | Tensor
) -> None:
    """``target = momentum * target + (1 - momentum) * online``, in place; buffers copied.

    One multi-tensor ``lerp`` per device over all parameters
    (``target += (1 - momentum) * (online - target)``), so it runs near the
    memory-bandwidth limit instead of one kernel launch per tensor. Under
    FSDP2 each rank updates its own shards, nothing is gathered. The name
    matching and checks run once per (target, online) pair and are reused
    while both hold the same tensor and submodule objects (checked by identity
    on every call); a replaced parameter, buffer or submodule is noticed.

    From lightly: ``update_momentum(online, target, m)`` takes the modules in
    the other order and leaves buffers alone; ``ema_update(target, online, m)``
    also copies the online buffers (BatchNorm statistics) into the target.
    The parameters agree to rounding (1.8e-15 over 50 float64 steps).

    Args:
        target: A module with the online module's parameter and buffer names, or
            a dict of tensors keyed like ``online.state_dict()`` (``ema_copy``).
        online: The trained module (DDP and ``torch.compile`` wrappers are looked through), or a dict of
            tensors keyed like ``target`` (weights trained functionally): the target module's parameters
            are averaged and its buffers copied (a dict target: floating-point tensors averaged, the
            others, such as step counters, copied).
        momentum: In [0, 1]; 1 keeps the target, 0 copies the online weights. A
            0-d tensor works too (a tensor-valued schedule in a compiled step).

    Raises:
        ValueError: when the names or shapes of target and online differ (the
            message lists them).

    Examples:
        >>> online, target = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(online.weight), torch.nn.init.zeros_(target.weight)
        >>> ema_update(target, online, momentum=0.75)
        >>> target.weight.item()
        0.25
    """
    if not isinstance(momentum, Tensor):
        _check.in_range("momentum", momentum, 0.0, 1.0)
    if not isinstance(online, nn.Module):  # a dict of tensors: nothing to cache the plan on
        _plan(target, online).run(momentum)
        return
    online = unwrap(online)
    if isinstance(target, nn.Module):
        target = unwrap(target)
    cached = _PLANS.get(online)
    plan = cached if cached is not None and cached.still_valid(target) else None
    if plan is None:
        plan = _plan(target, online)
        if plan.cacheable:
            _PLANS[online] = plan
    try:
        plan.run(momentum)
    except RuntimeError:  # the tensors changed device, dtype or shape in place: check them again
        _PLANS.pop(online, None)
        _plan(target, online).run(momentum)


# online module -> the plan for its latest target; weak, so it never keeps a model alive
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(target: nn.Module | dict[str, Tensor], modules: list[nn.Module]) -> list[int]:
    """The ids of every parameter, buffer and child of ``modules`` (and of a dict target's values):
    unchanged while no tensor or submodule object has been replaced. About 10 us for ViT-B."""
    ids = [id(target)]
    for m in modules:
        ids += map(id, m._parameters.values())
        ids += map(id, m._buffers.values())
        ids += map(id, m._modules.values())
    if not isinstance(target, nn.Module):
        ids += map(id, target.values())
    return ids


class _Plan:
    """The grouped tensor lists one ``ema_update`` works on, and what they were built from."""

    def __init__(self, groups: dict, buffers: tuple[list[Tensor], list[Tensor]], cacheable: bool,
                 target: nn.Module | dict[str, Tensor], online: nn.Module | dict[str, Tensor]) -> None:
        self.groups, self.buffers, self.cacheable = groups, buffers, cacheable
        self.cast = {key: any(o.dtype != t.dtype for t, o in zip(*lists)) for key, lists in groups.items()}
        self.modules = list(online.modules()) if isinstance(online, nn.Module) else []
        if isinstance(target, nn.Module):
            self.modules += list(target.modules())
        self.identity = _identity(target, self.modules)

    def still_valid(self, target: nn.Module | dict[str, Tensor]) -> bool:
        return _identity(target, self.modules) == self.identity

    def run(self, momentum: float | Tensor) -> None:
        for (device, dtype), (ts, os_) in self.groups.items():
            if self.cast[(device, dtype)]:  # e.g. a float32 EMA of a bf16 model
                os_ = [o.to(dtype) for o in os_]
            if isinstance(momentum, Tensor):
                weight = (1.0 - momentum).to(device=device, dtype=ts[0].dtype)
                torch._foreach_lerp_(ts, os_, [weight] * len(ts))
            else:
                torch._foreach_lerp_(ts, os_, 1.0 - momentum)
        if self.buffers[0]:
            torch._foreach_copy_(*self.buffers)


def _plan(target: nn.Module | dict[str, Tensor], online: nn.Module | dict[str, Tensor]) -> _Plan:
    if isinstance(online, nn.Module):
        online_params: dict[str, Tensor] = dict(online.named_parameters())
        online_buffers = dict(online.named_buffers())
    else:  # a dict: split as the target module is, or else average what can be (integer counters copied)
        averaged = (dict(target.named_parameters()).keys() if isinstance(target, nn.Module)
                    else {k for k, v in online.items() if v.is_floating_point()})
        online_params = {k: v for k, v in online.items() if k in averaged}
        online_buffers = {k: v for k, v in online.items() if k not in averaged}
    if isinstance(target, nn.Module):
        target_params: dict[str, Tensor] = dict(target.named_parameters())
        target_buffers = dict(target.named_buffers())
        _check_same_names("parameters", target_params, online_params)
        _check_same_names("buffers", target_buffers, online_buffers)
    else:
        _check_same_names("parameters and buffers", target, online_params | online_buffers)
        target_params = {k: target[k] for k in online_params}
        target_buffers = {k: target[k] for k in online_buffers}
    dtensor = dtensor_type()
    sharded = dtensor is not None and any(isinstance(t, dtensor) for t in [*online_params.values(),
                                                                           *target_params.values()])
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for name, t in target_params.items():
        t, o = _local(t), _local(online_params[name])
        if t.shape != o.shape:
            raise ValueError(
                f"ema_update: {name!r} has shape {tuple(t.shape)} in target, {tuple(o.shape)} online"
            )
        ts, os_ = groups.setdefault((t.device, t.dtype), ([], []))
        ts.append(t)
        os_.append(o)
    names = list(target_buffers)
    buffers = ([_local(target_buffers[n]) for n in names], [_local(online_buffers[n]) for n in names])
    # FSDP2's local shards are views it may swap: look them up on every call.
    return _Plan(groups, buffers, cacheable=not sharded, target=target, online=online)


def ema_copy(online: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``online``'s parameters and buffers: a dict ``target`` for ``ema_update``.

    Args:
        online: The module to copy (DDP / ``torch.compile`` wrappers are looked through).

    Returns:
        ``{name: tensor}`` keyed like ``online.state_dict()``; evaluate it with
        ``torch.func.functional_call(online, target, inputs)``.

    Examples:
        >>> target = ema_copy(torch.nn.Linear(2, 1))
        >>> sorted(target), target["weight"].requires_grad
        (['bias', 'weight'], False)
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
    dtensor = dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t  # type: ignore[attr-defined]


def target_copy(online: nn.Module) -> nn.Module:
    """The EMA target of ``online`` as a module: a deep copy that needs no gradient and is deterministic
    in training mode (stochastic depth and dropout off), as DINO's teacher and I-JEPA's target encoder are.

    Training mode still matters (a BatchNorm in it normalises with the batch's statistics, as the
    online network does); only the random parts go.

    Args:
        online: The module to copy (DDP / ``torch.compile`` wrappers are looked through).

    Returns:
        The copy, in the mode ``online`` is in, with every ``DropPath`` and ``nn.Dropout`` at p = 0.

    Examples:
        >>> from stepkit.models import VisionTransformer
        >>> student = VisionTransformer.preset("toy", img_size=16, drop_path=0.5).train()
        >>> teacher = target_copy(student)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> torch.equal(teacher(x), teacher(x)), teacher.training  # in training mode, and deterministic
        (True, True)
        >>> torch.equal(student(x), student(x))  # the student drops residual branches at random
        False
    """
    import copy

    from stepkit.models.vit import DropPath

    target = copy.deepcopy(unwrap(online)).requires_grad_(False)
    for module in target.modules():
        if isinstance(module, (DropPath, nn.Dropout)):
            module.p = 0.0
    return target

"""The pieces of one training step: forward, backward with accumulation, clip, update.

Each function reads what it needs from the ``TrainState`` it is given and
changes only that state (gradients, parameters, counters), in place. None of
them reads a tensor's value on the host, so a step composed of them does not
wait for the device (two documented exceptions: PyTorch's own GradScaler
reads its inf check for non-fused optimizers, and ``apply_update``'s
non-finite skip for non-fused optimizers without a scaler).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.state import TrainState, unwrap_compiled

__all__ = ["AMP_MODES", "LossFn", "amp_dtype", "forward_loss", "at_least_float32", "accumulate", "clip",
           "apply_update", "adamw", "grad_norm", "device_type_of", "ddp_of", "fsdp_of"]

AMP_MODES: tuple[str | None, ...] = (None, "none", "bf16", "fp16")
_AMP_DTYPES = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

LossFn = Callable[[TrainState, Any], "Tensor | tuple[Tensor, dict[str, Any]]"]


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` mode (``None``/``"none"`` -> no autocast).

    Examples:
        >>> amp_dtype("bf16"), amp_dtype(None)
        (torch.bfloat16, None)
    """
    _check.one_of("amp", amp, AMP_MODES)
    return _AMP_DTYPES[amp]


def forward_loss(
    loss_fn: LossFn, state: TrainState, batch: Any, *, amp: str | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Run ``loss_fn(state, batch)`` under autocast; return ``(loss, aux)``.

    The loss comes back as at least float32 (a bf16/fp16 loss is upcast, a
    float64 one kept), the aux tensors detached; nothing is read on the host.
    Under DDP this also decides, before the forward pass as DDP requires,
    whether the coming backward all-reduces: only on the micro-step that
    completes an update (``state.accum``).

    Args:
        loss_fn: ``(state, batch) -> loss`` or ``-> (loss, aux)``, ``aux`` a dict of metrics.
        state: The loop's state (its ``model`` is what ``loss_fn`` should call).
        batch: Whatever ``loss_fn`` takes.
        amp: ``None``/``"none"``, ``"bf16"`` or ``"fp16"`` (fp16 needs ``state.scaler``).

    Returns:
        ``(loss, aux)``: a 0-d tensor and a dict (empty when ``loss_fn`` returned a loss alone).

    Raises:
        ValueError: for an unknown ``amp``, fp16 without a scaler, or a ``loss_fn``
            that returns something else (the message says what it got).

    Examples:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> def loss_fn(state, batch):
        ...     out = state.model(batch)
        ...     return out.square().mean(), {"mean_out": out.mean()}
        >>> loss, aux = forward_loss(loss_fn, state, torch.ones(4, 2))
        >>> loss.item(), aux["mean_out"].item()
        (4.0, 2.0)
    """
    dtype = amp_dtype(amp)
    if dtype is torch.float16 and state.scaler is None:
        raise ValueError(
            "amp='fp16' needs a GradScaler: TrainState(scaler=torch.amp.GradScaler(device)); "
            "or use amp='bf16', which needs none"
        )
    ddp = ddp_of(state.model)
    if ddp is not None:
        ddp.require_backward_grad_sync = (state.micro_step + 1) % state.accum == 0
    context = (
        nullcontext() if dtype is None else torch.autocast(device_type_of(state.model), dtype=dtype)
    )
    with context:
        out = loss_fn(state, batch)
    if isinstance(out, Tensor):
        loss, aux = out, dict[str, Any]()
    elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Mapping):
        loss, aux = out
    else:
        raise ValueError(
            "loss_fn must return a scalar loss tensor or a pair (loss, aux dict of metrics); got "
            + _describe_output(out)
            + (": return (out['loss'], out) instead" if isinstance(out, Mapping) and "loss" in out else "")
        )
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""
        raise ValueError(
            "loss_fn must return a scalar tensor or (scalar tensor, dict); "
            f"got {type(loss).__name__}{shape}"
        )
    aux = {k: v.detach() if isinstance(v, Tensor) else v for k, v in aux.items()}
    return at_least_float32(loss), aux


def _describe_output(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"a dict with keys {sorted(map(str, out))}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: ({', '.join(type(o).__name__ for o in out)})"
    return f"a {type(out).__name__}"


def at_least_float32(loss: Tensor) -> Tensor:
    """``loss`` upcast to float32 if it is bf16/fp16; float32 and float64 losses are kept as they are.

    Examples:
        >>> half = torch.ones(1, dtype=torch.bfloat16)
        >>> at_least_float32(half).dtype, at_least_float32(torch.ones(1).double()).dtype
        (torch.float32, torch.float64)
    """
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def accumulate(state: TrainState, loss: Tensor, *, every: int | None = None) -> bool:
    """Backpropagate ``loss / every``; True when this micro-step completes an update.

    ``every`` micro-steps of equal-sized batches give the same gradient as one
    batch of their union. The loss goes through ``state.scaler`` when there is
    one. Gradients are synchronised across ranks only at the boundary: FSDP2
    via ``set_requires_gradient_sync``, DDP via ``require_backward_grad_sync``
    (what ``no_sync`` sets), which DDP reads in the forward pass, so this sets
    it for the next micro-step and ``forward_loss`` for the current one.

    Args:
        state: The loop's state; ``micro_step`` is advanced.
        loss: The micro-batch's scalar loss (from ``forward_loss``).
        every: Micro-steps per update (default ``state.accum``; giving it sets ``state.accum``).

    Returns:
        True when ``apply_update`` is due.

    Raises:
        ValueError: for ``every`` below 1.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> [accumulate(state, model(torch.ones(1, 2)).sum(), every=2) for _ in range(4)]
        [False, True, False, True]
    """
    if every is not None:
        _check.integer_at_least("every", every, 1)
        state.accum = every
    state.micro_step += 1
    boundary = state.micro_step % state.accum == 0
    fsdp = fsdp_of(state.model)
    if fsdp is not None:
        fsdp.set_requires_gradient_sync(boundary)
    scaled = loss / state.accum
    if state.scaler is not None:
        scaled = state.scaler.scale(scaled)
    scaled.backward()
    ddp = ddp_of(state.model)
    if ddp is not None:
        ddp.require_backward_grad_sync = (state.micro_step + 1) % state.accum == 0
    return boundary


def clip(
    state: TrainState, *, max_norm: float | None = None, max_value: float | None = None,
    max_norm_per_param: float | None = None,
) -> Tensor:
    """Clip gradients in place; return their global L2 norm before clipping (a 0-d tensor).

    Unscales through ``state.scaler`` first, so the norm is the true one.
    ``max_norm_per_param`` scales each parameter's gradient ``g`` by
    ``min(1, max_norm_per_param / (||g|| + 1e-6))`` on its own (DINO's
    ``utils.clip_gradients``; under FSDP2 ``||g||`` is the whole parameter's);
    ``max_norm`` then scales all gradients by ``min(1, max_norm / (norm + 1e-6))``
    (torch's ``clip_grad_norm_``); ``max_value`` then clamps each element to
    ``[-max_value, max_value]``. With all None this only measures.
    Multi-tensor (foreach) kernels, no host sync. The norm is kept in
    ``state.grad_norm`` so ``apply_update`` need not measure again.

    Args:
        state: The loop's state; its optimizer's gradients are clipped.
        max_norm: The global norm to clip to, or None.
        max_value: The largest absolute gradient element, or None.
        max_norm_per_param: The norm each parameter's gradient is clipped to on its own, or None.

    Returns:
        The global gradient norm before clipping.

    Raises:
        ValueError: for a ``max_norm`` or ``max_value`` that is not positive.

    Examples:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> model.weight.grad = torch.tensor([[3.0, 4.0]])
        >>> clip(state, max_norm=1.0).item(), [round(g, 4) for g in model.weight.grad[0].tolist()]
        (5.0, [0.6, 0.8])
        >>> model = torch.nn.Linear(2, 1)  # per parameter: the weight's norm 5 -> 1, the bias's 0.5 kept
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> model.weight.grad, model.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([0.5])
        >>> _ = clip(state, max_norm_per_param=1.0)
        >>> [round(g, 4) for g in model.weight.grad[0].tolist()], model.bias.grad.tolist()
        ([0.6, 0.8], [0.5])
    """
    if max_norm_per_param is not None:
        _check.at_least("max_norm_per_param", max_norm_per_param, 0.0)
    if max_norm is not None:
        _check.at_least("max_norm", max_norm, 0.0)
    if max_value is not None:
        _check.at_least("max_value", max_value, 0.0)
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    grads = _grads(state.optimizer)
    norm = grad_norm(grads)
    if max_norm_per_param is not None:
        _clip_each(grads, max_norm_per_param)
    by_device = _by_device(grads)
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for device, tensors in by_device.items():
            torch._foreach_mul_(tensors, coef.to(device))
    if max_value is not None:
        for tensors in by_device.values():
            torch._foreach_clamp_min_(tensors, -max_value)
            torch._foreach_clamp_max_(tensors, max_value)
    state.grad_norm = norm
    return norm


FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")  # where torch's AdamW has a fused kernel


def adamw(params: Any, *, device: torch.device | str, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW on the fused kernel where the device has one: ``apply_update`` then reads nothing on the host.

    A fused optimizer takes ``apply_update``'s non-finite check as a device flag (``found_inf``); a
    foreach one needs the gradient norm on the host every update, which stalls a GPU's queue.
    The arithmetic is AdamW's either way (the kernels round differently in the last bits).

    Args:
        params: Parameters or parameter groups (``param_groups``).
        device: Where the parameters live.
        **kwargs: AdamW's own arguments (``betas``, ``eps`` ...).

    Returns:
        ``torch.optim.AdamW(params, fused=True, ...)`` where fused kernels exist, else the foreach one.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> adamw(model.parameters(), device="cpu").defaults["fused"]
        True
    """
    fused = torch.device(device).type in FUSED_DEVICES
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def apply_update(
    state: TrainState,
    *,
    lr: float | Tensor,
    wd: float | Tensor | None = None,
    group_scales: Sequence[float] | None = None,
    skip_nonfinite: bool = True,
) -> None:
    """Set each group's lr and weight decay, step the optimizer, zero the grads, count the step.

    Group ``i`` gets ``lr * group["lr_scale"] * group_scales[i]`` and
    ``wd * group["wd_scale"]`` (scales default to 1; see ``param_groups``;
    ``wd=None`` leaves weight decay alone). A group whose lr is a tensor (for
    compiled steps) is filled in place. With ``state.scaler`` the step goes
    through it, which skips non-finite steps. Without one, ``skip_nonfinite``
    skips a step whose gradient norm is not finite: sync-free for fused
    optimizers (the kernel reads a ``found_inf`` flag), one host read
    otherwise. Skipped steps are counted in ``state.skipped_steps`` and still
    advance ``state.step``, so the schedules move on as in the reference loops.

    Args:
        state: The loop's state; ``step`` is advanced.
        lr: The learning rate (``lr_at``).
        wd: The weight decay (``wd_at``), or None.
        group_scales: An extra lr factor per parameter group (H-JEPA's head schedules).
        skip_nonfinite: Skip updates whose gradient norm is inf or NaN.

    Raises:
        ValueError: when ``group_scales`` does not have one scale per group.

    Examples:
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.0))
        >>> model.weight.grad = torch.tensor([[2.0]])
        >>> apply_update(state, lr=0.25)
        >>> model.weight.item(), model.weight.grad, state.step
        (0.5, None, 1)
    """
    optimizer = state.optimizer
    groups = optimizer.param_groups
    if group_scales is not None and len(group_scales) != len(groups):
        _check.fail("group_scales", list(group_scales), f"one scale per param group ({len(groups)})")
    for i, group in enumerate(groups):
        scale = group.get("lr_scale", 1.0) * (1.0 if group_scales is None else group_scales[i])
        _assign(group, "lr", lr * scale)
        if wd is not None:
            _assign(group, "weight_decay", wd * group.get("wd_scale", 1.0))
    if state.scaler is not None:
        state.scaler.step(optimizer)
        found_inf = _scaler_found_inf(state.scaler, optimizer, state.skipped_steps.device)
        state.scaler.update()
    elif skip_nonfinite:
        norm = state.grad_norm if state.grad_norm is not None else grad_norm(_grads(optimizer))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused kernels skip the whole update when this flag is 1. No
            # try/finally: dynamo cannot resume after the optimizer's own
            # graph break inside one.
            found_inf = (~torch.isfinite(norm)).float()
            optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            optimizer.step()
            optimizer.found_inf = None  # type: ignore[attr-defined]
        elif bool(torch.isfinite(norm)):  # the one host read; nothing to count on the device
            found_inf = None
            optimizer.step()
        else:
            found_inf = torch.ones((), device=state.skipped_steps.device)
    else:
        found_inf = None
        optimizer.step()
    if found_inf is not None:
        state.skipped_steps += found_inf.to(state.skipped_steps)
    # What zero_grad(set_to_none=True) does, without its @_disable_dynamo break.
    for group in groups:
        for param in group["params"]:
            param.grad = None
    state.grad_norm = None
    state.step += 1


# --- helpers -------------------------------------------------------------------


def grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """Global L2 norm of ``grads``, ``sqrt(sum_i ||g_i||^2)``, as a 0-d tensor of at least float32.

    Multi-tensor kernels. Under FSDP2 the gradients are sharded DTensors; the
    norm is reduced across ranks (a collective, not a host read).

    Args:
        grads: Gradient tensors (e.g. ``[p.grad for p in params if p.grad is not None]``).

    Returns:
        The norm (0 for no tensors).

    Examples:
        >>> grad_norm([torch.tensor([3.0]), torch.tensor([[4.0]])])
        tensor(5.)
    """
    if not grads:
        return torch.zeros(())
    dtype = torch.float32
    for t in grads:
        dtype = torch.promote_types(dtype, t.dtype)
    device = grads[0].device
    norms = [
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2.0)).to(dtype)).to(device)
        for tensors in _by_device_dtype(grads).values()
    ]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def _clip_each(grads: Sequence[Tensor], max_norm: float) -> None:
    """Scale each gradient ``g`` in place by ``min(1, max_norm / (||g|| + 1e-6))`` (DINO's per-parameter
    clipping), with multi-tensor kernels and no host read; a sharded DTensor's norm is its whole
    parameter's.

    Examples:
        >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]
        >>> _clip_each(grads, 1.0)
        >>> [[round(x, 4) for x in g.tolist()] for g in grads]
        [[0.6, 0.8], [0.3, 0.4]]
    """
    for tensors in _by_device_dtype(grads).values():
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n
                 for n in torch._foreach_norm(tensors, 2.0)]
        coefs = torch._foreach_add(norms, 1e-6)
        torch._foreach_reciprocal_(coefs)
        torch._foreach_mul_(coefs, max_norm)
        torch._foreach_clamp_max_(coefs, 1.0)
        if hasattr(tensors[0], "device_mesh"):  # FSDP2 shards: each scaled by its parameter's factor
            for g, c in zip(tensors, coefs):
                g.mul_(_like(g, c))
        else:
            torch._foreach_mul_(tensors, [c.to(t.dtype) for t, c in zip(tensors, coefs)])


def _like(grad: Tensor, coef: Tensor) -> Tensor:
    """``coef`` as ``grad``'s kind: a replicated DTensor beside a sharded one, else ``coef`` itself."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = grad.device_mesh  # type: ignore[attr-defined]  # a DTensor's
    return DTensor.from_local(coef.to(grad.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)


def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


def _by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple, list[Tensor]]:
    out: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


def _assign(group: dict, key: str, value: float | Tensor) -> None:
    current = group.get(key)
    if not isinstance(current, Tensor):
        group[key] = value
    elif current.ndim == 0 and current.dtype == torch.float64 and current.device.type == "cpu":
        _fill_outside_graph(current, value)
    else:
        current.fill_(value)


def _fill_outside_graph(tensor: Tensor, value: float | Tensor) -> None:
    # Dynamo turns 0-d float64 CPU inputs into Python scalars and drops
    # in-place writes to them (torch 2.13), so the lr would silently freeze.
    # Filling eagerly costs one graph break; a float32 lr tensor avoids it.
    # (Disabled only while compiling: torch.compiler.disable at import time
    # would import torch._dynamo, half a second `import stepkit` need not pay.)
    if torch.compiler.is_compiling():
        torch.compiler.disable(_fill)(tensor, value)
    else:
        _fill(tensor, value)


def _fill(tensor: Tensor, value: float | Tensor) -> None:
    tensor.fill_(value)


def _scaler_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device
) -> Tensor:
    # GradScaler keeps its per-device inf flags until update(); summing them
    # counts a skipped step without reading the value on the host.
    per_device = scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device", {})
    found = torch.zeros((), device=device)
    for flag in per_device.values():
        found = found + flag.to(device)
    return found.clamp(max=1.0)


def device_type_of(model: nn.Module) -> str:
    """The device type of a model's first parameter (``"cpu"`` for one without parameters), for autocast.

    Examples:
        >>> device_type_of(torch.nn.Linear(2, 1))
        'cpu'
    """
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper under any ``torch.compile`` wrapper of ``model``, or None: what gradient sync sets.

    Examples:
        >>> ddp_of(torch.nn.Linear(2, 1)) is None
        True
    """
    model = unwrap_compiled(model)
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def fsdp_of(model: nn.Module) -> Any:
    """The FSDP2 root under any ``torch.compile`` wrapper of ``model``, or None.

    Examples:
        >>> fsdp_of(torch.nn.Linear(2, 1)) is None
        True
    """
    model = unwrap_compiled(model)
    return model if hasattr(model, "set_requires_gradient_sync") else None

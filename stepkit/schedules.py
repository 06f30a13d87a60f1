"""Schedules: pure functions of the step.

Every schedule here is one shape, ``warmup_decay``: a linear warm-up from
``start`` to ``peak`` over ``warmup_steps``, then a decay from ``peak`` to
``final`` that ends at ``total_steps``. With ``W = warmup_steps``,
``T = total_steps - W`` and ``u = clamp((t - W) / T, 0, 1)``::

    t <  W      start + (peak - start) * t / W
    t >= W      cosine    final + (peak - final) * (1 + cos(pi * u)) / 2
                linear    peak + (final - peak) * u
                step      max(final, peak * gamma ** floor((t - W) / every))
                constant  peak

The warm-up reaches ``peak`` exactly at ``t = W``, where the decay starts, so
the schedule is continuous there (optax's convention, and timm's with
``warmup_prefix=True``).

Switching from a peer, the bridges (each measured equal):

- timm: ``lr_at(t, LRSchedule(lr=P, min_lr=F, warmup_steps=W,
  warmup_start_lr=S), N)`` equals ``CosineLRScheduler(opt, t_initial=N - W,
  lr_min=F, warmup_t=W, warmup_lr_init=S, warmup_prefix=True)`` stepped per
  update. timm's *default* ``warmup_prefix=False`` runs the cosine on the
  absolute step (it starts decaying during the warm-up, so the peak is never
  reached); there is no stepkit equivalent of that.
- lightly: ``cosine_schedule(step, max_steps, start, end)`` divides by
  ``max_steps - 1``; ``momentum_at`` (like DINO's code) divides by the run
  length ``N``, so ``momentum_at(t, MomentumSchedule(m0, m1), N)`` equals
  lightly's ``cosine_schedule(t, N + 1, m0, m1)``. Past
``total_steps`` the value stays at ``final``; a warm-up as long as the run
has no decay phase and ends at ``peak``. DINO's teacher momentum (cosine
from ``base`` to 1 over the run, no warm-up) is the cosine case with
``start = peak = base`` and ``final = 1``: ``1 - (1 - base) * (1 + cos(pi t/T)) / 2``.

Pass a Python ``int`` step and get a ``float``; pass a 0-d tensor step (for a
compiled step, where a changing Python float would recompile) and get a
float64 tensor on the step's device, computed with the same formula.

The dataclasses (``LRSchedule``, ``WDSchedule``, ``MomentumSchedule``) are what
a recipe's tyro CLI exposes (``--optim.lr``, ``--optim.warmup-steps``); they
validate at construction. The run's length comes from the caller
(``--train.steps``), so there is one source of truth for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from stepkit import check as _check

__all__ = ["Decay", "DECAYS", "Step", "warmup_decay", "LRSchedule", "WDSchedule", "MomentumSchedule",
           "warmup_steps_of", "lr_at", "wd_at", "momentum_at", "layer_decay_scales", "vit_layer_id",
           "no_decay_by_default", "no_decay_dinov2",
           "param_groups", "scaled_lr"]

Decay = Literal["cosine", "linear", "step", "constant"]
DECAYS: tuple[str, ...] = get_args(Decay)

Step = TypeVar("Step", int, Tensor)


def warmup_decay(
    step: int | Tensor,
    *,
    peak: float,
    total_steps: int,
    final: float = 0.0,
    warmup_steps: int = 0,
    start: float = 0.0,
    decay: Decay = "cosine",
    step_every: int = 1,
    step_gamma: float = 0.1,
) -> float | Tensor:
    """The value at ``step`` of a linear warm-up then a decay (the formula is in the module doc).

    With ``W = warmup_steps``: ``start + (peak - start) * t / W`` for ``t < W``,
    then from ``peak`` to ``final`` at ``total_steps`` by ``decay``; past
    ``total_steps`` the value stays at ``final``.

    Args:
        step: Optimizer updates done; an int, or a 0-d tensor (for compiled steps).
        peak: The value at the end of the warm-up.
        total_steps: The run's length in updates (at least 1).
        final: The value at ``total_steps``.
        warmup_steps: Updates of linear warm-up (0 to ``total_steps``).
        start: The value at step 0 when there is a warm-up.
        decay: ``"cosine"``, ``"linear"``, ``"step"`` or ``"constant"``.
        step_every: For ``"step"``: updates between drops.
        step_gamma: For ``"step"``: the factor of each drop, in (0, 1].

    Returns:
        A float for an int step; a float64 tensor on the step's device for a tensor step.

    Raises:
        ValueError: naming the argument, for a length below 1, a warm-up longer
            than the run, an unknown ``decay`` or a ``"step"`` decay that rises.

    Examples:
        >>> warmup_decay(1, peak=1.0, total_steps=10, warmup_steps=2)
        0.5
        >>> warmup_decay(6, peak=1.0, total_steps=10, warmup_steps=2)  # halfway through the cosine
        0.5
        >>> warmup_decay(10, peak=1.0, total_steps=10, warmup_steps=2, final=0.1)
        0.1
    """
    _check.integer_at_least("total_steps", total_steps, 1)
    _check.integer_at_least("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        _check.fail("warmup_steps", warmup_steps, f"at most the run's length, total_steps={total_steps}")
    _check.one_of("decay", decay, DECAYS)
    if decay == "step":
        _check.integer_at_least("step_every", step_every, 1)
        if not 0.0 < step_gamma <= 1.0:
            _check.fail("step_gamma", step_gamma, "a number in (0, 1]")
        if final > peak:
            _check.fail("final", final, f"at most peak={peak}: decay='step' only decreases")
    if isinstance(step, Tensor):
        return _warmup_decay_tensor(
            step, peak, total_steps, final, warmup_steps, start, decay, step_every, step_gamma
        )
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    u = 0.0 if decay_steps == 0 else min(step - warmup_steps, decay_steps) / decay_steps
    if decay == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * u))
    if decay == "linear":
        return peak + (final - peak) * u
    if decay == "step":
        value = peak * step_gamma ** ((min(step, total_steps) - warmup_steps) // step_every)
        return max(final, value)
    return peak


def _warmup_decay_tensor(
    step: Tensor,
    peak: float,
    total_steps: int,
    final: float,
    warmup_steps: int,
    start: float,
    decay: str,
    step_every: int,
    step_gamma: float,
) -> Tensor:
    t = step.to(torch.float64)
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        u = torch.zeros_like(t)
    else:
        u = ((t - warmup_steps) / decay_steps).clamp(0.0, 1.0)
    if decay == "cosine":
        decayed = final + (peak - final) * 0.5 * (1.0 + torch.cos(math.pi * u))
    elif decay == "linear":
        decayed = peak + (final - peak) * u
    elif decay == "step":
        k = torch.floor((t.clamp(max=total_steps) - warmup_steps) / step_every).clamp(min=0)
        decayed = peak * torch.pow(torch.full_like(t, step_gamma), k)
        decayed = decayed.clamp(min=final)
    else:
        decayed = torch.full_like(t, peak)
    if warmup_steps == 0:
        return decayed
    warm = start + (peak - start) * t / warmup_steps
    return torch.where(t < warmup_steps, warm, decayed)


def _post_init_next(obj: object, cls: type) -> None:
    # Lets a recipe mix several schedule dataclasses into one config class
    # (``class Optim(LRSchedule, WDSchedule)``): each validates, then the next.
    after = getattr(super(cls, obj), "__post_init__", None)
    if after is not None:
        after()


LR_RULES = ("linear", "sqrt")
"""How the lr grows with the batch: ``linear`` (Goyal et al. 2017; DINO's ``lr * batch / 256``) or
``sqrt`` (DINOv2's ``sqrt_wrt_1024``: ``lr * sqrt(batch / 1024)``)."""


def scaled_lr(lr: float, global_batch: int, per_batch: int, rule: str = "linear") -> float:
    """``lr`` given for ``per_batch`` images per update, scaled to the run's ``global_batch`` (per-rank
    batch x ranks x accumulation) by ``rule``, one of ``LR_RULES``.

    ``linear``: ``lr * global_batch / per_batch``; ``sqrt``: ``lr * sqrt(global_batch / per_batch)``.

    Examples:
        >>> [scaled_lr(5e-4, 64 * ranks, 256) for ranks in (1, 2, 4, 8)]
        [0.000125, 0.00025, 0.0005, 0.001]
        >>> scaled_lr(4e-3, 2048, 1024, rule="sqrt")  # DINOv2's default on 32 GPUs x 64 images
        0.005656854249492381
    """
    _check.integer_at_least("global_batch", global_batch, 1)
    _check.integer_at_least("per_batch", per_batch, 1)
    _check.one_of("rule", rule, LR_RULES)
    return lr * global_batch / per_batch if rule == "linear" else lr * math.sqrt(global_batch / per_batch)


@dataclass
class LRSchedule:
    """Learning rate: a linear warm-up from ``warmup_start_lr`` to ``lr``, then ``decay`` to ``min_lr``.

    The fields are a recipe's ``--optim.*`` flags; each is checked when made.
    ``warmup_steps=None`` means the recipe's default (``warmup_steps_of``).

    Raises:
        ValueError: naming the field, for a negative rate, ``min_lr > lr`` or an unknown ``decay``.

    Examples:
        >>> schedule = LRSchedule(lr=1e-3, warmup_steps=10, decay="linear")
        >>> lr_at(10, schedule, 110), lr_at(60, schedule, 110)
        (0.001, 0.0005)
    """

    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 0.0
    """Learning rate at the end of the run (ignored by ``decay='constant'``)."""
    warmup_steps: int | None = 0
    """Optimizer updates of linear warm-up; None: ``default_warmup``, or a tenth of the run when that is
    shorter (so a short smoke run needs no second flag)."""
    warmup_start_lr: float = 0.0
    """Learning rate at step 0."""
    default_warmup: ClassVar[int] = 0  # the warm-up of warmup_steps=None (capped at a tenth of the run)
    decay: Decay = "cosine"
    """Shape after the warm-up."""
    step_every: int = 1000
    """For ``decay='step'``: updates between two multiplications by ``step_gamma``."""
    step_gamma: float = 0.1
    """For ``decay='step'``: the factor applied every ``step_every`` updates."""

    def __post_init__(self) -> None:
        _check.at_least("lr", self.lr, 0.0)
        _check.in_range("min_lr", self.min_lr, 0.0, self.lr)
        if self.warmup_steps is not None:
            _check.integer_at_least("warmup_steps", self.warmup_steps, 0)
        _check.at_least("warmup_start_lr", self.warmup_start_lr, 0.0)
        _check.one_of("decay", self.decay, DECAYS)
        _check.integer_at_least("step_every", self.step_every, 1)
        _check.finite("step_gamma", self.step_gamma)
        if not 0.0 < self.step_gamma <= 1.0:
            _check.fail("step_gamma", self.step_gamma, "a number in (0, 1]")
        _post_init_next(self, LRSchedule)


@dataclass
class WDSchedule:
    """Weight decay: ``wd_decay`` from ``wd`` to ``wd_final`` over the run (DINO: 0.04 -> 0.4).

    Raises:
        ValueError: naming the field, for a negative value or an unknown ``wd_decay``.

    Examples:
        >>> wd_at(100, WDSchedule(wd=0.05), 100)  # wd_final=None keeps wd
        0.05
    """

    wd: float = 0.05
    """Weight decay at step 0."""
    wd_final: float | None = None
    """Weight decay at the end of the run; None keeps ``wd`` throughout."""
    wd_decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape from ``wd`` to ``wd_final``."""

    def __post_init__(self) -> None:
        _check.at_least("wd", self.wd, 0.0)
        if self.wd_final is not None:
            _check.at_least("wd_final", self.wd_final, 0.0)
        _check.one_of("wd_decay", self.wd_decay, ("cosine", "linear", "constant"))
        _post_init_next(self, WDSchedule)


@dataclass
class MomentumSchedule:
    """EMA momentum of a target network: ``momentum_decay`` from ``momentum`` to ``momentum_final``.

    Raises:
        ValueError: naming the field, for a momentum outside [0, 1].

    Examples:
        >>> momentum_at(0, MomentumSchedule(momentum=0.99), 10)
        0.99
    """

    momentum: float = 0.996
    """Momentum at step 0 (the weight kept from the target at each update)."""
    momentum_final: float = 1.0
    """Momentum at the end of the run."""
    momentum_decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape from ``momentum`` to ``momentum_final``."""

    def __post_init__(self) -> None:
        _check.in_range("momentum", self.momentum, 0.0, 1.0)
        _check.in_range("momentum_final", self.momentum_final, 0.0, 1.0)
        _check.one_of("momentum_decay", self.momentum_decay, ("cosine", "linear", "constant"))
        _post_init_next(self, MomentumSchedule)


def warmup_steps_of(schedule: LRSchedule, total_steps: int) -> int:
    """The warm-up ``lr_at`` uses: ``schedule.warmup_steps``, or when that is None
    ``min(schedule.default_warmup, total_steps // 10)``.

    ``default_warmup`` is a class attribute a recipe's ``Optim`` sets (0 when
    absent), so a short smoke run gets a short warm-up without a second flag.

    Args:
        schedule: The learning-rate schedule.
        total_steps: The run's length in updates.

    Returns:
        The warm-up length in updates.

    Examples:
        >>> from typing import ClassVar
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Optim(LRSchedule):
        ...     default_warmup: ClassVar[int] = 100
        >>> warmup_steps_of(Optim(warmup_steps=None), 1500), warmup_steps_of(Optim(warmup_steps=None), 20)
        (100, 2)
        >>> warmup_steps_of(Optim(warmup_steps=7), 20)
        7
    """
    if schedule.warmup_steps is not None:
        return schedule.warmup_steps
    return min(int(getattr(schedule, "default_warmup", 0)), total_steps // 10)


def lr_at(step: Step, schedule: LRSchedule, total_steps: int) -> float | Tensor:
    """Learning rate after ``step`` optimizer updates of a ``total_steps`` run.

    ``warmup_decay`` with ``peak=lr``, ``final=min_lr``, ``start=warmup_start_lr``
    and the warm-up of ``warmup_steps_of``.

    Args:
        step: Updates done; an int, or a 0-d tensor (then a float64 tensor comes back).
        schedule: The learning-rate schedule.
        total_steps: The run's length in updates.

    Returns:
        The learning rate.

    Raises:
        ValueError: when the warm-up is longer than ``total_steps``.

    Examples:
        >>> schedule = LRSchedule(lr=1e-3, warmup_steps=100)
        >>> lr_at(50, schedule, 1000), lr_at(100, schedule, 1000), lr_at(1000, schedule, 1000)
        (0.0005, 0.001, 0.0)
    """
    return warmup_decay(
        step,
        peak=schedule.lr,
        final=schedule.min_lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps_of(schedule, total_steps),
        start=schedule.warmup_start_lr,
        decay=schedule.decay,
        step_every=schedule.step_every,
        step_gamma=schedule.step_gamma,
    )


def wd_at(step: Step, schedule: WDSchedule, total_steps: int) -> float | Tensor:
    """Weight decay after ``step`` optimizer updates of a ``total_steps`` run.

    From ``wd`` to ``wd_final`` (``wd`` when None) by ``wd_decay``, no warm-up.

    Args:
        step: Updates done; an int or a 0-d tensor.
        schedule: The weight-decay schedule.
        total_steps: The run's length in updates.

    Returns:
        The weight decay.

    Examples:
        >>> schedule = WDSchedule(wd=0.04, wd_final=0.4)  # DINO's
        >>> [round(wd_at(t, schedule, 100), 6) for t in (0, 50, 100)]
        [0.04, 0.22, 0.4]
    """
    final = schedule.wd if schedule.wd_final is None else schedule.wd_final
    return warmup_decay(
        step, peak=schedule.wd, final=final, total_steps=total_steps, decay=schedule.wd_decay
    )


def momentum_at(step: Step, schedule: MomentumSchedule, total_steps: int) -> float | Tensor:
    """EMA momentum after ``step`` optimizer updates of a ``total_steps`` run.

    For the cosine (DINO, I-JEPA): ``m(t) = 1 - (1 - m0) * (1 + cos(pi t / T)) / 2``
    from ``m0 = momentum`` towards ``momentum_final`` (1 in DINO).

    Args:
        step: Updates done; an int or a 0-d tensor.
        schedule: The momentum schedule.
        total_steps: The run's length ``T`` in updates.

    Returns:
        The momentum for ``ema_update``.

    Examples:
        >>> schedule = MomentumSchedule(momentum=0.996, momentum_final=1.0)
        >>> [round(momentum_at(t, schedule, 100), 6) for t in (0, 50, 100)]
        [0.996, 0.998, 1.0]
    """
    return warmup_decay(
        step,
        peak=schedule.momentum,
        final=schedule.momentum_final,
        total_steps=total_steps,
        decay=schedule.momentum_decay,
    )


# --- per-parameter-group scales ------------------------------------------------


def layer_decay_scales(num_layers: int, decay: float) -> list[float]:
    """Layer-wise lr decay (BEiT, timm): the scale ``decay ** (num_layers + 1 - i)`` of layer id ``i``.

    Layer id 0 is the embedding, ``1..num_layers`` the blocks, ``num_layers + 1``
    the head (scale 1). Give the result to ``param_groups(layer_scales=...)``.

    Args:
        num_layers: Blocks in the network (at least 0).
        decay: The factor per layer, in [0, 1].

    Returns:
        ``num_layers + 2`` scales, the embedding's first.

    Raises:
        ValueError: naming the argument, for a negative ``num_layers`` or a ``decay`` outside [0, 1].

    Examples:
        >>> layer_decay_scales(2, 0.5)
        [0.125, 0.25, 0.5, 1.0]
    """
    _check.integer_at_least("num_layers", num_layers, 0)
    _check.in_range("decay", decay, 0.0, 1.0)
    return [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def vit_layer_id(name: str, depth: int) -> int:
    """A ViT parameter's layer id for ``layer_decay_scales`` (BEiT's and DINOv2's rule).

    0: the embeddings (``patch_embed``, ``pos_embed``, ``cls_token``, ``register_tokens``, ``mask_token``);
    ``i + 1``: block ``i``; ``depth + 1``: everything else (the final norm, heads). Names may carry a
    prefix (``backbone.blocks.3.attn.qkv.weight``).

    Examples:
        >>> [vit_layer_id(n, 12) for n in ("backbone.pos_embed", "blocks.0.norm1.weight", "norm.bias", "w")]
        [0, 1, 13, 13]
    """
    parts = name.split(".")
    if any(p in ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token") for p in parts):
        return 0
    for i, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1]) + 1
    return depth + 1


def no_decay_dinov2(name: str, param: Tensor) -> bool:
    """DINOv2's rule: no weight decay for biases, norms and LayerScale (``gamma``); the class, register
    and mask tokens and the position embeddings decay.

    Examples:
        >>> [no_decay_dinov2(n, torch.zeros(1)) for n in ("blocks.0.ls1.gamma", "cls_token", "norm.weight")]
        [True, False, True]
    """
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def no_decay_by_default(name: str, param: Tensor) -> bool:
    """Biases, norm weights and other 0-d/1-d tensors are usually excluded from weight decay.

    Examples:
        >>> no_decay_by_default("bias", torch.zeros(3)), no_decay_by_default("weight", torch.zeros(3, 3))
        (True, False)
    """
    return param.ndim <= 1


def param_groups(
    model: nn.Module,
    *,
    no_weight_decay: Callable[[str, Tensor], bool] = no_decay_by_default,
    layer_of: Callable[[str], int] | None = None,
    layer_scales: Sequence[float] | None = None,
    lr_scale_of: Callable[[str], float] | None = None,
) -> list[dict]:
    """Optimizer parameter groups carrying ``lr_scale`` and ``wd_scale`` for ``apply_update``.

    Parameters are split by weight decay (``wd_scale`` 1 or 0) and, when
    ``layer_of`` maps a parameter name to a layer id, by layer (``lr_scale =
    layer_scales[id]``). Frozen parameters (``requires_grad=False``) are left
    out. Group order is deterministic (first appearance), so a checkpoint's
    optimizer state lines up on resume.

    Args:
        model: The module whose parameters to group.
        no_weight_decay: ``(name, param) -> bool``, True for parameters without
            weight decay (default: every 0-d or 1-d tensor: biases, norms).
        layer_of: ``name -> layer id``, for layer-wise lr decay.
        layer_scales: The lr scale of each layer id (``layer_decay_scales``).
        lr_scale_of: ``name -> factor`` multiplying the lr scale (DINOv2's patch embedding at 0.2:
            ``lambda n: 0.2 if "patch_embed" in n else 1.0``).

    Returns:
        A list of dicts ``{"params", "lr_scale", "wd_scale"}`` for any torch optimizer.

    Raises:
        ValueError: when ``layer_of`` and ``layer_scales`` are not given together,
            or a layer id has no scale.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> [(len(g["params"]), g["wd_scale"]) for g in param_groups(model)]
        [(1, 1.0), (3, 0.0)]
    """
    if (layer_of is None) != (layer_scales is None):
        raise ValueError("layer_of and layer_scales go together: give both or neither")
    groups: dict[tuple[int, bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = 0 if layer_of is None else layer_of(name)
        if layer_scales is not None and not 0 <= layer < len(layer_scales):
            _check.fail(f"layer_of({name!r})", layer, f"a layer id in [0, {len(layer_scales) - 1}]")
        decays = not no_weight_decay(name, param)
        factor = 1.0 if lr_scale_of is None else float(lr_scale_of(name))
        group = groups.setdefault(
            (layer, decays, factor),
            {
                "params": [],
                "names": [],
                "lr_scale": (1.0 if layer_scales is None else float(layer_scales[layer])) * factor,
                "wd_scale": 1.0 if decays else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())



"""``TrainState``: what the user's loop threads through stepkit's functions."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stepkit import check as _check
from stepkit import dist

__all__ = ["Target", "unwrap_compiled", "unwrap", "TrainState", "target_state_dict", "load_target_state_dict",
           "load_extras", "torch_rng_state", "set_torch_rng_state", "rng_state", "set_rng_state"]

Target = nn.Module | dict[str, Tensor] | None


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrappers (``._orig_mod``), DDP left in place.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> unwrap_compiled(model) is model
        True
    """
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod  # type: ignore[assignment]
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Args:
        model: A module, wrapped or not.

    Returns:
        The innermost module (``model`` itself when it is not wrapped).

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> unwrap(model) is model
        True
    """
    while True:
        model = unwrap_compiled(model)
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        model = model.module


@dataclass
class TrainState:
    """The loop's state, in one place: what a training loop threads through stepkit's functions.

    ``step`` counts optimizer updates (skipped non-finite ones included, so
    schedules keep moving); ``micro_step`` counts backward passes; ``accum``
    is how many micro-steps make one update. ``target`` holds the EMA
    weights: a module, or a dict of tensors to evaluate with
    ``torch.func.functional_call``. ``extras`` holds method state (DINO's
    center, a learnable temperature's history...): tensors or plain Python
    values. ``data_position`` is how many batches the loop has consumed;
    ``rank_extras`` holds what differs per rank and is saved per rank beside
    its RNG state (a streamed data set's reading positions).
    ``run_id`` is the experiment tracker's id, so a resumed run continues it.
    ``skipped_steps`` is a 0-d tensor (no host sync to count), created on
    the model's device. ``state_dict`` / ``load_state_dict`` carry all of it,
    RNG states included, for bit-exact resume.

    Raises:
        ValueError: naming the field, for ``accum`` below 1 or a negative ``step`` / ``micro_step``.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), accum=2)
        >>> state.step, state.micro_step, state.accum, int(state.skipped_steps)
        (0, 0, 2, 0)
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    _: KW_ONLY  # every field after these two by name: TrainState(m, opt, target=t), never by position
    target: Target = None
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    micro_step: int = 0
    accum: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    data_position: int = 0
    rank_extras: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    skipped_steps: Tensor = None  # type: ignore[assignment]  # made on the model's device by __post_init__
    grad_norm: Tensor | None = field(default=None, repr=False)
    """The last pre-clip gradient norm ``clip`` computed for the update in progress; not saved."""

    def __post_init__(self) -> None:
        _check.integer_at_least("accum", self.accum, 1)
        _check.integer_at_least("step", self.step, 0)
        _check.integer_at_least("micro_step", self.micro_step, 0)
        if self.skipped_steps is None:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    def state_dict(self, *, by_name: bool = False) -> dict[str, Any]:
        """Everything resume needs, RNG states included, as tensors and plain Python values.

        The one serializer of a ``TrainState``: the single-file checkpoint
        saves this dict with ``torch.save``, the sharded one hands the same
        dict (less ``rng``, which is saved per rank) to
        ``torch.distributed.checkpoint``. Loadable with
        ``torch.load(weights_only=True)``: numpy's RNG state is stored as a
        tensor, not an array.

        Args:
            by_name: Key the model and optimizer state by parameter name, through
                ``torch.distributed.checkpoint.state_dict.get_state_dict`` (the layout
                sharded checkpoints use; always so for an FSDP2 model). Otherwise the
                plain ``state_dict()`` of the unwrapped model and of the optimizer.

        Returns:
            ``{"model", "optimizer", "step", "micro_step", "accum", "extras",
            "data_position", "run_id", "skipped_steps", "rng", "rank_extras"}``, plus ``"target"``
            and ``"scaler"`` when the state has them.

        Examples:
            >>> model = torch.nn.Linear(2, 1)
            >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=3)
            >>> sd = state.state_dict()
            >>> sd["step"], sorted(sd["model"])
            (3, ['bias', 'weight'])
        """
        model, optimizer = self._model_and_optimizer_state(by_name)
        out: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "step": self.step,
            "micro_step": self.micro_step,
            "accum": self.accum,
            "extras": dict(self.extras),
            "data_position": self.data_position,
            "run_id": self.run_id,
            "skipped_steps": self.skipped_steps,
            **self.rank_part(),
        }
        if self.target is not None:
            out["target"] = target_state_dict(self.target)
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def check_parts(self, saved: Iterable[str]) -> None:
        """Raise ``ValueError`` unless a saved state has an EMA target and a GradScaler exactly where
        this one does.

        Args:
            saved: The saved state's top-level keys.

        Examples:
            >>> model = torch.nn.Linear(2, 1)
            >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> state.check_parts(["model", "optimizer", "scaler"])
            Traceback (most recent call last):
            ValueError: scaler: the saved state has a GradScaler but this TrainState has none
        """
        saved = set(saved)
        parts = (("target", self.target is not None, "EMA target weights", "them"),
                 ("scaler", self.scaler is not None, "a GradScaler", "one"))
        for key, here, what, some in parts:
            if here != (key in saved):
                has = what if key in saved else "no " + what.removeprefix("a ")
                raise ValueError(f"{key}: the saved state has {has} but this TrainState has "
                                 f"{some if here else 'none'}")

    def _model_and_optimizer_state(self, by_name: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        if by_name or dist.is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import get_state_dict

            return get_state_dict(self.model, self.optimizer)
        return unwrap(self.model).state_dict(), self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True,
                        by_name: bool = False) -> None:
        """Restore what ``state_dict`` saved, in place; strict about model and target keys.

        Args:
            state: A ``state_dict()``, as saved.
            restore_rng: Also set the RNG states from ``state["rng"]`` (when it has one).
            by_name: The model and optimizer state are keyed by parameter name
                (``state_dict(by_name=True)``); always so for an FSDP2 model.

        Raises:
            ValueError: for a dict that is not a ``state_dict()``, or one with (or without) a target
                or a GradScaler this state does not (or does) have.

        Examples:
            >>> model = torch.nn.Linear(2, 1)
            >>> saved = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=9).state_dict()
            >>> fresh = torch.nn.Linear(2, 1)
            >>> state = TrainState(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
            >>> state.load_state_dict(saved)
            >>> state.step, torch.equal(fresh.weight, model.weight)
            (9, True)
        """
        missing = {"model", "optimizer", "step", "micro_step"} - state.keys()
        if missing:
            raise ValueError(f"train state is missing {sorted(missing)}: not a TrainState.state_dict()")
        self.check_parts(state.keys())
        if by_name or dist.is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        else:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.target is not None:
            load_target_state_dict(self.target, state["target"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.micro_step = int(state["micro_step"])
        self.accum = int(state.get("accum", self.accum))
        self.extras = load_extras(self.extras, state.get("extras", {}))
        self.data_position = int(state.get("data_position", 0))
        self.run_id = state.get("run_id")
        if "skipped_steps" in state:
            self.skipped_steps.copy_(state["skipped_steps"])
        self.grad_norm = None
        if restore_rng and "rng" in state:
            self.load_rank_part(state)

    def rank_part(self) -> dict[str, Any]:
        """What each rank saves for itself: ``{"rng": rng_state(), "rank_extras": ...}``.

        Examples:
            >>> model = torch.nn.Linear(2, 1)
            >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), rank_extras={"at": 3})
            >>> sorted(state.rank_part()), state.rank_part()["rank_extras"]
            (['rank_extras', 'rng'], {'at': 3})
        """
        return {"rng": rng_state(), "rank_extras": dict(self.rank_extras)}

    def load_rank_part(self, part: dict[str, Any]) -> None:
        """Restore what ``rank_part`` saved: this rank's RNG states and ``rank_extras``."""
        set_rng_state(part["rng"])
        self.rank_extras = load_extras(self.rank_extras, part.get("rank_extras", {}))


def target_state_dict(target: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA target's tensors by name, whether it is a module or a dict of tensors.

    Args:
        target: ``TrainState.target``: a module (a wrapper is unwrapped) or ``{name: tensor}``.

    Returns:
        ``{name: tensor}``, the tensors themselves (not copies).

    Examples:
        >>> sorted(target_state_dict(torch.nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    if isinstance(target, nn.Module):
        return unwrap(target).state_dict()
    return dict(target)


def load_target_state_dict(target: nn.Module | dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    """Copy ``saved`` into the EMA target in place, after checking names and shapes.

    Args:
        target: A module or ``{name: tensor}``, as ``target_state_dict`` takes.
        saved: ``{name: tensor}`` from a checkpoint.

    Raises:
        ValueError: naming the missing or unexpected names, or the tensor whose shape differs.

    Examples:
        >>> target = {"w": torch.zeros(2)}
        >>> load_target_state_dict(target, {"w": torch.ones(2)})
        >>> target["w"]
        tensor([1., 1.])
        >>> load_target_state_dict(target, {"w": torch.ones(3)})
        Traceback (most recent call last):
        ...
        ValueError: target['w']: saved shape (3,) != current (2,)
    """
    if isinstance(target, nn.Module):
        unwrap(target).load_state_dict(saved)
        return
    missing, unexpected = target.keys() - saved.keys(), saved.keys() - target.keys()
    if missing or unexpected:
        raise ValueError(
            f"target: saved EMA weights do not match: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    with torch.no_grad():
        for name, tensor in target.items():
            if tensor.shape != saved[name].shape:
                raise ValueError(
                    f"target[{name!r}]: saved shape {tuple(saved[name].shape)} "
                    f"!= current {tuple(tensor.shape)}"
                )
            tensor.copy_(saved[name])


def load_extras(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """Saved extras; a tensor already in ``current`` is copied into in place (it may be on a device).

    Examples:
        >>> center = torch.zeros(2)
        >>> extras = load_extras({"center": center}, {"center": torch.ones(2), "epoch": 3})
        >>> extras["center"] is center, center.tolist(), extras["epoch"]  # copied in place
        (True, [1.0, 1.0], 3)
    """
    out = dict(current)
    for key, value in saved.items():
        here = current.get(key)
        if isinstance(here, Tensor) and isinstance(value, Tensor) and here.shape == value.shape:
            with torch.no_grad():
                here.copy_(value)
        else:
            out[key] = value
    return out


def torch_rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """torch's CPU RNG state and, once CUDA is in use, every GPU's: the cheap part of ``rng_state``.

    Examples:
        >>> saved = torch_rng_state()
        >>> a = torch.rand(1)
        >>> set_torch_rng_state(saved)
        >>> torch.equal(a, torch.rand(1))
        True
    """
    has_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if has_cuda else None)


def set_torch_rng_state(states: tuple[Tensor, list[Tensor] | None]) -> None:
    """Restore what ``torch_rng_state`` captured.

    Args:
        states: ``(cpu_state, cuda_states or None)`` from ``torch_rng_state``.

    Examples:
        >>> saved = torch_rng_state()
        >>> first = torch.randn(2)
        >>> set_torch_rng_state(saved)
        >>> torch.equal(torch.randn(2), first)
        True
    """
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when present) CUDA RNG states, weights_only-safe.

    Examples:
        >>> import random
        >>> saved = rng_state()
        >>> a = (random.random(), np.random.rand(), torch.rand(1).item())
        >>> set_rng_state(saved)
        >>> a == (random.random(), np.random.rand(), torch.rand(1).item())
        True
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # legacy=True: the MT19937 tuple
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    state["torch"], cuda = torch_rng_state()
    if cuda is not None:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (Python, numpy, torch CPU and CUDA).

    Args:
        state: The dict ``rng_state`` returned (as saved in a checkpoint).

    Examples:
        >>> import random
        >>> saved = rng_state()
        >>> first = random.random()
        >>> set_rng_state(saved)
        >>> random.random() == first
        True
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

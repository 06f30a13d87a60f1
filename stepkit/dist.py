"""torch.distributed, the few calls a training loop needs.

``init_from_env()`` reads what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``...) and starts the process group: nccl on
CUDA, gloo on the CPU. Without torchrun it does nothing, and every other
function here behaves as in a world of one, so a recipe calls them
unconditionally.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stepkit import check as _check

__all__ = ["Strategy", "DistConfig", "launched_by_torchrun", "init_from_env", "note_data_error",
           "noted_data_error", "is_initialized", "rank",
           "world_size", "is_main", "barrier", "shutdown", "any_rank", "gather_to_main",
           "same_on_all_ranks", "broadcast_buffers",
           "all_reduce_mean", "all_gather_with_grad", "pass_to_next_rank", "parallelize", "dtensor_type",
           "is_sharded"]

Strategy = Literal["ddp", "fsdp"]


@dataclass
class DistConfig:
    """``--dist.strategy``: how a run launched by torchrun shares the work (ignored otherwise).

    Examples:
        >>> DistConfig().strategy
        'ddp'
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True
    """Every field may differ on --resume (DDP and FSDP2 checkpoints resume into either strategy)."""

    strategy: Strategy = "ddp"
    """ddp: a full replica per rank, gradients all-reduced; fsdp: FSDP2, parameters, gradients and
    optimizer state sharded across ranks (fully_shard)."""

    def __post_init__(self) -> None:
        _check.one_of("strategy", self.strategy, ("ddp", "fsdp"))


def launched_by_torchrun() -> bool:
    """True when the environment holds torchrun's rank variables.

    Examples:
        >>> launched_by_torchrun()  # a plain python process
        False
    """
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device_type: str = "cpu") -> torch.device:
    """Join the process group torchrun describes; return this process's device.

    ``device_type``: ``"cuda"`` binds the process to GPU ``LOCAL_RANK`` and
    uses nccl; ``"cpu"`` uses gloo. Not under torchrun (or already
    initialised): no process group is created and the device is returned.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl, GPU ``LOCAL_RANK``).

    Returns:
        This process's device.

    Examples:
        >>> init_from_env("cpu"), world_size()  # not under torchrun: a world of one
        (device(type='cpu'), 1)
    """
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if launched_by_torchrun() and not is_initialized():
        store = _restart_store()
        backend, device_id = ("nccl", device) if device_type == "cuda" else ("gloo", None)
        if store is None:  # torch's env:// reads what torchrun set
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, device_id=device_id, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        # FSDP2 modules sit in reference cycles that hold communication work; left to the
        # interpreter's final teardown, their C++ destructors can abort the process ("terminate
        # called without an active exception", SIGABRT: 1 in 3-6 two-rank gloo runs here). A
        # collection at exit, while the interpreter is still whole, frees them cleanly.
        atexit.register(gc.collect)
    return device


def _restart_store() -> dist.Store | None:
    """torchrun's store, under a namespace that this group of workers alone uses.

    Since torch 2.5 torchrun's workers share the agent's rendezvous TCPStore,
    which outlives a restart (``--max-restarts``), and torch adds no prefix
    per restart: the workers of a restarted group read the addresses the dead
    group published and gloo fails in ``connectFullMesh`` (connection
    refused; pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` is no remedy on
    several machines: each agent counts its own restarts, and they differ.
    So the group agrees on a fresh namespace (``_agree_on_namespace``).
    None (torch's own ``env://``) where the store is not shared.

    A group started after a rank noted a data error (``note_data_error``)
    refuses to run: the same sample would stop it again, and the agent
    would restart it until its restarts ran out.
    """
    from torch.distributed.constants import default_pg_timeout

    shared = _agent_store(default_pg_timeout.total_seconds())
    if shared is None:
        return None
    if shared.check([_DATA_ERROR_KEY]):
        noted = shared.get(_DATA_ERROR_KEY).decode()
        _refuse_together(shared, int(os.environ["WORLD_SIZE"]))
        raise ValueError(f"not started again after torchrun's restart: {noted}; it would stop the run at "
                         "the same sample again: fix the data (or pass "
                         "--data.skip-unreadable), then start torchrun again with --resume")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout_s = default_pg_timeout.total_seconds()
    return dist.PrefixStore(f"stepkit/{_agree_on_namespace(shared, rank, world, timeout_s)}/", shared)


_DATA_ERROR_KEY = "stepkit/data_error"
_REFUSED_KEY = "stepkit/refused_after_data_error"


def _refuse_together(store: dist.Store, world: int, timeout_s: float = 30.0) -> None:
    """Wait until every rank of this group has met the noted data error (at most ``timeout_s``).

    The first rank to exit makes torchrun end the others; without the wait a
    rank still starting was ended before it said why it stops. The counter
    outlives the group: this group's ranks are the arrivals up to the next
    multiple of ``world``.
    """
    import time

    arrived = store.add(_REFUSED_KEY, 1)
    everyone = -(-arrived // world) * world
    deadline = time.monotonic() + timeout_s
    while store.add(_REFUSED_KEY, 0) < everyone and time.monotonic() < deadline:
        time.sleep(0.05)


def _agent_store(timeout_s: float) -> dist.Store | None:
    """A client of torchrun's agent store (shared by every agent of the job, kept across restarts), or None
    where the workers are not given it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    env = os.environ
    return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s))


def note_data_error(line: str) -> None:
    """Under torchrun, leave a data error where the job's other ranks and its restarted workers read it.

    ``stepkit.cli.run_main`` calls it with a ``stepkit.faults.DataError``'s
    line. A restart by ``--max-restarts`` then refuses to start (in
    ``init_from_env``) instead of training up to the same sample again, and
    a rank that lost its peer in a collective says why (``noted_data_error``).
    The note lives in torchrun's agent store, so a new ``torchrun`` starts
    afresh. Outside torchrun, or where the store cannot be reached, nothing
    happens.

    Args:
        line: The error's one line (it names the file).

    Examples:
        >>> note_data_error("st/0002.tar: cut off")  # not under torchrun: nothing to tell
        >>> noted_data_error() is None
        True
    """
    try:
        store = _agent_store(5.0)
        if store is not None and not store.check([_DATA_ERROR_KEY]):
            store.set(_DATA_ERROR_KEY, f"rank {os.environ.get('RANK', '?')} stopped on a data error: {line}")
    except (RuntimeError, OSError, ValueError, KeyError):  # the agent gone: there is no restart to stop
        pass


def noted_data_error() -> str | None:
    """The data error a rank of this torchrun job noted (``note_data_error``), or None.

    Examples:
        >>> noted_data_error() is None  # not under torchrun
        True
    """
    try:
        store = _agent_store(5.0)
        if store is not None and store.check([_DATA_ERROR_KEY]):
            return store.get(_DATA_ERROR_KEY).decode()
    except (RuntimeError, OSError, ValueError, KeyError):
        pass
    return None


def _agree_on_namespace(store: dist.Store, rank: int, world: int, timeout_s: float) -> str:
    """A name every worker of this group learns, that no earlier group used, through a store that keeps
    the earlier groups' keys.

    Each worker posts a fresh nonce under ``hello/<rank>`` and waits for the
    key ``ack/<its nonce>``, which only a rank 0 that read that nonce can have
    written: rank 0 of this group (an earlier group's died before this one
    started) writes its own new name there for every nonce it reads. The
    worker confirms under ``ok/<nonce>``; rank 0 reads the nonces again
    until every rank's is confirmed with this name (a nonce it read may be
    an earlier group's, whose worker is gone).
    """
    import time
    import uuid

    nonce = uuid.uuid4().hex
    if rank != 0:
        store.set(f"stepkit/hello/{rank}", nonce)
        name = store.get(f"stepkit/ack/{nonce}").decode()  # blocks in the store: no polling
        store.set(f"stepkit/ok/{nonce}", name)
        return name
    name, deadline = nonce, time.monotonic() + timeout_s
    answered: set[str] = set()
    hello_keys = [f"stepkit/hello/{r}" for r in range(1, world)]
    while True:
        hellos = [h.decode() for h in store.multi_get(hello_keys)] if hello_keys else []
        for hello in set(hellos) - answered:  # a new nonce, or one an earlier group left
            store.set(f"stepkit/ack/{hello}", name)
            answered.add(hello)
        ok_keys = [f"stepkit/ok/{h}" for h in hellos]
        if not ok_keys or (store.check(ok_keys) and set(store.multi_get(ok_keys)) == {name.encode()}):
            return name
        if time.monotonic() > deadline:
            raise RuntimeError(f"torchrun's workers did not all start within {timeout_s:.0f} s")
        time.sleep(0.01)


def is_initialized() -> bool:
    """Whether a torch.distributed process group exists.

    Examples:
        >>> is_initialized()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 outside a process group.

    Examples:
        >>> rank()
        0
    """
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes, 1 outside a process group.

    Examples:
        >>> world_size()
        1
    """
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes the run's files.

    Examples:
        >>> is_main()
        True
    """
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op outside a process group.

    Examples:
        >>> barrier()
    """
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while others still talk).

    Examples:
        >>> shutdown()  # nothing to leave in a world of one
    """
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # what the group's work still held (see init_from_env)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a MAX all-reduce; ``flag`` itself in a world of one).

    A barrier that also says whether some rank failed: every rank calls it at
    the same point and learns the same answer, so all of them raise alike.

    Examples:
        >>> any_rank(False), any_rank(True)
        (False, True)
    """
    if not is_initialized() or world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces device tensors only
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(obj: object) -> list | None:
    """Every rank's ``obj`` (small, picklable) as a list on rank 0, by rank; None on the other ranks.

    Examples:
        >>> gather_to_main({"rank": 0})  # a world of one: its own
        [{'rank': 0}]
    """
    if not is_initialized() or world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)  # all_gather: nccl has no gather of objects everywhere
    return gathered if is_main() else None


def same_on_all_ranks(text: str) -> bool:
    """Whether every rank passed the same string (compared through its SHA-256; True in a world of one).

    Examples:
        >>> same_on_all_ranks("config digest")
        True
    """
    if not is_initialized() or world_size() == 1:
        return True
    import hashlib

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces device tensors only
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int64, device=device)
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank, in place.

    DDP does this before each forward; FSDP2 leaves each rank's buffers to
    drift apart on its own data, so a checkpoint or an evaluation needs
    one agreed copy.

    Examples:
        >>> norm = torch.nn.BatchNorm1d(2)
        >>> broadcast_buffers(norm)  # a world of one: unchanged
    """
    if is_initialized() and world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=src)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over ranks, in place (and returned); a no-op in a world of one.

    Examples:
        >>> all_reduce_mean(torch.tensor([1.0, 3.0]))
        tensor([1., 3.])
    """
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss saw this rank's rows: their gradient is the sum over ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0, keeping the autograd graph.

    The backward pass sums, over ranks, the gradient each rank's loss sends
    to this rank's rows, so after DDP averages the parameter gradients they
    are those of the mean of all ranks' losses, as if one process had seen
    the whole gathered batch. A world of one returns ``x`` itself.

    Examples:
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> all_gather_with_grad(x).shape  # a world of one: x itself
        torch.Size([2, 3])
    """
    if not is_initialized() or world_size() == 1:
        return x
    return _AllGather.apply(x)


def _exchange(x: Tensor, to: int, source: int) -> Tensor:
    x, received = x.contiguous(), torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _PassToNext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.before, ctx.after = (rank() - 1) % world_size(), (rank() + 1) % world_size()
        return _exchange(x, ctx.after, ctx.before)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # The next rank's loss used our rows: its gradient comes back the way they went.
        return _exchange(grad, ctx.before, ctx.after)


def pass_to_next_rank(x: Tensor) -> Tensor:
    """Send ``x`` to rank ``r + 1`` and return what rank ``r - 1`` sent (around a ring), keeping the
    autograd graph: the backward pass sends the gradient back to the rank the rows came from.

    ``W - 1`` calls show every rank every other rank's rows, one block at a
    time, so a loss over all pairs never holds more than two blocks (SigLIP's
    chunked form, ``siglip_loss``). A world of one returns ``x`` itself.

    Examples:
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> pass_to_next_rank(x) is x  # a world of one
        True
    """
    if not is_initialized() or world_size() == 1:
        return x
    return _PassToNext.apply(x)


def parallelize(
    model: nn.Module,
    strategy: Strategy,
    device: torch.device,
    *,
    shard: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    param_dtype: torch.dtype | None = None,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Wrap ``model`` for the process group: DDP, or FSDP2's ``fully_shard``; unchanged in a world of one.

    FSDP2: each module ``shard(model)`` yields (inner ones first: transformer
    blocks, then towers) is sharded on its own, so it gathers its parameters
    just for its own forward and can also be called alone (evaluation of a
    backbone), then the root. ``param_dtype`` (e.g. bf16) is the mixed-
    precision compute dtype; gradients are reduced in float32. A module with
    no trainable parameter (an EMA teacher) is sharded the same way, never
    wrapped in DDP (it has no gradient to all-reduce: keep it as is).
    ``ignore``: names of parameters neither DDP nor FSDP2 may touch (ones a
    loss uses outside the module's forward, like a logit scale): they stay
    plain replicated tensors; average their gradients yourself with
    ``all_reduce_mean`` before the update.

    Args:
        model: The module to wrap.
        strategy: ``"ddp"`` or ``"fsdp"``.
        device: This rank's device.
        shard: ``model -> modules`` to shard on their own under FSDP2 (inner first).
        param_dtype: FSDP2's compute dtype (mixed precision).
        ignore: Parameters DDP should not synchronise.

    Returns:
        The wrapped model (``model`` itself in a world of one).

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> parallelize(model, "ddp", torch.device("cpu")) is model
        True
    """
    _check.one_of("strategy", strategy, ("ddp", "fsdp"))
    if not is_initialized() or world_size() == 1:
        return model
    trainable = any(p.requires_grad for p in model.parameters())
    ignore = list(ignore)
    unknown = sorted(set(ignore) - {n for n, _ in model.named_parameters()})
    if unknown:
        _check.fail("ignore", unknown, "names of the model's parameters")
    if strategy == "ddp":
        if not trainable:
            return model
        if ignore:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        device_ids = [device] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reduce_dtype = torch.float32 if param_dtype else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = {id(m): m for m in (shard(model) if shard else ())}  # a module named twice (a shared tower) once
    for module in units.values():
        fully_shard(module, mp_policy=policy)
    named = dict(model.named_parameters())
    # FSDP2 would keep a root's parameters gathered after its forward, for the backward that
    # follows; an evaluation or an EMA teacher has no backward, and would leave them gathered.
    fully_shard(model, mp_policy=policy, ignored_params={named[n] for n in ignore} or None,
                reshard_after_forward=True)
    return model


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` if that module is loaded, else None.

    Looked up, not imported: a DTensor can only exist once its module is
    loaded, and importing it costs about half a second that a run without
    FSDP (and ``import stepkit``) should not pay.

    Examples:
        >>> dtensor_type() is None or dtensor_type().__name__ == "DTensor"
        True
    """
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors).

    Examples:
        >>> is_sharded(torch.nn.Linear(2, 1))
        False
    """
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())

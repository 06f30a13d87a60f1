"""The loop's batches: an epoch-seeded resumable order, resumed shard streams, prefetch to the device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from stepkit import check as _check
from stepkit.data.loader import seeded_loader
from stepkit.seeds import torch_generator

__all__ = ["ResumableSampler", "train_batches", "TrainBatches", "Prefetch"]


class ResumableSampler:
    """Indices of an epoch-seeded permutation, this rank's share, starting ``start`` samples in.

    Epoch ``e`` draws ``randperm(n)`` from a generator seeded with ``seed``
    and ``e``, so every rank and every resumed run sees the same order; rank
    ``r`` of ``world`` takes every ``world``-th index (the epoch is cut to a
    multiple of ``world``). Infinite: it runs over epoch after epoch. With
    ``with_epoch`` it yields ``(index, epoch)``, for datasets that draw a
    sample's augmentation from its own seed (``stepkit.data.TrainImages``).

    Examples:
        >>> from itertools import islice
        >>> whole = list(islice(ResumableSampler(6, seed=1), 6))  # it never ends: epoch after epoch
        >>> list(islice(ResumableSampler(6, seed=1, start=4), 2)) == whole[4:6]  # a resumed run continues
        True
    """

    def __init__(self, n: int, *, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1,
                 with_epoch: bool = False) -> None:
        _check.integer_at_least("n", n, 1)
        _check.integer_at_least("start", start, 0)
        if not 0 <= rank < world:
            _check.fail("rank", rank, f"an integer in [0, {world - 1}]")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world
        self.with_epoch = with_epoch
        self.per_rank = n // world
        if self.per_rank == 0:
            raise ValueError(f"{n} samples cannot be shared by {world} ranks")

    def epoch_order(self, epoch: int) -> list[int]:
        import torch

        g = torch_generator(self.seed, "order", epoch)
        order = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        return order[self.rank :: self.world].tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order = self.epoch_order(epoch)[offset:]
            yield from ((i, epoch) for i in order) if self.with_epoch else order
            epoch, offset = epoch + 1, 0


def train_batches(source: Any, state: Any, *, batch_size: int, seed: int, workers: int = 0,
                  shards: Any = None, skip_unreadable: bool = False, with_epoch: bool | None = None,
                  timeout: float = 0, prepare: Callable[[Any], Any] | None = None, prefetch: bool = False,
                  device: Any = "cpu", **loader_kwargs: Any) -> TrainBatches:
    """A run's training batches, from where ``state`` left off, each recorded in ``state`` as it is
    consumed: iterate it, and resume is exact whatever the source.

    Without shards: a ``seeded_loader`` over an epoch-seeded ``ResumableSampler`` of ``source`` (rank
    ``r`` of ``world`` takes its share of each epoch's permutation, from sample
    ``state.data_position x batch_size`` on; incomplete batches dropped). With ``shards``: ``source``
    makes each sample (``(fields, rng, where) -> sample``, e.g. ``stepkit.data.ShardCrops``) and every
    worker reads on from its place in the checkpoint (``stepkit.data.resumable_stream``). Either way a
    batch comes out as the dataset's collated samples, and each one handed to the loop adds one to
    ``state.data_position`` and (shards) moves its reader's place in ``state.rank_extras``: the loop
    never tests where its data came from, and keeps no bookkeeping of its own.

    The loader is made when iteration starts, so a state resumed after this call still counts.

    Args:
        source: A map-style dataset, or with ``shards`` the sample maker.
        state: The run's ``TrainState``, fresh or resumed.
        batch_size: Samples per batch on this rank.
        seed: The run's seed (order, worker seeds, each sample's crops).
        workers: DataLoader workers.
        shards: The shard files (None: ``source`` is the dataset).
        skip_unreadable: Shards: count and skip unreadable samples instead of stopping.
        with_epoch: The sampler yields ``(index, epoch)``; None: when ``source.with_epoch`` says so
            (``stepkit.data.TrainImages``: each sample's crops drawn from its epoch).
        timeout: Seconds to wait for a batch before ``stepkit.faults.DataStalled`` (0: forever).
        prepare: ``batch -> what the step consumes`` (device copies, augmentation), run on each batch.
        prefetch: Prepare the next batch while the step runs (``Prefetch``; a CUDA side stream).
        device: Where ``prepare`` runs.
        **loader_kwargs: Any other ``DataLoader`` argument (``pin_memory``, ...).

    Returns:
        A ``TrainBatches``: iterable (endless, epoch after epoch), with ``rng_as_consumed()`` for saving
        and ``skipped`` (unreadable shard samples skipped so far).

    Examples:
        >>> import torch
        >>> from stepkit import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> from itertools import islice
        >>> data = torch.utils.data.TensorDataset(torch.arange(6))
        >>> first = [b.tolist() for b, in islice(train_batches(data, state, batch_size=2, seed=0), 3)]
        >>> state.data_position  # each batch handed out is counted as consumed
        3
        >>> state.data_position = 1  # as saved after one batch: a resumed run starts at the second
        >>> again = train_batches(data, state, batch_size=2, seed=0)
        >>> [b.tolist() for b, in islice(again, 2)] == first[1:]
        True
    """
    return TrainBatches(source, state, batch_size=batch_size, seed=seed, workers=workers, shards=shards,
                        skip_unreadable=skip_unreadable, with_epoch=with_epoch, timeout=timeout,
                        prepare=prepare, prefetch=prefetch, device=device, **loader_kwargs)


class TrainBatches:
    """What ``train_batches`` returns: a run's batches that record their own consumption in the state.

    Each batch handed out has ``state.data_position`` counted and, from shards, its reader's place kept
    (``stepkit.data.ShardPositions``); with ``prefetch`` the batch after it is prepared already, so a
    checkpoint is saved inside ``rng_as_consumed()`` (``stepkit.run.Run`` does this).

    Examples:
        >>> import torch
        >>> from stepkit import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = torch.utils.data.TensorDataset(torch.arange(4.0))
        >>> doubled = TrainBatches(data, state, batch_size=2, seed=0, prepare=lambda b: b[0] * 2)
        >>> batch = next(iter(doubled))
        >>> batch.shape, state.data_position, doubled.skipped
        (torch.Size([2]), 1, 0)
    """

    def __init__(self, source: Any, state: Any, *, batch_size: int, seed: int, workers: int = 0,
                 shards: Any = None, skip_unreadable: bool = False, with_epoch: bool | None = None,
                 timeout: float = 0, prepare: Callable[[Any], Any] | None = None, prefetch: bool = False,
                 device: Any = "cpu", **loader_kwargs: Any) -> None:
        _check.integer_at_least("batch_size", batch_size, 1)
        self.source, self.state, self.shards = source, state, shards
        self.options = dict(batch_size=batch_size, seed=seed, workers=workers, timeout=timeout,
                            **loader_kwargs)
        self.skip_unreadable = skip_unreadable
        self.with_epoch = getattr(source, "with_epoch", False) if with_epoch is None else with_epoch
        self.prepare = prepare or (lambda batch: batch)
        self.prefetch, self.device = prefetch, device
        self.positions: Any = None  # ShardPositions, once iteration starts on shards
        self._prefetch: Prefetch | None = None

    def _loader(self) -> Any:
        from stepkit import dist

        o = dict(self.options)
        if self.shards is not None:
            from stepkit.data.streams import resumable_stream

            stream, self.positions = resumable_stream(self.shards, self.source, self.state,
                                                      seed=o["seed"], workers=o["workers"],
                                                      skip_unreadable=self.skip_unreadable)
            return seeded_loader(stream, **o)
        sampler = ResumableSampler(len(self.source), seed=o["seed"], rank=dist.rank(),
                                   world=dist.world_size(), start=self.state.data_position * o["batch_size"],
                                   with_epoch=self.with_epoch)
        return seeded_loader(self.source, sampler=sampler, drop_last=True, **o)

    def _prepared(self, batch: Any) -> tuple[Any, Any]:
        if self.shards is None:
            return self.prepare(batch), None
        samples, places, skipped = batch  # where each sample was read: the readers' places
        return self.prepare(samples), (places, skipped)

    def __iter__(self) -> Iterator[Any]:
        self._prefetch = Prefetch(self._loader(), self._prepared, self.device, enabled=self.prefetch)
        for batch, read_at in self._prefetch:
            self.state.data_position += 1
            if read_at is not None:
                self.positions.update(*read_at, self.state.data_position)
            yield batch

    def rng_as_consumed(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the global RNG is as the last batch handed out left it (for saving)."""
        return self._prefetch.rng_as_consumed() if self._prefetch is not None else contextlib.nullcontext()

    def close(self) -> None:
        """End the loader's worker processes now (``stepkit.run.Run`` does this when its loop ends)."""
        if self._prefetch is not None:
            self._prefetch.close()

    @property
    def skipped(self) -> int:
        """Unreadable shard samples skipped so far, this run and the runs it resumed (0 without shards)."""
        return self.positions.skipped if self.positions is not None else 0


class Prefetch:
    """``next(prefetch)``: the next prepared batch, while the one after it is prepared in the background.

    ``prepare(raw_batch)`` turns what ``batches`` yields into what a step
    consumes (e.g. multi-crop views on the device). On CUDA it runs on a side
    stream, so the next batch's copies and augmentation overlap the current
    step's kernels; the consuming stream waits for it on ``next``. With
    ``enabled=False`` it is a plain ``prepare(next(batches))``.

    Preparing a batch early draws its random augmentation early, so the
    global RNG runs one batch ahead of the step. A checkpoint must record
    the RNG as of the batch the step consumed: save inside
    ``with prefetch.rng_as_consumed(): ...``, and a resumed run prepares the
    pending batch again with the same draws (bit-exact where the run is:
    on the CPU, when nothing else in the step draws from the global RNG).

    Args:
        batches: An iterable of raw batches (e.g. a DataLoader).
        prepare: ``raw_batch -> batch`` (device copies, augmentation).
        device: Where ``prepare`` runs; a CUDA device gets a side stream.
        enabled: False: prepare each batch when it is asked for.

    Examples:
        >>> prefetch = Prefetch(iter([1, 2, 3]), lambda b: b * 10, "cpu")
        >>> next(prefetch), next(prefetch)  # batch 2 was ready first; batch 3 is being prepared
        (10, 20)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> noisy = Prefetch(iter([0, 0, 0]), lambda b: torch.rand(1), "cpu")
        >>> first = next(noisy)  # the second batch's draw has happened already
        >>> with noisy.rng_as_consumed():  # the RNG as the first batch left it (what a checkpoint saves)
        ...     replay = torch.rand(1)
        >>> torch.equal(replay, next(noisy))  # the second batch drew exactly that
        True
    """

    def __init__(self, batches, prepare, device, *, enabled: bool = True) -> None:
        import torch

        self.batches, self.prepare, self.enabled = iter(batches), prepare, enabled
        self.stream = torch.cuda.Stream(device) if enabled and torch.device(device).type == "cuda" else None
        self._pending = None  # (prepared batch, ready event, RNG state before it was prepared)

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        if not self.enabled:
            return self.prepare(next(self.batches))
        if self._pending is None:
            self._pending = self._start()
        batch, ready, _ = self._pending
        if ready is not None:
            consumer = torch.cuda.current_stream(self.stream.device)
            consumer.wait_event(ready)
            _record_stream(batch, consumer)  # the side stream's memory is now used by the consumer too
        self._pending = self._start()
        return batch

    def _start(self):
        import torch

        from stepkit.state import rng_state

        before = rng_state()
        raw = next(self.batches)
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            batch = self.prepare(raw)
        ready = self.stream.record_event() if self.stream is not None else None
        return batch, ready, before

    def close(self) -> None:
        """Close ``batches`` when it can be (a ``WatchedLoader``'s iterator ends its workers)."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()

    @contextlib.contextmanager
    def rng_as_consumed(self) -> Iterator[None]:
        """A context in which the global RNG is as the consumed batch left it (for saving)."""
        from stepkit.state import rng_state, set_rng_state

        if self._pending is None:
            yield
            return
        ahead = rng_state()
        set_rng_state(self._pending[2])
        try:
            yield
        finally:
            set_rng_state(ahead)


def _record_stream(batch, stream) -> None:
    import torch

    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            _record_stream(item, stream)
    elif isinstance(batch, dict):
        for item in batch.values():
            _record_stream(item, stream)

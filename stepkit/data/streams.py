"""Shards streamed across ranks and DataLoader workers, resumable to the sample.

Reading order. Every epoch, the shards are shuffled with the run's seed and
the epoch, and dealt out to the ``ranks x workers`` readers (reader ``r``
takes every ``ranks x workers``-th shard from place ``r``); a reader reads
its shards' samples in order and goes on to its next epoch. So every sample
is read exactly once per epoch, and nothing is indexed in memory beyond the
shard list.

Resume to the sample. Each sample carries its place ``(epoch, shard in the
reader's list, sample in the shard)``; the loop keeps, per reader, the place
after the last sample it consumed (``ShardPositions``) and saves it in its
checkpoint (``TrainState.rank_extras``, per rank). A resumed reader starts
exactly there, skipping the shard's earlier members by their tar headers
(no decoding), and the DataLoader's round-robin over workers starts at the
worker whose batch was next, so the resumed run sees the very batches the
run that never stopped would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from stepkit import check as _check
from stepkit.data.crops import sample_rng
from stepkit.data.shards import ShardError, shard_samples
from stepkit.seeds import numpy_rng

__all__ = ["epoch_shards", "ShardPositions", "resumable_stream", "ShardStream"]


def epoch_shards(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s shard order: a permutation of ``range(n)`` fixed by ``seed`` and ``epoch``.

    Examples:
        >>> sorted(epoch_shards(5, seed=0, epoch=3)) == list(range(5))
        True
    """
    return numpy_rng(seed, "shard order", epoch).permutation(n).tolist()


class ShardPositions:
    """Per reader (DataLoader worker) of this rank: the place after its last consumed sample, and how
    many unreadable samples it skipped.

    ``update(places, skipped, data_position)`` takes a consumed batch's
    ``places`` (``(B, 3)``: epoch, shard in the reader's list, sample in the
    shard), its ``skipped`` counts and the ``data_position`` it was consumed
    at. ``tensor`` (``(workers, 4)``) is what a checkpoint keeps
    (``TrainState.rank_extras["shard_positions"]``), updated in place.

    Examples:
        >>> import torch
        >>> positions = ShardPositions(workers=2)
        >>> positions.update(torch.tensor([[0, 0, 0], [0, 0, 1]]), torch.tensor([0, 2]), data_position=1)
        >>> positions.tensor.tolist(), positions.skipped  # worker 0: on to sample 2, 2 skipped
        ([[0, 0, 2, 2], [0, 0, 0, 0]], 2)
    """

    def __init__(self, workers: int, saved: Any = None) -> None:
        import torch

        self.workers = max(1, workers)
        self.tensor = torch.zeros(self.workers, 4, dtype=torch.int64)
        if saved is not None:
            if tuple(saved.shape) != (self.workers, 4):
                _check.fail(
                    "data.workers",
                    workers,
                    f"{saved.shape[0]}, the number this run was started with "
                    "(a resumed run on shards continues each worker's reading)",
                )
            self.tensor.copy_(saved)

    def update(self, places: Any, skipped: Any, data_position: int) -> None:
        row = self.tensor[(data_position - 1) % self.workers]
        row[:3] = places[-1]
        row[2] += 1
        row[3] += skipped.sum()

    @property
    def start(self) -> Any:
        """Where each reader starts: ``(workers, 3)``."""
        return self.tensor[:, :3]

    @property
    def skipped(self) -> int:
        return int(self.tensor[:, 3].sum())


def resumable_stream(shards: Sequence[Path], make_sample: Callable[[dict[str, bytes], Any, str], Any],
                     state: Any, *, seed: int, workers: int, skip_unreadable: bool = False,
                     flag: str = "data.shards") -> tuple[ShardStream, ShardPositions]:
    """This rank's ``ShardStream``, continuing where ``state`` left off, and the positions the loop keeps.

    The positions' tensor goes into ``state.rank_extras["shard_positions"]``
    (saved per rank with the checkpoint, updated in place by
    ``positions.update(places, skipped, state.data_position)`` after each
    consumed batch); a resumed state starts every worker at its saved place,
    the DataLoader's round-robin at the worker whose batch was next.

    Args:
        shards: The shard files.
        make_sample: ``(fields, rng, where) -> sample`` (e.g. ``ShardCrops``).
        state: The run's ``TrainState``, resumed or fresh.
        seed: The run's seed.
        workers: The DataLoader's workers (0: the main process).
        skip_unreadable: Skip and count unreadable samples instead of stopping.
        flag: The CLI flag named in errors.

    Returns:
        ``(stream, positions)``.

    Raises:
        ValueError: naming ``data.workers``, for another number of workers than the saved positions'.

    Examples:
        >>> import io, tarfile, tempfile, pathlib, torch
        >>> from stepkit import TrainState
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "0.tar"
        >>> with tarfile.open(path, "w") as tar:
        ...     for key in ("a", "b", "c"):
        ...         info = tarfile.TarInfo(f"{key}.txt"); info.size = 1
        ...         tar.addfile(info, io.BytesIO(b"x"))
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> last_letter = lambda fields, rng, where: where[-1]
        >>> stream, positions = resumable_stream([path], last_letter, state, seed=0, workers=0)
        >>> key, places, skipped = next(iter(stream))
        >>> state.data_position += 1
        >>> positions.update(places[None], torch.tensor([skipped]), state.data_position)
        >>> state.rank_extras["shard_positions"].tolist()  # what the checkpoint keeps: next is sample 1
        [[0, 0, 1, 0]]
        >>> again, _ = resumable_stream([path], last_letter, state, seed=0, workers=0)
        >>> next(iter(again))[0]  # a resumed stream reads on from there
        'b'
    """
    from stepkit import dist

    positions = ShardPositions(workers, state.rank_extras.get("shard_positions"))
    state.rank_extras["shard_positions"] = positions.tensor
    stream = ShardStream(shards, make_sample, seed=seed, rank=dist.rank(), world=dist.world_size(),
                         workers=workers, positions=positions.start if state.data_position else None,
                         first_worker=state.data_position % positions.workers,
                         skip_unreadable=skip_unreadable, flag=flag)
    return stream, positions


class ShardStream(IterableDataset):
    """An iterable dataset over shards: ``(make_sample(fields, rng, where), place, skipped)`` per sample.

    ``make_sample`` turns a sample's members into what a batch holds (crops,
    a caption...); ``rng`` is the sample's own generator (seeded by the run's
    seed, the epoch, the shard and the sample), ``where`` names it
    (``shard.tar:key``) for errors. With ``skip_unreadable`` a sample whose
    ``make_sample`` raises ``ValueError`` / ``OSError``, or the rest of a
    shard that is cut off, is skipped and counted in the next sample's
    ``skipped``.

    Args:
        shards: The shard files.
        make_sample: ``(fields, rng, where) -> sample``.
        seed: The run's seed.
        rank: This rank.
        world: The number of ranks.
        workers: The DataLoader's workers (0: read in the main process).
        positions: ``ShardPositions.start`` to resume from (None: the start).
        first_worker: The worker whose batch comes first (``data_position % workers`` when resuming).
        skip_unreadable: Skip and count instead of stopping.

    Examples:
        >>> import io, tarfile, tempfile, pathlib
        >>> from stepkit.data import expand_shards
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for s in range(2):
        ...     with tarfile.open(folder / f"{s}.tar", "w") as tar:
        ...         for key in ("a", "b"):
        ...             info = tarfile.TarInfo(f"{key}{s}.txt"); info.size = 1
        ...             tar.addfile(info, io.BytesIO(b"x"))
        >>> stream = ShardStream(expand_shards(str(folder / "{0,1}.tar")), lambda f, rng, where: where[-2:],
        ...                      seed=0)
        >>> [(key, place.tolist()) for (key, place, _), _ in zip(stream, range(5))]  # ..., then epoch 1
        [('a1', [0, 0, 0]), ('b1', [0, 0, 1]), ('a0', [0, 1, 0]), ('b0', [0, 1, 1]), ('a0', [1, 0, 0])]
    """

    def __init__(
        self,
        shards: Sequence[Path],
        make_sample: Callable[[dict[str, bytes], Any, str], Any],
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        positions: Any = None,
        first_worker: int = 0,
        skip_unreadable: bool = False,
        flag: str = "data.shards",
    ) -> None:
        self.readers = max(1, workers)
        if len(shards) < world * self.readers:
            _check.fail(
                "data.workers",
                workers,
                f"at most {max(1, len(shards) // world)} with {len(shards)} shards over {world} ranks "
                f"(every worker reads its own shards; or write the data into more shards)",
            )
        self.shards, self.make_sample, self.seed = list(shards), make_sample, seed
        self.rank, self.world, self.first_worker = rank, world, first_worker
        self.positions = None if positions is None else positions.tolist()
        self.skip, self.flag = skip_unreadable, flag

    def __iter__(self) -> Iterator[tuple[Any, Any, int]]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = 0 if info is None else info.id
        reader = (worker + self.first_worker) % self.readers
        slot, slots = self.rank * self.readers + reader, self.world * self.readers
        epoch, first, start = self.positions[reader] if self.positions else (0, 0, 0)
        skipped = 0
        while True:
            mine = epoch_shards(len(self.shards), self.seed, epoch)[slot::slots]
            whole_epoch, read = (first, start) == (0, 0), 0
            for place in range(first, len(mine)):
                shard = mine[place]
                samples = shard_samples(
                    self.shards[shard], start=start if place == first else 0, flag=self.flag
                )
                while True:
                    try:
                        number, key, fields = next(samples)
                    except StopIteration:
                        break
                    except ShardError:
                        if not self.skip:
                            raise
                        skipped += 1
                        break
                    where = f"{self.shards[shard]}:{key}"
                    try:
                        sample = self.make_sample(
                            fields, sample_rng(self.seed, epoch, shard, number), where
                        )
                    except (ValueError, OSError):
                        if not self.skip:
                            raise
                        skipped += 1
                        continue
                    yield sample, torch.tensor([epoch, place, number]), skipped
                    skipped, read = 0, read + 1
            if whole_epoch and read == 0:  # empty or all unreadable: the stream would spin forever
                names = ", ".join(str(self.shards[i]) for i in mine[:3])
                raise ValueError(f"{self.flag}: no readable sample in a whole epoch of the shards {names}"
                                 f"{', ...' if len(mine) > 3 else ''} (this reader's share)")
            epoch, first, start = epoch + 1, 0, 0

"""Loaders for a user's own arrays (stimulus / fMRI, labelled series, sentences) and the loop's samplers.

The bundled data sets (the recipes' defaults, shipped inside installed packages) are in
``stepkit.bundled``; image files in ``stepkit.images``, tar shards in ``stepkit.shards``.

Stimulus / fMRI data (the autoencoder recipe): a dict of 2-D float32 arrays,
time first, ``video``, ``audio``, ``text`` (features per time point) and
``fmri`` (voxels per time point), all of the same length.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stepkit import check as _check
from stepkit.loader import seeded_loader

__all__ = ["MODALITIES", "FMRI_ARRAYS", "load_fmri_npz", "SERIES_ARRAYS", "load_series_npz", "series_windows",
           "windowed_series", "tokenized_sentences", "time_blocks",
           "ResumableSampler", "seeded_loader", "train_batches", "Prefetch"]

MODALITIES = ("video", "audio", "text")
FMRI_ARRAYS = (*MODALITIES, "fmri")


def load_fmri_npz(path: str | os.PathLike, *, min_time_points: int = 50) -> dict[str, np.ndarray]:
    """Load and check a user's ``.npz`` with ``video``, ``audio``, ``text`` and ``fmri``, time first.

    Raises ``ValueError`` naming the file and the array for a missing file or
    array, an array that is not 2-D (time, features), lengths that differ,
    too few time points, or NaN / infinite values.

    Args:
        path: The ``.npz`` file.
        min_time_points: The fewest time points allowed.

    Returns:
        ``{"video", "audio", "text", "fmri"}`` as float32 ``(time, features)`` arrays.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.npz"
        >>> np.savez(path, video=np.zeros((60, 4)), audio=np.zeros((60, 2)), text=np.zeros((60, 3)),
        ...          fmri=np.zeros((60, 10)))
        >>> load_fmri_npz(path)["fmri"].shape
        (60, 10)
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data.path={str(path)!r} is not allowed: a folder, expected an .npz file")
    arrays = _read_named_arrays(path, FMRI_ARRAYS)
    for name, array in arrays.items():
        if array.ndim != 2:
            raise ValueError(f"{path}: array {name!r} has shape {array.shape}; expected 2-D (time, features)")
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{path}: array {name!r} has dtype {array.dtype}; expected numbers")
        bad = ~np.isfinite(array)
        if bad.any():
            t, f = np.argwhere(bad)[0]
            raise ValueError(f"{path}: array {name!r} has {int(bad.sum())} NaN or infinite values "
                             f"(first at time {t}, column {f})")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: arrays differ in length (time points): {lengths}")
    if lengths["fmri"] < min_time_points:
        raise ValueError(f"{path}: {lengths['fmri']} time points; expected at least {min_time_points}")
    return {name: a.astype(np.float32) for name, a in arrays.items()}


SERIES_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_series_npz(path: str | os.PathLike, *, min_length: int = 2) -> dict[str, np.ndarray]:
    """Load and check a user's labelled time series: ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    ``x_*`` is ``(N, T)`` (univariate) or ``(N, C, T)``; ``y_*`` holds one
    integer label per series. ``path`` is an ``.npz`` with those arrays or a
    folder with ``x_train.npy``, ... (read without pickle).

    Args:
        path: The ``.npz`` file or the folder of ``.npy`` files.
        min_length: The shortest series allowed (the recipe's window).

    Returns:
        ``{"train_series": (N, C, T) float32, "train_labels": (N,) int64, "test_series", "test_labels"}``.

    Raises:
        ValueError: naming the file and the array, for a missing file or array, shapes that are not
            ``(N, T)`` / ``(N, C, T)`` / ``(N,)``, counts or channels that differ between arrays,
            series shorter than ``min_length``, non-integer labels, or NaN / infinite values.

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> np.savez(folder / "mine.npz", x_train=np.zeros((4, 3, 20)), y_train=np.arange(4),
        ...          x_test=np.zeros((2, 3, 20)), y_test=np.arange(2))
        >>> data = load_series_npz(folder / "mine.npz")
        >>> data["train_series"].shape, data["test_labels"].tolist()
        ((4, 3, 20), [0, 1])
    """
    path = Path(path)
    arrays = _read_named_arrays(path, SERIES_ARRAYS)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3):
            raise ValueError(f"{path}: array 'x_{split}' has shape {x.shape}; expected (series, time) or "
                             f"(series, channels, time)")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{path}: array 'x_{split}' has dtype {x.dtype}; expected numbers")
        bad = ~np.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{path}: array 'x_{split}' has {int(bad.sum())} NaN or infinite values "
                             f"(first at index {first}); fill or drop them first")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path}: array 'y_{split}' has shape {y.shape}; expected ({len(x)},): one "
                             f"label per series of 'x_{split}'")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: array 'y_{split}' has dtype {y.dtype}; expected integer class labels")
        if x.shape[-1] < min_length:
            raise ValueError(f"{path}: array 'x_{split}' holds series of {x.shape[-1]} time points; expected "
                             f"at least {min_length} (data.window)")
        if len(x) == 0:
            raise ValueError(f"{path}: array 'x_{split}' holds no series")
    # (N, T) -> (N, 1, T); (N, C, T) stays
    train, test = (x.reshape(len(x), -1, x.shape[-1]) for x in (arrays["x_train"], arrays["x_test"]))
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"{path}: 'x_train' has {train.shape[1]} channels and 'x_test' {test.shape[1]}; "
                         f"they must match")
    return {"train_series": train.astype(np.float32), "train_labels": arrays["y_train"].astype(np.int64),
            "test_series": test.astype(np.float32), "test_labels": arrays["y_test"].astype(np.int64)}


def _read_named_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if path.is_dir():
        missing = [n for n in names if not (path / f"{n}.npy").is_file()]
        if missing:
            raise ValueError(f"{path}: missing {[f'{n}.npy' for n in missing]}; expected {list(names)}")
        arrays = {}
        for n in names:
            try:
                arrays[n] = np.load(path / f"{n}.npy", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"{path / f'{n}.npy'}: not a readable .npy file ({type(err).__name__}: "
                                 f"{err})") from None
        return arrays
    if not path.is_file():
        raise ValueError(f"data.path={str(path)!r} is not allowed: no such file or folder (expected an .npz "
                         f"or a folder of .npy files)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array (.npy), not an .npz archive of named arrays; "
                         f"expected arrays {list(names)}")
    with archive:
        missing = [n for n in names if n not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected {list(names)}, "
                             f"found {sorted(archive.files)}")
        try:
            return {n: archive[n] for n in names}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: an array in it cannot be read ({type(err).__name__}: {err})") from None


def series_windows(series: Any, window: int, stride: int) -> Any:
    """``(C, T)`` -> ``(n, C, window)``: windows every ``stride`` steps, the last one ending at ``T``.

    Args:
        series: A ``(C, T)`` tensor.
        window: Steps per window (at most ``T``).
        stride: Steps between two windows' starts.

    Returns:
        A ``(n, C, window)`` tensor.

    Examples:
        >>> import torch
        >>> series_windows(torch.arange(5.0)[None], window=2, stride=2)[:, 0].tolist()
        [[0.0, 1.0], [2.0, 3.0], [3.0, 4.0]]
    """
    import torch

    starts = list(range(0, series.shape[-1] - window + 1, stride))
    if starts[-1] != series.shape[-1] - window:
        starts.append(series.shape[-1] - window)
    return torch.stack([series[:, s:s + window] for s in starts])


def windowed_series(raw: dict[str, Any], *, window: int, stride: int, source: str) -> dict[str, Any]:
    """A labelled series set as a JEPA recipe trains and probes it: training windows, whole series.

    Channels are standardised with the training series' statistics
    (missing values, NaN in the UCR / UEA archive, become 0 afterwards).

    Args:
        raw: ``{"train_series", "train_labels", "test_series", "test_labels"}`` (``load_series_npz``,
            ``stepkit.bundled.ucr_uea``): lists of ``(C, T)`` arrays and their integer labels.
        window: Steps per training window.
        stride: Steps between two windows.
        source: The set's name or file, named in errors.

    Returns:
        ``{"train_set": TensorDataset(windows, window labels), "in_chans", "length": window,
        "train": (series, labels), "test": (series, labels)}``.

    Raises:
        ValueError: naming ``data.window`` and ``source`` when ``window`` is longer than the shortest series.

    Examples:
        >>> import numpy as np
        >>> raw = {"train_series": [np.arange(8.0)[None]] * 2, "train_labels": [0, 1],
        ...        "test_series": [np.arange(6.0)[None]], "test_labels": [1]}
        >>> out = windowed_series(raw, window=4, stride=2, source="toy")
        >>> len(out["train_set"]), out["in_chans"]  # 3 windows of each 8-step series
        (6, 1)
        >>> windowed_series(raw, window=7, stride=2, source="toy")
        Traceback (most recent call last):
        ValueError: data.window=7 is not allowed: expected at most the shortest series' length, 6 (toy)
    """
    import torch
    from torch.utils.data import TensorDataset

    train = [torch.as_tensor(x, dtype=torch.float32) for x in raw["train_series"]]
    test = [torch.as_tensor(x, dtype=torch.float32) for x in raw["test_series"]]
    shortest = min(x.shape[-1] for x in train + test)
    if window > shortest:
        _check.fail("data.window", window, f"at most the shortest series' length, {shortest} ({source})")
    values = torch.cat(train, dim=1)
    mean = values.nanmean(dim=1, keepdim=True)
    std = (values - mean).square().nanmean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
    train, test = ([torch.nan_to_num((x - mean) / std) for x in xs] for xs in (train, test))
    cut = [series_windows(x, window, stride) for x in train]
    labels = torch.as_tensor(raw["train_labels"])
    window_labels = torch.cat([torch.full((len(w),), int(y)) for w, y in zip(cut, labels)])
    return {"train_set": TensorDataset(torch.cat(cut), window_labels), "in_chans": train[0].shape[0],
            "length": window, "train": (train, labels), "test": (test, torch.as_tensor(raw["test_labels"]))}


def tokenized_sentences(sentences: dict[str, Any], *, tokenizer: str, max_len: int,
                        unlabelled: bool) -> dict[str, Any]:
    """Topic-labelled sentences as token ids ``(N, max_len)`` (0 = padding), and what masking needs.

    Args:
        sentences: ``{"train_texts", "train_labels", "test_texts", "test_labels", "unlabelled_texts"}``
            (``stepkit.bundled.chat_topics``).
        tokenizer: ``"word"`` (a vocabulary of the pretraining sentences' words) or ``"minilm"``
            (MiniLM's WordPiece; the ``text`` extra).
        max_len: Tokens per sentence (longer ones are cut).
        unlabelled: Pretrain on ``unlabelled_texts`` (every sentence but the held-out ones), else on
            the labelled training sentences.

    Returns:
        ``{"train_set": TensorDataset(pretraining ids, zeros), "vocab_size", "mask_id", "special",
        "length": max_len, "train": (ids, labels), "test": (ids, labels)}``.

    Examples:
        >>> texts = {"train_texts": ["a cat", "a dog"], "train_labels": [0, 1], "test_texts": ["a cow"],
        ...          "test_labels": [1], "unlabelled_texts": ["a cat", "a dog", "the end"]}
        >>> out = tokenized_sentences(texts, tokenizer="word", max_len=3, unlabelled=True)
        >>> out["train"][0].shape, len(out["train_set"]), out["mask_id"] == out["vocab_size"] - 1
        (torch.Size([2, 3]), 3, True)
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from stepkit.models.text import WordTokenizer, pretrained_tokenizer, pretrained_vocab

    _check.one_of("data.tokenizer", tokenizer, ("word", "minilm"))
    pretrain = sentences["unlabelled_texts"] if unlabelled else sentences["train_texts"]
    if tokenizer == "word":
        tokenize = WordTokenizer(pretrain)  # the pretraining sentences' words; others are unknown (1)
        vocab_size, mask_id, special = len(tokenize) + 1, len(tokenize), [0]
    else:
        tokenize = pretrained_tokenizer(max_len=max_len)
        vocab_size, mask_id, special = pretrained_vocab()

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenize(texts)["input_ids"][:, :max_len]
        return F.pad(ids, (0, max_len - ids.shape[1]))  # padding id 0 in both vocabularies

    train, test = encode(sentences["train_texts"]), encode(sentences["test_texts"])
    labels = torch.as_tensor(sentences["train_labels"])
    pretraining = encode(pretrain)
    no_labels = torch.zeros(len(pretraining), dtype=torch.long)
    return {"train_set": TensorDataset(pretraining, no_labels), "vocab_size": vocab_size, "mask_id": mask_id,
            "special": torch.tensor(special), "length": max_len, "train": (train, labels),
            "test": (test, torch.as_tensor(sentences["test_labels"]))}


def time_blocks(
    time_points: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), window: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test time indices as three consecutive blocks, in that order.

    A sample at time t reads the features of ``t - window + 1 .. t``, so each
    block drops its first ``window - 1`` points: no sample of one block sees
    a time point of another, and no split leaks into the next.

    Args:
        time_points: The series' length.
        fractions: The train / validation / test shares, positive, summing to 1.
        window: Time points each sample reads.

    Returns:
        ``(train, validation, test)`` index arrays.

    Raises:
        ValueError: for fractions that do not sum to 1, or a block left with fewer than 2 samples.

    Examples:
        >>> [b.tolist() for b in time_blocks(20, (0.6, 0.2, 0.2), window=2)]  # each drops its first point
        [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [13, 14, 15], [17, 18, 19]]
    """
    _check.integer_at_least("window", window, 1)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        _check.fail("fractions", fractions, "three positive numbers that sum to 1")
    edges = np.round(np.cumsum((0.0, *fractions)) * time_points).astype(int)
    blocks = tuple(np.arange(a + window - 1, b) for a, b in zip(edges[:-1], edges[1:], strict=True))
    for name, block in zip(("train", "validation", "test"), blocks, strict=True):
        if len(block) < 2:
            raise ValueError(f"the {name} block holds {len(block)} samples: too few time points "
                             f"({time_points}) for fractions {fractions} and window {window}")
    return blocks[0], blocks[1], blocks[2]


class ResumableSampler:
    """Indices of an epoch-seeded permutation, this rank's share, starting ``start`` samples in.

    Epoch ``e`` draws ``randperm(n)`` from a generator seeded with ``seed``
    and ``e``, so every rank and every resumed run sees the same order; rank
    ``r`` of ``world`` takes every ``world``-th index (the epoch is cut to a
    multiple of ``world``). Infinite: it runs over epoch after epoch. With
    ``with_epoch`` it yields ``(index, epoch)``, for datasets that draw a
    sample's augmentation from its own seed (``stepkit.images.TrainImages``).

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

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        return order[self.rank :: self.world].tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order = self.epoch_order(epoch)[offset:]
            yield from ((i, epoch) for i in order) if self.with_epoch else order
            epoch, offset = epoch + 1, 0


def train_batches(source: Any, state: Any, *, batch_size: int, seed: int, workers: int = 0,
                  shards: Any = None, skip_unreadable: bool = False, with_epoch: bool = False,
                  timeout: float = 0, **loader_kwargs: Any) -> tuple[Any, Any]:
    """A run's training batches, starting where ``state`` left off: a ``seeded_loader`` over an
    epoch-seeded ``ResumableSampler`` of ``source``, or over this rank's shard stream.

    Without shards, rank ``r`` of ``world`` takes its share of each epoch's permutation from sample
    ``state.data_position x batch_size`` on (incomplete batches dropped). With ``shards``, ``source``
    makes each sample (``(fields, rng, where) -> sample``, e.g. ``stepkit.shards.ShardCrops``) and every
    worker reads on from its place in the checkpoint (``stepkit.shards.resumable_stream``); the loop
    calls ``positions.update(places, skipped, state.data_position)`` after each consumed batch, which
    comes as ``(samples, places, skipped)``.

    Args:
        source: A map-style dataset, or with ``shards`` the sample maker.
        state: The run's ``TrainState``, fresh or resumed.
        batch_size: Samples per batch on this rank.
        seed: The run's seed (order, worker seeds, each sample's crops).
        workers: DataLoader workers.
        shards: The shard files (None: ``source`` is the dataset).
        skip_unreadable: Shards: count and skip unreadable samples instead of stopping.
        with_epoch: The sampler yields ``(index, epoch)`` (``stepkit.images.TrainImages``).
        timeout: Seconds to wait for a batch before ``stepkit.faults.DataStalled`` (0: forever).
        **loader_kwargs: Any other ``DataLoader`` argument (``pin_memory``, ...).

    Returns:
        ``(loader, positions)``: positions is a ``stepkit.shards.ShardPositions``, or None without shards.

    Examples:
        >>> import torch
        >>> from stepkit import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> from itertools import islice
        >>> data = torch.utils.data.TensorDataset(torch.arange(6))
        >>> loader, _ = train_batches(data, state, batch_size=2, seed=0)  # endless: epoch after epoch
        >>> first = [b.tolist() for b, in islice(loader, 3)]
        >>> state.data_position = 1  # one batch consumed: a resumed run starts at the second
        >>> again, _ = train_batches(data, state, batch_size=2, seed=0)
        >>> [b.tolist() for b, in islice(again, 2)] == first[1:]
        True
    """
    from stepkit import dist

    if shards is not None:
        from stepkit.shards import resumable_stream

        stream, positions = resumable_stream(shards, source, state, seed=seed, workers=workers,
                                             skip_unreadable=skip_unreadable)
        loader = seeded_loader(stream, seed=seed, workers=workers, batch_size=batch_size, timeout=timeout,
                               **loader_kwargs)
        return loader, positions
    sampler = ResumableSampler(len(source), seed=seed, start=state.data_position * batch_size,
                               rank=dist.rank(), world=dist.world_size(), with_epoch=with_epoch)
    return seeded_loader(source, seed=seed, workers=workers, batch_size=batch_size, sampler=sampler,
                         drop_last=True, timeout=timeout, **loader_kwargs), None


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

"""Loaders for a user's own data (image folders, stimulus / fMRI ``.npz`` arrays) and the loop's samplers.

The bundled data sets (the recipes' defaults, shipped inside installed packages) are in
``stepkit.bundled``.

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

import numpy as np

from stepkit import check as _check

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

    Example:
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

    Example:
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

    Example:
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolder:
    """``root/<class>/<image>``: images decoded with Pillow, as ``(uint8 (3, size, size), label)``.

    Classes are the sub-folder names in sorted order. Each image is converted
    to RGB, its shorter side resized to ``size`` (bilinear), then centre-
    cropped square; augmentation happens later, batched on the device.
    Decoding runs in DataLoader workers. A missing folder, a folder without
    class sub-folders or without images, is refused with a clear error that
    names ``flag`` (the CLI flag the path came from).

    Unreadable files (not an image, truncated, ...): with ``skip_unreadable``
    every file is opened and verified here, the unreadable ones left out and
    counted in ``self.skipped``; without it, the files are checked the same
    way when there are at most ``check_up_to`` of them (cheap), so an
    unreadable one stops the run before training with an error naming it;
    in a larger folder one that fails to decode later raises
    ``UnreadableImage`` naming the file.

    Args:
        root: The folder of class sub-folders.
        size: The side of the square images returned.
        flag: The CLI flag named in errors.
        skip_unreadable: Leave unreadable files out (listed in ``skipped``) instead of stopping.
        check_up_to: Verify every file up front when there are at most this many.

    Raises:
        ValueError: naming ``flag``, for a missing folder, no class folders or no images.
        UnreadableImage: naming the file, for one Pillow cannot read (unless skipped).

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("cat", "dog"):
        ...     (root / name).mkdir()
        ...     Image.new("RGB", (40, 30), "white").save(root / name / "1.png")
        >>> images = ImageFolder(root, size=16)
        >>> image, label = images[1]
        >>> images.classes, image.shape, image.dtype, label
        (['cat', 'dog'], torch.Size([3, 16, 16]), torch.uint8, 1)
        >>> _ = (root / "dog" / "2.png").write_text("not an image")
        >>> ImageFolder(root, size=16, skip_unreadable=True).skipped == [root / "dog" / "2.png"]
        True
    """

    def __init__(self, root: str | os.PathLike, size: int, *, flag: str = "data.root",
                 skip_unreadable: bool = False, check_up_to: int = 10_000) -> None:
        root = Path(root)
        _check.integer_at_least("data.image_size", size, 1)
        if not root.is_dir():
            raise ValueError(f"{flag}={str(root)!r} is not allowed: no such folder")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(
                f"{flag}={str(root)!r} is not allowed: expected one sub-folder per class, found none"
            )
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise ValueError(
                f"{flag}={str(root)!r} is not allowed: no images ({kinds}) in its class folders"
            )
        self.size = size
        self.skipped: list[Path] = []
        if skip_unreadable or len(self.samples) <= check_up_to:
            readable = []
            for path, label in self.samples:
                problem = unreadable_image(path)
                if problem is None:
                    readable.append((path, label))
                elif skip_unreadable:
                    self.skipped.append(path)
                else:
                    raise UnreadableImage(f"{path}: {problem}; expected an image file "
                                          "(pass --data.skip-unreadable to skip such files)")
            self.samples = readable
            if not self.samples:
                raise ValueError(f"{flag}={str(root)!r} is not allowed: none of its images can be read")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
                w, h = image.size
                scale = self.size / min(w, h)
                image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                     Image.Resampling.BILINEAR)
                w, h = image.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                image = image.crop((left, top, left + self.size, top + self.size))
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise UnreadableImage(f"{path}: not a readable image ({type(err).__name__}: {err}); "
                                  "pass --data.skip-unreadable to skip such files") from None
        return pixels.view(self.size, self.size, 3).permute(2, 0, 1).contiguous(), label


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; the message names it (a ``ValueError``).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "cat").mkdir()
        >>> _ = (root / "cat" / "1.png").write_text("not an image")
        >>> try:
        ...     ImageFolder(root, size=16)
        ... except UnreadableImage as err:
        ...     print(str(err).replace(str(root), "ROOT").split(":")[0])
        ROOT/cat/1.png
    """


def unreadable_image(path: str | os.PathLike) -> str | None:
    """Why Pillow cannot read ``path`` as an image (opened and verified), or None if it can.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.png"
        >>> _ = path.write_bytes(b"not an image")
        >>> unreadable_image(path) is not None
        True
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for broken files
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


def image_folders(root: str | os.PathLike, val_root: str | os.PathLike | None, size: int, *,
                  skip_unreadable: bool = False) -> tuple[ImageFolder, ImageFolder]:
    """The training folder ``root`` and its held-out folder: ``val_root``, or ``val/`` beside ``root``.

    Errors name the recipes' flags (``--data.root``, ``--data.val-root``),
    including the held-out folder the user did not type.

    Args:
        root: The training images, one sub-folder per class.
        val_root: The held-out images; None: ``val`` beside ``root``.
        size: The side of the square images.
        skip_unreadable: Leave unreadable files out instead of stopping.

    Returns:
        ``(train, held_out)``, two ``ImageFolder``.

    Raises:
        ValueError: naming the flag, for a missing or empty folder.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> data = pathlib.Path(tempfile.mkdtemp())
        >>> for split in ("train", "val"):
        ...     (data / split / "cat").mkdir(parents=True)
        ...     Image.new("RGB", (8, 8)).save(data / split / "cat" / "1.png")
        >>> train, held_out = image_folders(data / "train", None, size=8)
        >>> len(train), len(held_out)
        (1, 1)
    """
    root = Path(root)
    train = ImageFolder(root, size, flag="data.root", skip_unreadable=skip_unreadable)
    if val_root is None:
        val_root = root.parent / "val"
        if not val_root.is_dir():
            raise ValueError(f"data.val_root=None is not allowed here: the held-out images default to "
                             f"{str(val_root)!r} (a 'val' folder beside --data.root), which does not exist; "
                             "pass --data.val-root DIR")
        flag = "data.val_root (default: 'val' beside --data.root)"
    else:
        flag = "data.val_root"
    return train, ImageFolder(val_root, size, flag=flag, skip_unreadable=skip_unreadable)


class ResumableSampler:
    """Indices of an epoch-seeded permutation, this rank's share, starting ``start`` samples in.

    Epoch ``e`` draws ``randperm(n)`` from a generator seeded with ``seed``
    and ``e``, so every rank and every resumed run sees the same order; rank
    ``r`` of ``world`` takes every ``world``-th index (the epoch is cut to a
    multiple of ``world``). Infinite: it runs over epoch after epoch.

    Example:
        >>> from itertools import islice
        >>> whole = list(islice(ResumableSampler(6, seed=1), 6))  # it never ends: epoch after epoch
        >>> list(islice(ResumableSampler(6, seed=1, start=4), 2)) == whole[4:6]  # a resumed run continues
        True
    """

    def __init__(self, n: int, *, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1) -> None:
        _check.integer_at_least("n", n, 1)
        _check.integer_at_least("start", start, 0)
        if not 0 <= rank < world:
            _check.fail("rank", rank, f"an integer in [0, {world - 1}]")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world
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
            yield from self.epoch_order(epoch)[offset:]
            epoch, offset = epoch + 1, 0


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

    Example:
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

"""Data the recipes train on: embedded defaults that work offline, and loaders for users' own.

Stimulus / fMRI data (the autoencoder recipe): a dict of 2-D float32 arrays,
time first, ``video``, ``audio``, ``text`` (features per time point) and
``fmri`` (voxels per time point), all of the same length.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stepkit import check as _check

MODALITIES = ("video", "audio", "text")
FMRI_ARRAYS = (*MODALITIES, "fmri")

# A canonical haemodynamic response sampled once per TR: it peaks 2-3 TRs after the stimulus.
HRF = np.array([0.0, 0.3, 1.0, 0.8, 0.4, 0.1]) / 2.6


def synthetic_fmri(
    *,
    seed: int = 0,
    time_points: int = 3000,
    voxels: int = 100,
    latent_dim: int = 8,
    dims: tuple[int, int, int] = (64, 32, 48),
    stimulus_noise: float = 0.5,
    fmri_noise: float = 0.5,
) -> dict[str, np.ndarray]:
    """Stimulus features and voxel responses driven by one shared latent time series (seeded).

    The structure is known: a smooth latent ``z_t`` (AR(1), coefficient
    0.95) drives each modality through its own random one-hidden-layer tanh
    map plus Gaussian noise (features standardised, then ``stimulus_noise``
    added). Each voxel's neural signal is the product of two random tanh maps
    of ``z_t`` (an interaction a linear model of the features cannot
    express), convolved in time with ``HRF``, standardised, plus
    ``fmri_noise``. ``fmri_clean`` (no noise) is included, so the noise
    ceiling can be reported.
    """
    _check.integer_at_least("time_points", time_points, 100)
    _check.integer_at_least("voxels", voxels, 1)
    _check.integer_at_least("latent_dim", latent_dim, 1)
    rng = np.random.default_rng(seed)
    z = np.zeros((time_points, latent_dim))
    shocks = rng.standard_normal((time_points, latent_dim))
    for t in range(1, time_points):
        z[t] = 0.95 * z[t - 1] + np.sqrt(1 - 0.95**2) * shocks[t]

    def random_map(n_out: int, hidden: int):
        w1 = rng.standard_normal((latent_dim, hidden)) * 1.5 / np.sqrt(latent_dim)
        b1 = rng.standard_normal(hidden) * 0.5
        w2 = rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)
        return np.tanh(z @ w1 + b1) @ w2

    out: dict[str, np.ndarray] = {}
    for name, dim in zip(MODALITIES, dims, strict=True):
        features = _standardise(random_map(dim, 32))
        out[name] = (features + stimulus_noise * rng.standard_normal(features.shape)).astype(np.float32)
    neural = random_map(voxels, 16) * random_map(voxels, 16)
    bold = np.stack([np.convolve(neural[:, v], HRF)[:time_points] for v in range(voxels)], axis=1)
    bold = _standardise(bold)
    out["fmri"] = (bold + fmri_noise * rng.standard_normal(bold.shape)).astype(np.float32)
    out["fmri_clean"] = bold.astype(np.float32)
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)


def load_fmri_npz(path: str | os.PathLike, *, min_time_points: int = 50) -> dict[str, np.ndarray]:
    """Load and check a user's ``.npz`` with ``video``, ``audio``, ``text`` and ``fmri``, time first.

    Raises ``ValueError`` naming the file and the array for a missing file or
    array, an array that is not 2-D (time, features), lengths that differ,
    too few time points, or NaN / infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.path={str(path)!r} is not allowed: no such file (expected an .npz)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array (.npy), not an .npz archive of named arrays; "
                         f"expected arrays {list(FMRI_ARRAYS)}")
    with archive:
        missing = [name for name in FMRI_ARRAYS if name not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected {list(FMRI_ARRAYS)}, "
                             f"found {sorted(archive.files)}")
        try:
            arrays = {name: archive[name] for name in FMRI_ARRAYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: an array in it cannot be read ({type(err).__name__}: {err})") from None
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


def time_blocks(
    time_points: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), window: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test time indices as three consecutive blocks, in that order.

    A sample at time t reads the features of ``t - window + 1 .. t``, so each
    block drops its first ``window - 1`` points: no sample of one block sees
    a time point of another, and no split leaks into the next.
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
    return blocks


def digits_canvas(
    *,
    seed: int = 0,
    size: int = 32,
    rotation: float = 35.0,
    scale: tuple[float, float] = (0.6, 1.0),
    shift: float = 0.3,
    noise: float = 0.1,
    train_fraction: float = 0.8,
) -> dict:
    """scikit-learn's 1,797 handwritten digits (8x8, ships with the package), made harder.

    Each digit is drawn over a ``size x size`` canvas through its own random
    affine map (rotation within ``± rotation`` degrees, scale in ``scale``,
    shift within ``± shift`` of the canvas), then Gaussian pixel noise of std
    ``noise`` is added and values clipped to [0, 1]. A seeded permutation
    splits train / held-out. Returns ``train_images``, ``train_labels``,
    ``test_images``, ``test_labels`` (images ``(N, 1, size, size)`` float32).
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    _check.integer_at_least("size", size, 8)
    _check.in_range("train_fraction", train_fraction, 0.0, 1.0)
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    digits = torch.tensor(x / 16.0, dtype=torch.float32).view(n, 1, 8, 8)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(rotation)
    zoom = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g)
    offset = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2  # in [-1, 1] canvas units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    rows = [torch.stack([cos, -sin, -offset[:, 0]], 1), torch.stack([sin, cos, -offset[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    images = F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images = (images + noise * torch.randn(images.shape, generator=g)).clamp(0, 1)
    order = torch.randperm(n, generator=g)
    cut = int(round(train_fraction * n))
    labels = torch.tensor(y)
    return {
        "train_images": images[order[:cut]],
        "train_labels": labels[order[:cut]],
        "test_images": images[order[cut:]],
        "test_labels": labels[order[cut:]],
    }


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE_WORDS = {"small": 0.3, "medium": 0.45, "large": 0.6}  # half-width of the digit, in canvas half-widths
PLACE_WORDS = {  # (column, row) of a 3 x 3 layout: -1 left/top, 0 middle, 1 right/bottom
    "in the upper left": (-1, -1), "at the top": (0, -1), "in the upper right": (1, -1),
    "on the left": (-1, 0), "in the middle": (0, 0), "on the right": (1, 0),
    "in the lower left": (-1, 1), "at the bottom": (0, 1), "in the lower right": (1, 1),
}


def digits_captioned(
    *, seed: int = 0, size: int = 32, jitter: float = 0.1, noise: float = 0.05, train_fraction: float = 0.8
) -> dict:
    """scikit-learn's handwritten digits placed in a canvas, each paired with a caption that says
    the digit, where it is and how big: "a small seven in the upper left".

    Each digit gets a seeded size (small / medium / large) and place (a cell
    of a 3 x 3 layout, moved by up to ``jitter`` canvas half-widths), so a
    caption names one of 270 combinations and retrieval needs more than the
    digit's class. Returns ``train_images``/``test_images`` ``(N, 1, size,
    size)`` float32, ``train_captions``/``test_captions`` (lists of str),
    ``train_caption_ids``/``test_caption_ids`` (int64; equal ids = equal
    captions, across both splits) and ``train_labels``/``test_labels``.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    _check.integer_at_least("size", size, 8)
    _check.in_range("jitter", jitter, 0.0, 0.5)
    _check.in_range("train_fraction", train_fraction, 0.0, 1.0)
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    digits = torch.tensor(x / 16.0, dtype=torch.float32).view(n, 1, 8, 8)
    size_idx = torch.randint(len(SIZE_WORDS), (n,), generator=g)
    place_idx = torch.randint(len(PLACE_WORDS), (n,), generator=g)
    half = torch.tensor(list(SIZE_WORDS.values()))[size_idx]
    cell = torch.tensor(list(PLACE_WORDS.values()), dtype=torch.float32)[place_idx]
    centre = cell * (1 - half[:, None]) + (torch.rand(n, 2, generator=g) * 2 - 1) * jitter
    zeros = torch.zeros(n)
    theta = torch.stack([torch.stack([1 / half, zeros, -centre[:, 0] / half], 1),
                         torch.stack([zeros, 1 / half, -centre[:, 1] / half], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    images = F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images = (images + noise * torch.randn(images.shape, generator=g)).clamp(0, 1)
    sizes, places = list(SIZE_WORDS), list(PLACE_WORDS)
    captions = [f"a {sizes[s]} {DIGIT_WORDS[d]} {places[p]}"
                for s, d, p in zip(size_idx.tolist(), y.tolist(), place_idx.tolist())]
    ids = (torch.tensor(y) * len(sizes) + size_idx) * len(places) + place_idx
    order = torch.randperm(n, generator=g)
    cut = int(round(train_fraction * n))
    out = {}
    for split, rows in (("train", order[:cut]), ("test", order[cut:])):
        out[f"{split}_images"] = images[rows]
        out[f"{split}_captions"] = [captions[i] for i in rows.tolist()]
        out[f"{split}_caption_ids"] = ids[rows]
        out[f"{split}_labels"] = torch.tensor(y)[rows]
    return out


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
            with Image.open(path) as image:
                image = image.convert("RGB")
                w, h = image.size
                scale = self.size / min(w, h)
                image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                     Image.BILINEAR)
                w, h = image.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                image = image.crop((left, top, left + self.size, top + self.size))
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise UnreadableImage(f"{path}: not a readable image ({type(err).__name__}: {err}); "
                                  "pass --data.skip-unreadable to skip such files") from None
        return pixels.view(self.size, self.size, 3).permute(2, 0, 1).contiguous(), label


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; the message names it."""


def unreadable_image(path: str | os.PathLike) -> str | None:
    """Why Pillow cannot read ``path`` as an image (opened and verified), or None if it can."""
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

"""The embedded data sets: real or generated data that ship with the package and work offline.

- ``synthetic_fmri``: stimulus features and fMRI voxels with a known structure (the autoencoder's);
- ``digits_canvas``: scikit-learn's handwritten digits placed on a larger canvas (DINO's and JEPA's);
- ``digits_captioned``: the digits with a caption each (the contrastive recipe's).

Loaders for a user's own data (image folders, ``.npz`` stimulus / fMRI arrays) are in ``stepkit.data``.
"""

from __future__ import annotations

import math

import numpy as np

from stepkit import check as _check
from stepkit.data import MODALITIES

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

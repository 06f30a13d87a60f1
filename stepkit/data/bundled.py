"""The bundled data sets: real or generated data that ship inside installed packages and work offline.

- ``synthetic_fmri``: stimulus features and fMRI voxels with a known structure (the autoencoder's);
- ``digits_canvas``: scikit-learn's handwritten digits placed on a larger canvas (DINO's and JEPA's);
- ``digits_captioned``: the digits with a caption each (the contrastive recipe's);
- ``ucr_uea``: labelled time series of the UCR / UEA archive, read from sktime's installed wheel;
- ``chat_topics``: English sentences labelled by topic, read from chatterbot-corpus's installed wheel.

Loaders for a user's own data (image folders, ``.npz`` stimulus / fMRI arrays) are in ``stepkit.data``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from stepkit import check as _check
from stepkit.data.arrays import MODALITIES

__all__ = ["HRF", "synthetic_fmri", "digits_canvas", "DIGIT_WORDS", "SIZE_WORDS", "PLACE_WORDS",
           "digits_captioned", "UCR_UEA", "read_ts", "ucr_uea_dir", "ucr_uea", "CHAT_TOPICS", "chat_topics"]

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

    Examples:
        >>> data = synthetic_fmri(time_points=200, voxels=5)
        >>> data["video"].shape, data["audio"].shape, data["text"].shape, data["fmri"].shape
        ((200, 64), (200, 32), (200, 48), (200, 5))
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


def _package_data(package: str) -> Path | None:
    """``<package>/datasets/data`` of an installed package, found without importing it (None if absent)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
        if folder.is_dir():
            return folder
    return None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, ``load_digits(return_X_y=True)``, read from the file its wheel ships without
    importing scikit-learn (a second of every run's start-up)."""
    folder = _package_data("sklearn")
    if folder is not None and (folder / "digits.csv.gz").is_file():
        data = np.loadtxt(folder / "digits.csv.gz", delimiter=",")
        return data[:, :-1], data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


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

    Examples:
        >>> data = digits_canvas(size=32)
        >>> data["train_images"].shape, data["test_images"].shape
        (torch.Size([1438, 1, 32, 32]), torch.Size([359, 1, 32, 32]))
    """
    import torch
    import torch.nn.functional as F
    _check.integer_at_least("size", size, 8)
    _check.in_range("train_fraction", train_fraction, 0.0, 1.0)
    x, y = _digits()
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

    Examples:
        >>> data = digits_captioned()
        >>> captions = data["train_captions"]
        >>> len(captions) == len(data["train_images"]), captions[0].startswith("a ")
        (True, True)
    """
    import torch
    import torch.nn.functional as F
    _check.integer_at_least("size", size, 8)
    _check.in_range("jitter", jitter, 0.0, 0.5)
    _check.in_range("train_fraction", train_fraction, 0.0, 1.0)
    x, y = _digits()
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
    out: dict[str, Any] = {}
    for split, rows in (("train", order[:cut]), ("test", order[cut:])):
        out[f"{split}_images"] = images[rows]
        out[f"{split}_captions"] = [captions[i] for i in rows.tolist()]
        out[f"{split}_caption_ids"] = ids[rows]
        out[f"{split}_labels"] = torch.tensor(y)[rows]
    return out


# --- time series: the UCR / UEA sets inside sktime's (or aeon's) wheel --------------------------

UCR_UEA = ("ArrowHead", "BasicMotions", "GunPoint", "ItalyPowerDemand", "JapaneseVowels", "OSULeaf")
"""The labelled sets both wheels carry (``--data.name``); univariate but BasicMotions and JapaneseVowels."""


def read_ts(path: str | os.PathLike) -> tuple[list[np.ndarray], list[str]]:
    """Read a ``.ts`` file (the UCR / UEA archive's text format): each series ``(C, T_i)`` and its label.

    After the ``@`` header lines, each line is one series: its channels
    separated by ``:``, each a comma-separated list of values (``?`` is
    missing, NaN), then the class label.

    Args:
        path: The ``.ts`` file.

    Returns:
        ``(series, labels)``: float32 arrays ``(channels, time)`` (lengths may differ) and label strings.

    Raises:
        ValueError: naming the file and line, for a file that cannot be read, no ``@data`` section,
            or a series whose channels differ in number or length.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "toy.ts"
        >>> _ = path.write_text("@problemName toy\\n@data\\n1,2,3:4,5,6:a\\n0,0,?:1,1,1:b\\n")
        >>> series, labels = read_ts(path)
        >>> series[0].tolist(), labels
        ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], ['a', 'b'])
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    starts = [i for i, line in enumerate(lines) if line.strip().lower() == "@data"]
    if not starts:
        raise ValueError(f"{path}: no @data line; not a .ts file")
    series: list[np.ndarray] = []
    labels: list[str] = []
    for number, line in enumerate(lines[starts[0] + 1:], start=starts[0] + 2):
        if not line.strip():
            continue
        *channels, label = line.strip().split(":")
        try:
            rows = [[float("nan") if v == "?" else float(v) for v in c.split(",")] for c in channels]
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {err}") from None
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError(f"{path}, line {number}: channels of different lengths {[len(r) for r in rows]}")
        if series and len(rows) != len(series[0]):
            raise ValueError(f"{path}, line {number}: {len(rows)} channels; the first series has "
                             f"{len(series[0])}")
        series.append(np.asarray(rows, dtype=np.float32))
        labels.append(label.strip())
    if not series:
        raise ValueError(f"{path}: no series after @data")
    return series, labels


def ucr_uea_dir() -> Path:
    """The folder of the UCR / UEA sets inside an installed sktime (or aeon), found without importing it.

    Returns:
        The folder holding one sub-folder per set (``GunPoint/GunPoint_TRAIN.ts``, ...).

    Raises:
        ValueError: when neither is installed, naming the extra that brings the data.

    Examples:
        >>> sorted(p.name for p in (ucr_uea_dir() / "GunPoint").glob("*.ts"))
        ['GunPoint_TEST.ts', 'GunPoint_TRAIN.ts']
    """
    for package in ("sktime", "aeon"):
        folder = _package_data(package)
        if folder is not None:
            return folder
    raise ValueError("the embedded time series ship inside sktime's wheel, which is not installed: "
                     "pip install 'stepkit[timeseries]' (or pass your own arrays with --data.path)")


def ucr_uea(name: str) -> dict[str, Any]:
    """One of the UCR / UEA sets (``UCR_UEA``), train and test as the archive splits them, offline.

    Labels become integers in the sorted order of their names. Series keep
    their lengths (JapaneseVowels' differ); missing values are NaN.

    Args:
        name: One of ``UCR_UEA``.

    Returns:
        ``{"train_series": [(C, T_i)], "train_labels": (N,) int64, "test_series", "test_labels", "classes"}``.

    Raises:
        ValueError: for an unknown name (listing them) or no sktime / aeon installed.

    Examples:
        >>> data = ucr_uea("GunPoint")
        >>> len(data["train_series"]), data["train_series"][0].shape, data["classes"]
        (50, (1, 150), ['1', '2'])
    """
    _check.one_of("data.name", name, UCR_UEA)
    folder = ucr_uea_dir() / name
    train, train_names = read_ts(folder / f"{name}_TRAIN.ts")
    test, test_names = read_ts(folder / f"{name}_TEST.ts")
    classes = sorted(set(train_names) | set(test_names), key=lambda c: (len(c), c))
    index = {c: i for i, c in enumerate(classes)}
    return {"train_series": train, "train_labels": np.array([index[c] for c in train_names], dtype=np.int64),
            "test_series": test, "test_labels": np.array([index[c] for c in test_names], dtype=np.int64),
            "classes": classes}


# --- text: the topic-labelled English sentences of chatterbot-corpus's wheel ---------------------

CHAT_TOPICS = ("ai", "coding", "emotion", "trivia", "tech_support")
"""The topics with at least 200 distinct sentences each (``--data.topics``): balanced classes of 200."""


def chat_topics(topics: tuple[str, ...] = CHAT_TOPICS, *, per_topic: int = 200, test_fraction: float = 0.3,
                seed: int = 0) -> dict[str, Any]:
    """Sentences of the English dialogues in ``chatterbot-corpus`` labelled by the topic file they come from.

    Each topic keeps up to ``per_topic`` distinct sentences (a seeded draw), then
    ``test_fraction`` of each topic is held out (stratified). ``unlabelled_texts``
    is every English sentence of the corpus (all topics, all of each) except the
    held-out ones: a larger pool to pretrain on without seeing the test split.

    Args:
        topics: Topic file names (``CHAT_TOPICS`` or others of the corpus's ``english/`` folder).
        per_topic: The most sentences per topic (the largest topic has 2,000).
        test_fraction: The held-out share of each topic, in (0, 1).
        seed: The draw of the sentences and the split.

    Returns:
        ``{"train_texts", "train_labels", "test_texts", "test_labels", "classes", "unlabelled_texts"}``.

    Raises:
        ValueError: when the package is not installed (naming the extra) or a topic does not exist.

    Examples:
        >>> data = chat_topics(("ai", "trivia"), per_topic=50)
        >>> len(data["train_texts"]), len(data["test_texts"]), data["classes"]
        (70, 30, ['ai', 'trivia'])
    """
    import importlib.util

    _check.integer_at_least("per_topic", per_topic, 2)
    _check.in_range("test_fraction", test_fraction, 0.0, 1.0)
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded text set ships inside chatterbot-corpus's wheel, which is not "
                         "installed: pip install 'stepkit[text-jepa]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    corpus = {p.stem: _sentences(p) for p in sorted(folder.glob("*.yml"))}  # each file parsed once
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"train_texts": [], "train_labels": [], "test_texts": [], "test_labels": [],
                           "classes": list(topics)}
    for label, topic in enumerate(topics):
        if topic not in corpus:
            raise ValueError(f"data.topics: no topic {topic!r}; topics: {', '.join(corpus)}")
        sentences = corpus[topic]
        chosen = [sentences[i] for i in rng.permutation(len(sentences))[:per_topic]]
        held = max(1, round(test_fraction * len(chosen)))
        for split, texts in (("test", chosen[:held]), ("train", chosen[held:])):
            out[f"{split}_texts"] += texts
            out[f"{split}_labels"] += [label] * len(texts)
    everything = {s for sentences in corpus.values() for s in sentences}
    out["unlabelled_texts"] = sorted(everything - set(out["test_texts"]))
    for split in ("train", "test"):
        out[f"{split}_labels"] = np.array(out[f"{split}_labels"], dtype=np.int64)
    return out


def _sentences(path: Path) -> list[str]:
    """The distinct sentences of one chatterbot-corpus topic file, sorted."""
    import yaml

    talks = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations", [])
    return sorted({s.strip() for talk in talks for s in talk if isinstance(s, str) and s.strip()})

"""Samples cut from sequences: series windows, tokenised sentences, contiguous time blocks."""

from __future__ import annotations

from typing import Any

import numpy as np

from stepkit import check as _check
from stepkit.data.arrays import MODALITIES

__all__ = ["series_windows", "windowed_series", "tokenized_sentences", "time_blocks", "stimulus_windows"]


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
            ``stepkit.data.ucr_uea``): lists of ``(C, T)`` arrays and their integer labels.
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
            (``stepkit.data.chat_topics``).
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


def stimulus_windows(series: dict[str, Any], t: Any, window: int,
                     modalities: tuple[str, ...] = MODALITIES) -> dict[str, Any]:
    """Each modality's features at ``t - window + 1 .. t`` for every index in ``t``: ``(B, window, d)``.

    What the autoencoder recipe feeds its model (and ``stepkit eval`` again, on the test block).

    Args:
        series: ``{modality: (time, d)}`` tensors.
        t: ``(B,)`` time indices, each at least ``window - 1``.
        window: Time points a sample reads.
        modalities: The keys of ``series`` to cut.

    Returns:
        ``{modality: (B, window, d)}``, the latest time point last.

    Examples:
        >>> import torch
        >>> series = {"video": torch.arange(6.0)[:, None]}
        >>> stimulus_windows(series, torch.tensor([2, 5]), 3, ("video",))["video"][..., 0].tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    import torch

    offsets = torch.arange(window - 1, -1, -1, device=t.device)
    return {m: series[m][t[:, None] - offsets] for m in modalities}

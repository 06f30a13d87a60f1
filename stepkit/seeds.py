"""Seeds from tuples: each generator of a run seeded by (seed, purpose, place...), never by arithmetic.

A recipe needs many generators: the data order of each epoch, each sample's crops, the masks of each
batch on each rank, each rank's augmentation stream. Seeding them by arithmetic on the run's seed
collides: ``seed * 1_000_003 + position * 101 + rank`` gives rank 101 at position ``p`` the masks of
rank 0 at ``p + 1``. Here every seed is drawn by NumPy's ``SeedSequence`` from the whole tuple (the
purpose as a stable hash of its name), so two different tuples give independent streams: the
collision of a 63-bit draw is the only one left (about one in 10^18 per pair).
"""

from __future__ import annotations

import zlib

import numpy as np

from stepkit import check as _check

__all__ = ["numpy_rng", "seed_of", "torch_generator"]


def _entropy(seed: int, purpose: str, place: tuple[int, ...]) -> list[int]:
    _check.integer_at_least("seed", seed, 0)
    for i, p in enumerate(place):
        _check.integer_at_least(f"place[{i}]", p, 0)
    return [seed, zlib.crc32(purpose.encode()), len(place), *place]


def seed_of(seed: int, purpose: str, *place: int) -> int:
    """A 63-bit seed for the generator of ``purpose`` at ``place`` (epoch, step, rank, sample ...).

    Args:
        seed: The run's seed (``--train.seed``), at least 0.
        purpose: What the generator draws (``"masks"``, ``"order"``, ``"rank"`` ...): two purposes at the
            same place draw independent numbers.
        *place: Where in the run, as integers >= 0; ``(1, 2)`` and ``(12,)`` are different places.

    Returns:
        An integer in ``[0, 2**63)``, for ``torch.Generator.manual_seed`` or ``torch.manual_seed``.

    Examples:
        >>> seed_of(0, "masks", 5, 101) == seed_of(0, "masks", 6, 0)  # arithmetic made these equal
        False
        >>> seed_of(0, "masks", 5) == seed_of(0, "masks", 5) != seed_of(0, "loss", 5)
        True
    """
    words = np.random.SeedSequence(_entropy(seed, purpose, place)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # 63 bits: torch seeds are signed 64-bit


def torch_generator(seed: int, purpose: str, *place: int, device: str = "cpu"):
    """A ``torch.Generator`` on ``device`` seeded with ``seed_of(seed, purpose, *place)``.

    Examples:
        >>> import torch
        >>> a, b = torch_generator(0, "order", 3), torch_generator(0, "order", 3)
        >>> torch.equal(torch.randperm(5, generator=a), torch.randperm(5, generator=b))
        True
    """
    import torch

    return torch.Generator(device=device).manual_seed(seed_of(seed, purpose, *place))


def numpy_rng(seed: int, purpose: str, *place: int) -> np.random.Generator:
    """A NumPy generator for ``purpose`` at ``place``, from the same tuple ``seed_of`` uses.

    Examples:
        >>> numpy_rng(0, "crops", 1, 7).random() == numpy_rng(0, "crops", 1, 7).random()
        True
        >>> numpy_rng(0, "crops", 1, 7).random() == numpy_rng(0, "crops", 17).random()
        False
    """
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, purpose, place)))

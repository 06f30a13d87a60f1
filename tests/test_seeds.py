"""stepkit.seeds: each generator seeded from a tuple: neighbouring ranks, steps and purposes never share."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stepkit.seeds import numpy_rng, seed_of, torch_generator


def test_ranks_0_and_101_at_neighbouring_positions_draw_different_masks():
    """The arithmetic it replaces, seed * 1_000_003 + position * 101 + rank, made these equal."""
    assert 0 * 1_000_003 + 5 * 101 + 101 == 0 * 1_000_003 + 6 * 101 + 0
    a = torch.rand(8, generator=torch_generator(0, "masks", 5, 101))
    b = torch.rand(8, generator=torch_generator(0, "masks", 6, 0))
    assert not torch.equal(a, b)


def test_no_two_places_of_a_grid_share_a_seed():
    seeds = {seed_of(s, p, step, rank) for s, p, step, rank in itertools.product(
        range(3), ("masks", "negatives", "order", "rank"), range(40), range(0, 203, 101))}
    assert len(seeds) == 3 * 4 * 40 * 3


@given(st.integers(0, 2**32), st.text(max_size=8), st.lists(st.integers(0, 2**40), max_size=4))
def test_a_seed_is_a_pure_function_of_its_tuple_and_fits_torch(seed, purpose, place):
    value = seed_of(seed, purpose, *place)
    assert value == seed_of(seed, purpose, *place) and 0 <= value < 2**63
    torch.Generator().manual_seed(value)  # accepted as it is


def test_the_place_is_a_tuple_not_a_concatenation():
    assert seed_of(0, "crops", 1, 2) != seed_of(0, "crops", 12) != seed_of(0, "crops", 1, 2, 0)
    assert numpy_rng(0, "crops", 1, 2).random() != numpy_rng(0, "crops", 12).random()


def test_numpy_and_torch_draw_from_the_same_tuple_each_their_own_stream():
    assert numpy_rng(3, "order", 1).integers(0, 2**31) == numpy_rng(3, "order", 1).integers(0, 2**31)
    assert isinstance(numpy_rng(3, "order", 1), np.random.Generator)


@pytest.mark.parametrize("args, message", [((-1, "x"), "^seed=-1 is not allowed"),
                                           ((0, "x", 3, -2), r"^place\[1\]=-2 is not allowed")])
def test_negative_seeds_and_places_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        seed_of(*args)

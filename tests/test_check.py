"""stepkit.check: every config check fails with one line naming the field, the value and what is allowed."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepkit.check import at_least, fail, finite, in_range, integer_at_least, one_of


def test_fail_names_the_field_the_value_and_the_allowed_values():
    with pytest.raises(ValueError) as err:
        fail("data.workers", -1, "an integer >= 0")
    assert str(err.value) == "data.workers=-1 is not allowed: expected an integer >= 0"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -math.inf, "1", None, True])
def test_finite_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(ValueError, match=r"^lr=.* is not allowed: expected a finite number$"):
        finite("lr", value)


@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(-1e6, 1e6))
def test_at_least_accepts_exactly_the_numbers_at_or_above_the_bound(value, low):
    if value >= low:
        assert at_least("x", value, low) is None
    else:
        with pytest.raises(ValueError, match=rf"expected a number >= {low}$"):
            at_least("x", value, low)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_in_range_is_closed_at_both_ends(value):
    inside = 0.0 <= value <= 1.0
    if inside:
        assert in_range("momentum", value, 0.0, 1.0) is None
    else:
        with pytest.raises(ValueError, match=r"expected a number in \[0.0, 1.0\]$"):
            in_range("momentum", value, 0.0, 1.0)


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4"])
def test_integer_at_least_refuses_floats_bools_and_small_integers(value):
    with pytest.raises(ValueError, match=r"^steps=.* is not allowed: expected an integer >= 1$"):
        integer_at_least("steps", value, 1)
    assert integer_at_least("steps", 1, 1) is None


def test_one_of_lists_every_allowed_value_in_order():
    with pytest.raises(ValueError) as err:
        one_of("amp", "fp8", ("none", "bf16", "fp16"))
    assert str(err.value) == "amp='fp8' is not allowed: expected one of 'none', 'bf16', 'fp16'"
    assert one_of("amp", "bf16", ("none", "bf16", "fp16")) is None

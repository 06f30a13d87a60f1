"""Validation helpers: every error names the field, its value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is not allowed: expected {allowed}")


def finite(field: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        fail(field, value, "a finite number")


def at_least(field: str, value: float, low: float) -> None:
    finite(field, value)
    if value < low:
        fail(field, value, f"a number >= {low}")


def in_range(field: str, value: float, low: float, high: float) -> None:
    finite(field, value)
    if not low <= value <= high:
        fail(field, value, f"a number in [{low}, {high}]")


def integer_at_least(field: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(field, value, f"an integer >= {low}")


def one_of(field: str, value: Any, allowed: Collection[Any]) -> None:
    if value not in allowed:
        fail(field, value, "one of " + ", ".join(repr(a) for a in allowed))

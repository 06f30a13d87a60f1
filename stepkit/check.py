"""Validation helpers for config dataclasses: every error names the field, its value and what is allowed.

Use them in a config's ``__post_init__``::

    from stepkit.check import at_least, integer_at_least

    @dataclass
    class Model:
        width: int = 64

        def __post_init__(self) -> None:
            integer_at_least("width", self.width, 1)

Each raises ``ValueError("width=0 is not allowed: expected an integer >= 1")``;
parsed through ``stepkit.cli.cli``, the field is named by its flag path
(``model.width=0 ...``).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, NoReturn

__all__ = ["fail", "finite", "at_least", "in_range", "integer_at_least", "one_of"]


def fail(field: str, value: Any, allowed: str) -> NoReturn:
    """Raise ``ValueError("<field>=<value> is not allowed: expected <allowed>")``.

    Args:
        field: The field's name (``stepkit.cli.cli`` prefixes its flag path).
        value: The value given.
        allowed: What is allowed, as a phrase.

    Raises:
        ValueError: always.

    Examples:
        >>> fail("lr", -1.0, "a number >= 0")
        Traceback (most recent call last):
        ValueError: lr=-1.0 is not allowed: expected a number >= 0
    """
    raise ValueError(f"{field}={value!r} is not allowed: expected {allowed}")


def finite(field: str, value: float) -> None:
    """``fail`` unless ``value`` is a finite int or float (not a bool).

    Examples:
        >>> finite("lr", float("nan"))
        Traceback (most recent call last):
        ValueError: lr=nan is not allowed: expected a finite number
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        fail(field, value, "a finite number")


def at_least(field: str, value: float, low: float) -> None:
    """``fail`` unless ``value`` is a finite number ``>= low``.

    Examples:
        >>> at_least("lr", 0.1, 0.0) is None
        True
    """
    finite(field, value)
    if value < low:
        fail(field, value, f"a number >= {low}")


def in_range(field: str, value: float, low: float, high: float) -> None:
    """``fail`` unless ``value`` is a finite number in ``[low, high]``.

    Examples:
        >>> in_range("momentum", 1.5, 0.0, 1.0)
        Traceback (most recent call last):
        ValueError: momentum=1.5 is not allowed: expected a number in [0.0, 1.0]
    """
    finite(field, value)
    if not low <= value <= high:
        fail(field, value, f"a number in [{low}, {high}]")


def integer_at_least(field: str, value: int, low: int) -> None:
    """``fail`` unless ``value`` is an int (not a bool) ``>= low``.

    Examples:
        >>> integer_at_least("steps", 2.0, 1)
        Traceback (most recent call last):
        ValueError: steps=2.0 is not allowed: expected an integer >= 1
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(field, value, f"an integer >= {low}")


def one_of(field: str, value: Any, allowed: Collection[Any]) -> None:
    """``fail`` unless ``value`` is in ``allowed`` (the message lists them).

    Examples:
        >>> one_of("amp", "fp8", ("none", "bf16", "fp16"))
        Traceback (most recent call last):
        ValueError: amp='fp8' is not allowed: expected one of 'none', 'bf16', 'fp16'
    """
    if value not in allowed:
        fail(field, value, "one of " + ", ".join(repr(a) for a in allowed))

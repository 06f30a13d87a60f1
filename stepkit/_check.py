"""The validation helpers under their old private name: ``stepkit.check`` is the public module."""

from stepkit.check import (  # noqa: F401
    _COLLECTED,
    at_least,
    collected_errors,
    fail,
    finite,
    in_range,
    integer_at_least,
    one_of,
)

"""What a model was built with, so that exported weights rebuild it without the recipe that made it.

A model class decorated with ``records_arguments`` keeps its constructor's
arguments in ``module.arguments``; ``arch_record`` turns them into JSON (a
nested module becomes a nested record) and ``build_arch`` builds the module
again. Only the classes in ``ARCHITECTURES`` are ever built from a record, so
a weights file can name a class but never run code of its choosing.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar

from torch import nn

__all__ = ["ARCHITECTURES", "arch_record", "build_arch", "records_arguments"]

# The classes a record may name; filled in by stepkit.models (no registry: this list is fixed).
ARCHITECTURES: dict[str, type[nn.Module]] = {}

# Arguments that change how a module trains, not what it computes: left at their defaults on rebuild;
# and a folder to read weights from (a record rebuilds the architecture; its weights come with it).
_NOT_REBUILT = ("grad_checkpointing", "drop_path", "dropout", "path")

ModuleClass = TypeVar("ModuleClass", bound=type[nn.Module])


def records_arguments(cls: ModuleClass) -> ModuleClass:
    """Class decorator: after ``__init__``, ``self.arguments`` holds every constructor argument by name.

    Examples:
        >>> @records_arguments
        ... class Net(nn.Module):
        ...     def __init__(self, width: int, depth: int = 2) -> None:
        ...         super().__init__()
        >>> Net(8).arguments
        {'width': 8, 'depth': 2}
    """
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        object.__setattr__(self, "arguments", arguments)  # a plain attribute, never a submodule

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def arch_record(module: nn.Module) -> dict[str, Any]:
    """``{"class": name, "arguments": {...}}`` for a module built by a class in ``ARCHITECTURES``.

    A module may define ``arch_arguments()`` to give other arguments than its
    constructor's (a Hugging Face encoder gives its config, not a folder path).

    Raises:
        ValueError: for a module whose class is not in ``ARCHITECTURES`` (it could not be rebuilt).

    Examples:
        >>> from stepkit.models import SmallCNN
        >>> arch_record(SmallCNN(1, (8, 16), pool=2))["arguments"]["widths"]
        [8, 16]
    """
    name = type(module).__name__
    if ARCHITECTURES.get(name) is not type(module):
        raise ValueError(f"{name}: not a stepkit model that exported weights can rebuild "
                         f"(those are: {', '.join(sorted(ARCHITECTURES))})")
    given: dict[str, Any] = (module.arch_arguments() if hasattr(module, "arch_arguments")  # type: ignore[operator]
                             else module.__dict__["arguments"])
    return {"class": name, "arguments": {k: _jsonable(v) for k, v in given.items()}}


def _jsonable(value: Any) -> Any:
    if isinstance(value, nn.Module):
        return arch_record(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def build_arch(record: dict[str, Any]) -> nn.Module:
    """The module ``record`` describes, freshly initialised (load its weights next).

    Raises:
        ValueError: for a record that names a class outside ``ARCHITECTURES``, or arguments it rejects.

    Examples:
        >>> from stepkit.models import SmallCNN
        >>> type(build_arch(arch_record(SmallCNN(1, (8, 16))))).__name__
        'SmallCNN'
    """
    if not isinstance(record, dict) or record.get("class") not in ARCHITECTURES:
        found = record.get("class") if isinstance(record, dict) else record
        raise ValueError(f"architecture {found!r} is not one stepkit builds "
                         f"(allowed: {', '.join(sorted(ARCHITECTURES))})")
    cls = ARCHITECTURES[record["class"]]
    arguments = {k: _built(v) for k, v in dict(record.get("arguments", {})).items()
                 if k not in _NOT_REBUILT}
    try:
        return cls(**arguments)
    except TypeError as err:
        raise ValueError(f"architecture {record['class']}: arguments do not fit ({err})") from None


def _built(value: Any) -> Any:
    if isinstance(value, dict) and "class" in value and "arguments" in value:
        return build_arch(value)
    if isinstance(value, list):
        return tuple(_built(v) for v in value)
    return value

"""Deprecated: ``stepkit.tools`` was split by concern into ``stepkit.evaluation`` (ridge, k-NN, linear
probes, retrieval metrics) and ``stepkit.tuning`` (LR range test, batch finder, ``MemoryCap``, ``tune``).

The old names still import from here for this release, each with a ``DeprecationWarning`` naming its
new home; the next release removes this module.
"""

from __future__ import annotations

import warnings
from typing import Any

_EVALUATION = ("DEFAULT_ALPHAS", "PROBE_CS", "RidgeFit", "chance_recall_at_k", "extract_features",
               "fit_logistic", "knn_accuracy", "linear_probe", "linear_probe_accuracy", "recall_at_k",
               "retrieval_metrics", "ridge_regression", "validation_split")
_TUNING = ("LRRangeResult", "MemoryCap", "TuneConfig", "is_out_of_memory", "largest_batch_size",
           "lr_range_test", "tune")


def __getattr__(name: str) -> Any:
    module = "stepkit.evaluation" if name in _EVALUATION else "stepkit.tuning" if name in _TUNING else None
    if module is None:
        raise AttributeError(f"module 'stepkit.tools' has no attribute {name!r}")
    warnings.warn(f"stepkit.tools.{name} moved to {module}.{name}; stepkit.tools goes in the next release",
                  DeprecationWarning, stacklevel=2)
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(_EVALUATION + _TUNING)

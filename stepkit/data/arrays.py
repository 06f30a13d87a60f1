"""A user's own arrays: stimulus / fMRI ``.npz`` files and labelled series, checked on reading.

Stimulus / fMRI data (the autoencoder recipe): a dict of 2-D float32 arrays,
time first, ``video``, ``audio``, ``text`` (features per time point) and
``fmri`` (voxels per time point), all of the same length. Series data: ``x_train``,
``y_train``, ``x_test``, ``y_test``. A file that cannot be read is named in one line.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["MODALITIES", "FMRI_ARRAYS", "load_fmri_npz", "SERIES_ARRAYS", "load_series_npz"]


MODALITIES = ("video", "audio", "text")


FMRI_ARRAYS = (*MODALITIES, "fmri")


def load_fmri_npz(path: str | os.PathLike, *, min_time_points: int = 50) -> dict[str, np.ndarray]:
    """Load and check a user's ``.npz`` with ``video``, ``audio``, ``text`` and ``fmri``, time first.

    Raises ``ValueError`` naming the file and the array for a missing file or
    array, an array that is not 2-D (time, features), lengths that differ,
    too few time points, or NaN / infinite values.

    Args:
        path: The ``.npz`` file.
        min_time_points: The fewest time points allowed.

    Returns:
        ``{"video", "audio", "text", "fmri"}`` as float32 ``(time, features)`` arrays.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.npz"
        >>> np.savez(path, video=np.zeros((60, 4)), audio=np.zeros((60, 2)), text=np.zeros((60, 3)),
        ...          fmri=np.zeros((60, 10)))
        >>> load_fmri_npz(path)["fmri"].shape
        (60, 10)
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data.path={str(path)!r} is not allowed: a folder, expected an .npz file")
    arrays = _read_named_arrays(path, FMRI_ARRAYS)
    for name, array in arrays.items():
        if array.ndim != 2:
            raise ValueError(f"{path}: array {name!r} has shape {array.shape}; expected 2-D (time, features)")
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{path}: array {name!r} has dtype {array.dtype}; expected numbers")
        bad = ~np.isfinite(array)
        if bad.any():
            t, f = np.argwhere(bad)[0]
            raise ValueError(f"{path}: array {name!r} has {int(bad.sum())} NaN or infinite values "
                             f"(first at time {t}, column {f})")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: arrays differ in length (time points): {lengths}")
    if lengths["fmri"] < min_time_points:
        raise ValueError(f"{path}: {lengths['fmri']} time points; expected at least {min_time_points}")
    return {name: a.astype(np.float32) for name, a in arrays.items()}


SERIES_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_series_npz(path: str | os.PathLike, *, min_length: int = 2) -> dict[str, np.ndarray]:
    """Load and check a user's labelled time series: ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    ``x_*`` is ``(N, T)`` (univariate) or ``(N, C, T)``; ``y_*`` holds one
    integer label per series. ``path`` is an ``.npz`` with those arrays or a
    folder with ``x_train.npy``, ... (read without pickle).

    Args:
        path: The ``.npz`` file or the folder of ``.npy`` files.
        min_length: The shortest series allowed (the recipe's window).

    Returns:
        ``{"train_series": (N, C, T) float32, "train_labels": (N,) int64, "test_series", "test_labels"}``.

    Raises:
        ValueError: naming the file and the array, for a missing file or array, shapes that are not
            ``(N, T)`` / ``(N, C, T)`` / ``(N,)``, counts or channels that differ between arrays,
            series shorter than ``min_length``, non-integer labels, or NaN / infinite values.

    Examples:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> np.savez(folder / "mine.npz", x_train=np.zeros((4, 3, 20)), y_train=np.arange(4),
        ...          x_test=np.zeros((2, 3, 20)), y_test=np.arange(2))
        >>> data = load_series_npz(folder / "mine.npz")
        >>> data["train_series"].shape, data["test_labels"].tolist()
        ((4, 3, 20), [0, 1])
    """
    path = Path(path)
    arrays = _read_named_arrays(path, SERIES_ARRAYS)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3):
            raise ValueError(f"{path}: array 'x_{split}' has shape {x.shape}; expected (series, time) or "
                             f"(series, channels, time)")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{path}: array 'x_{split}' has dtype {x.dtype}; expected numbers")
        bad = ~np.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{path}: array 'x_{split}' has {int(bad.sum())} NaN or infinite values "
                             f"(first at index {first}); fill or drop them first")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path}: array 'y_{split}' has shape {y.shape}; expected ({len(x)},): one "
                             f"label per series of 'x_{split}'")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: array 'y_{split}' has dtype {y.dtype}; expected integer class labels")
        if x.shape[-1] < min_length:
            raise ValueError(f"{path}: array 'x_{split}' holds series of {x.shape[-1]} time points; expected "
                             f"at least {min_length} (data.window)")
        if len(x) == 0:
            raise ValueError(f"{path}: array 'x_{split}' holds no series")
    # (N, T) -> (N, 1, T); (N, C, T) stays
    train, test = (x.reshape(len(x), -1, x.shape[-1]) for x in (arrays["x_train"], arrays["x_test"]))
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"{path}: 'x_train' has {train.shape[1]} channels and 'x_test' {test.shape[1]}; "
                         f"they must match")
    return {"train_series": train.astype(np.float32), "train_labels": arrays["y_train"].astype(np.int64),
            "test_series": test.astype(np.float32), "test_labels": arrays["y_test"].astype(np.int64)}


def _read_named_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if path.is_dir():
        missing = [n for n in names if not (path / f"{n}.npy").is_file()]
        if missing:
            raise ValueError(f"{path}: missing {[f'{n}.npy' for n in missing]}; expected {list(names)}")
        arrays = {}
        for n in names:
            try:
                arrays[n] = np.load(path / f"{n}.npy", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"{path / f'{n}.npy'}: not a readable .npy file ({type(err).__name__}: "
                                 f"{err})") from None
        return arrays
    if not path.is_file():
        raise ValueError(f"data.path={str(path)!r} is not allowed: no such file or folder (expected an .npz "
                         f"or a folder of .npy files)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array (.npy), not an .npz archive of named arrays; "
                         f"expected arrays {list(names)}")
    with archive:
        missing = [n for n in names if n not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected {list(names)}, "
                             f"found {sorted(archive.files)}")
        try:
            return {n: archive[n] for n in names}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: an array in it cannot be read ({type(err).__name__}: {err})") from None

"""Image files under a folder of any layout: found, labelled by sub-folder, unreadable ones named."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL.Image import DecompressionBombError

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImage", "unreadable_image", "find_images", "LabelledFolder",
           "labelled_folder", "drop_unreadable", "unreadable_error"]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# What Pillow raises for a file it cannot decode: UnidentifiedImageError and truncation are OSErrors; an
# image past its pixel limit (Image.MAX_IMAGE_PIXELS) is a DecompressionBombError, which is not
DECODE_ERRORS = (OSError, ValueError, SyntaxError, DecompressionBombError)


class UnreadableImage(ValueError):
    """An image that cannot be decoded; the message names the file (or shard member) and the flag.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.png"
        >>> _ = path.write_bytes(b"not an image")
        >>> try:
        ...     drop_unreadable([path, path], skip=False, flag="data.root")
        ... except UnreadableImage as err:
        ...     print(str(err).split(":")[1].strip())
        not a readable image (UnidentifiedImageError
    """


def unreadable_image(source: str | os.PathLike | bytes) -> str | None:
    """Why Pillow cannot read ``source`` (a path or the file's bytes) as an image, or None if it can.

    The file is opened and fully decoded: a truncated JPEG passes ``verify`` but not this.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.png"
        >>> _ = path.write_bytes(b"not an image")
        >>> unreadable_image(path) is not None
        True
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for broken files
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


def find_images(root: str | os.PathLike, *, flag: str = "data.root") -> list[Path]:
    """Every image file under ``root``, at any depth, in sorted order (hidden folders and files skipped).

    Args:
        root: The folder.
        flag: The CLI flag named in errors.

    Returns:
        The image paths (extensions ``IMAGE_EXTENSIONS``, any case).

    Raises:
        ValueError: naming ``flag``, for a missing folder or one without images.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "a" / "b").mkdir(parents=True)
        >>> for name in ("1.png", "a/2.JPG", "a/b/3.png"):
        ...     Image.new("RGB", (4, 4)).save(root / name, format="PNG")
        >>> [str(p.relative_to(root)) for p in find_images(root)]
        ['1.png', 'a/2.JPG', 'a/b/3.png']
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{flag}={str(root)!r} is not allowed: no such folder")
    found = sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    if not found:
        raise ValueError(
            f"{flag}={str(root)!r} is not allowed: no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders"
        )
    return found


@dataclass
class LabelledFolder:
    """A class-per-folder image set: ``root/<class>/**/<image>`` (see ``labelled_folder``).

    Examples:
        >>> LabelledFolder(Path("d"), [Path("d/cat/1.png")], [0], ["cat"], []).classes
        ['cat']
    """

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    loose: list[Path]
    """Images directly in ``root``, beside the class folders: in no class, so left out."""


def labelled_folder(root: str | os.PathLike, *, flag: str) -> LabelledFolder:
    """The images of ``root/<class>/...``, labelled by their first-level folder (classes sorted by name).

    Args:
        root: The folder of class folders.
        flag: The CLI flag named in errors.

    Raises:
        ValueError: naming ``flag``, for a missing folder, one without class folders, or class folders
            without images.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("cat/1.png", "dog/x/2.png", "3.png"):
        ...     (root / name).parent.mkdir(parents=True, exist_ok=True)
        ...     Image.new("RGB", (4, 4)).save(root / name)
        >>> found = labelled_folder(root, flag="eval.train_root")
        >>> found.classes, found.labels, [p.name for p in found.loose]
        (['cat', 'dog'], [0, 1], ['3.png'])
    """
    images = find_images(root, flag=flag)
    root = Path(root)
    classes = sorted({p.relative_to(root).parts[0] for p in images if len(p.relative_to(root).parts) > 1})
    if not classes:
        raise ValueError(
            f"{flag}={str(root)!r} is not allowed: expected one sub-folder of images per class, "
            f"found only {len(images)} images directly in it"
        )
    index = {name: i for i, name in enumerate(classes)}
    paths, labels, loose = [], [], []
    for path in images:
        parts = path.relative_to(root).parts
        if len(parts) == 1:
            loose.append(path)
        else:
            paths.append(path)
            labels.append(index[parts[0]])
    return LabelledFolder(root, paths, labels, classes, loose)


def unreadable_error(path: Path, err: Exception, flag: str) -> UnreadableImage:
    """The error for ``path``, which Pillow failed to decode with ``err``, naming the flag that skips it.

    Examples:
        >>> print(unreadable_error(Path("a.png"), OSError("truncated"), "data.root"))
        a.png: not a readable image (OSError: truncated); pass --data.skip-unreadable to skip such files
        (from --data.root)
    """
    return UnreadableImage(
        f"{path}: not a readable image ({type(err).__name__}: {err}); pass "
        f"--data.skip-unreadable to skip such files (from --{flag.replace('_', '-')})"
    )


def drop_unreadable(
    paths: Sequence[Path], *, skip: bool, flag: str, check_up_to: int = 10_000
) -> tuple[list[int], list[Path]]:
    """Decode every file up front when skipping, or when there are at most ``check_up_to`` (cheap).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (4, 4)).save(folder / "good.png")
        >>> _ = (folder / "bad.png").write_bytes(b"not an image")
        >>> paths = [folder / "good.png", folder / "bad.png"]
        >>> kept, skipped = drop_unreadable(paths, skip=True, flag="data.root")
        >>> kept, [p.name for p in skipped]
        ([0], ['bad.png'])

    Returns:
        ``(kept indices, skipped paths)``.

    Raises:
        UnreadableImage: naming the first unreadable file and ``--data.skip-unreadable`` (unless ``skip``).
    """
    if not skip and len(paths) > check_up_to:
        return list(range(len(paths))), []
    kept, skipped = [], []
    for i, path in enumerate(paths):
        problem = unreadable_image(path)
        if problem is None:
            kept.append(i)
        elif skip:
            skipped.append(path)
        else:
            raise UnreadableImage(
                f"{path}: {problem}; pass --data.skip-unreadable to skip such files "
                f"(from --{flag.replace('_', '-')})"
            )
    if not kept:
        raise ValueError(f"{flag}: none of its {len(paths)} images can be read")
    return kept, skipped

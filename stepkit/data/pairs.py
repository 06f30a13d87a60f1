"""Image–text pairs from a file (CSV / TSV, JSON Lines, Parquet): every row checked, paths relative to it.

The columns are named by flags; open_clip's defaults are ``filepath`` and
``title``. A row whose image does not exist, whose caption is empty, or
that is malformed stops the run with one line naming the file, the row and
the flag (``--data.skip-unreadable`` skips and counts such rows instead).
Rows that share an image share an id, so a held-out split keeps all of an
image's captions on one side and retrieval counts any of them as a hit.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from stepkit import check as _check
from stepkit.seeds import numpy_rng

__all__ = ["PAIR_FILE_KINDS", "Pairs", "TextPairs", "read_pairs", "read_text_pairs", "split_pairs"]

PAIR_FILE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass
class Pairs:
    """Checked pairs: ``images[i]`` (an existing file) captioned ``texts[i]``; ``ids[i]`` numbers the image.

    Examples:
        >>> pairs = Pairs([Path("a.jpg"), Path("a.jpg")], ["a cat", "a cat asleep"], [0, 0])
        >>> len(pairs), pairs.select([1]).texts
        (2, ['a cat asleep'])
    """

    images: list[Path]
    texts: list[str]
    ids: list[int]
    skipped: list[str] = field(default_factory=list)
    """One ``file:row: why`` per row left out (``skip_unreadable``)."""
    source: Path = Path(".")
    negatives: list[list[str]] = field(default_factory=list)
    """Hard negatives: per row, the captions of its negative columns (empty: none read)."""

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows) -> Pairs:
        """The pairs at ``rows`` (ids kept)."""
        rows = list(rows)
        return Pairs([self.images[i] for i in rows], [self.texts[i] for i in rows],
                     [self.ids[i] for i in rows], [], self.source,
                     [self.negatives[i] for i in rows] if self.negatives else [])


@dataclass
class TextPairs:
    """Checked text pairs (sentence-transformers' anchor / positive): ``ids[i]`` numbers the positive.

    Examples:
        >>> pairs = TextPairs(["what is a cat?", "a kitten?"], ["a small feline", "a small feline"], [0, 0])
        >>> len(pairs), pairs.select([1]).anchors
        (2, ['a kitten?'])
    """

    anchors: list[str]
    positives: list[str]
    ids: list[int]
    skipped: list[str] = field(default_factory=list)
    source: Path = Path(".")
    negatives: list[list[str]] = field(default_factory=list)
    """Hard negatives: per row, the texts of its negative columns (empty: none read)."""

    def __len__(self) -> int:
        return len(self.anchors)

    def select(self, rows) -> TextPairs:
        """The pairs at ``rows`` (ids kept)."""
        rows = list(rows)
        return TextPairs([self.anchors[i] for i in rows], [self.positives[i] for i in rows],
                         [self.ids[i] for i in rows], [], self.source,
                         [self.negatives[i] for i in rows] if self.negatives else [])


def _rows(path: Path, kind: str, columns: tuple[str, ...], flag: str):
    """``(row label, {column: value})`` per row; raises ValueError for a malformed file or row."""
    try:
        yield from _records(path, kind, columns, flag)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> ValueError:
    """The first line of ``path`` that is not UTF-8, named with its line, column and byte."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            byte = line[err.start]
            return ValueError(f"{path}:{number}: not UTF-8 (byte 0x{byte:02x} at column {err.start + 1}); "
                              f"pairs files are read as UTF-8 (with or without a BOM): save it as UTF-8, "
                              f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8{path.suffix}")
    return ValueError(f"{path}: not UTF-8; pairs files are read as UTF-8 (with or without a BOM)")


def _records(path: Path, kind: str, columns: tuple[str, ...], flag: str):
    if kind in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM, as Excel writes
            reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
            header = reader.fieldnames or []
            _check_columns(path, header, columns, flag)
            for record in reader:
                line = reader.line_num
                if None in record or None in record.values():
                    found = sum(v is not None for k, v in record.items() if k is not None)
                    found += len(record.get(None) or [])
                    raise ValueError(f"{path}:{line}: a malformed row ({len(header)} fields expected, found "
                                     f"{found})")
                yield f"line {line}", record
    elif kind == "jsonl":
        with open(path, encoding="utf-8-sig") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: not a JSON object (a {type(record).__name__})")
                missing = [c for c in columns if c not in record]
                if missing:
                    raise ValueError(f"{path}:{number}: no {missing[0]!r} key (found {sorted(record)[:8]}); "
                                     f"name the key with {_column_flag(columns, missing[0], flag)}")
                yield f"line {number}", record
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install 'stepkit[parquet]' "
                              "(or pip install pyarrow)") from None
        try:
            schema = pq.read_schema(path)
            _check_columns(path, schema.names, columns, flag)
            table = pq.read_table(path, columns=list(columns))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
        values = [table.column(c).to_pylist() for c in columns]
        for number, row in enumerate(zip(*values)):
            yield f"row {number}", dict(zip(columns, row))


def _file_kind(path: Path, flag: str) -> str:
    """``csv``, ``tsv``, ``jsonl`` or ``parquet`` for an existing pairs file; ValueError naming ``flag``."""
    kind = PAIR_FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        _check.fail(flag, str(path), f"a file ending in one of {', '.join(PAIR_FILE_KINDS)}")
    if not path.is_file():
        raise ValueError(f"{flag}={str(path)!r} is not allowed: no such file")
    return kind


def _first_seen_ids(keys: list) -> list[int]:
    """Each key's number in order of first appearance: rows that share an image (or a positive) share it."""
    numbering: dict = {}
    return [numbering.setdefault(key, len(numbering)) for key in keys]


def _column_flag(columns: tuple[str, ...], name: str, flag: str) -> str:
    which = {columns[0]: "image-column", columns[1]: "text-column"}.get(name, "negative-columns")
    return f"--{flag.rsplit('.', 1)[0]}.{which}".replace("_", "-")


def _check_columns(path: Path, header, columns: tuple[str, ...], flag: str) -> None:
    for name in columns:
        if name not in header:
            looks_like_text = {"anchor", "positive"} <= set(header)
            text_pairs = "; for text pairs, --data.kind text-text" if looks_like_text else ""
            raise ValueError(f"{path}: no column {name!r} (found {list(header)[:8]}); name it with "
                             f"{_column_flag(columns, name, flag)}{text_pairs}")


def read_pairs(path: str | os.PathLike, *, image_column: str = "filepath", text_column: str = "title",
               negative_columns: tuple[str, ...] = (), skip_unreadable: bool = False,
               flag: str = "data.pairs", check_up_to: int = 10_000) -> Pairs:
    """Read and check the image–text pairs of ``path`` (``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet``).

    Image paths are relative to the file's folder (absolute ones stay).
    Every image must exist; up to ``check_up_to`` of them are also decoded
    up front (``stepkit.data.unreadable_image``).

    Args:
        path: The pairs file.
        image_column: The column (JSON key) holding the image path.
        text_column: The column (JSON key) holding the caption.
        negative_columns: Columns of hard-negative captions (texts that describe no image of the row).
        skip_unreadable: Leave out rows with a missing or unreadable image or an empty caption (listed in
            ``skipped``) instead of stopping.
        flag: The CLI flag named in errors.
        check_up_to: Decode every image up front when there are at most this many.

    Returns:
        ``Pairs``.

    Raises:
        ValueError: naming the file (and the row) and the flag, for a missing or unknown file, a missing
            column, a malformed row, an empty caption, a missing or unreadable image, or no pairs left.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(folder / "a.png")
        >>> _ = (folder / "pairs.csv").write_text("filepath,title\\na.png,a black square\\n")
        >>> pairs = read_pairs(folder / "pairs.csv")
        >>> pairs.texts, pairs.images[0] == folder / "a.png"
        (['a black square'], True)
        >>> _ = (folder / "bad.csv").write_text("filepath,title\\nb.png,a cat\\n")
        >>> try:
        ...     read_pairs(folder / "bad.csv")
        ... except ValueError as err:
        ...     print(str(err).replace(str(folder), "DIR").split(";")[0])
        DIR/bad.csv:2: image 'b.png' not found (DIR/b.png)
    """
    from stepkit.data.folders import unreadable_image

    path = Path(path)
    kind = _file_kind(path, flag)
    columns = (image_column, text_column, *negative_columns)
    images, texts, negatives, skipped = [], [], [], []
    hint = "; pass --data.skip-unreadable to skip such rows"
    for where, record in _rows(path, kind, columns, flag):
        label = f"{path}:{where.split()[-1]}" if kind != "parquet" else f"{path} ({where})"
        image, text = record[image_column], record[text_column]
        problem = None
        empty = [c for c in columns[1:] if not isinstance(record[c], str) or not record[c].strip()]
        if empty:
            problem = f"{label}: empty caption (column {empty[0]!r})"
        elif not isinstance(image, str) or not image.strip():
            problem = f"{label}: no image path (column {image_column!r})"
        else:
            file = path.parent / image
            if not file.is_file():
                problem = f"{label}: image {image!r} not found ({file})"
        if problem is not None:
            if not skip_unreadable:
                raise ValueError(problem + hint)
            skipped.append(problem)
            continue
        images.append(file)
        texts.append(text)
        negatives.append([record[c] for c in negative_columns])
    if len(images) <= check_up_to:
        readable = {}
        for file in images:
            if file not in readable:
                readable[file] = unreadable_image(file)
            if readable[file] is not None and not skip_unreadable:
                raise ValueError(f"{file}: {readable[file]} (from {path}){hint}")
        keep = [i for i, file in enumerate(images) if readable[file] is None]
        skipped += [f"{images[i]}: {readable[images[i]]}" for i in range(len(images)) if readable[images[i]]]
        images, texts = [images[i] for i in keep], [texts[i] for i in keep]
        negatives = [negatives[i] for i in keep]
    if not images:
        raise ValueError(f"{flag}={str(path)!r} is not allowed: it holds no usable pairs")
    ids = _first_seen_ids(images)
    return Pairs(images, texts, ids, skipped, path, negatives if negative_columns else [])


def read_text_pairs(path: str | os.PathLike, *, anchor_column: str = "anchor",
                    positive_column: str = "positive", negative_columns: tuple[str, ...] = (),
                    skip_unreadable: bool = False, flag: str = "data.pairs") -> TextPairs:
    """Read and check the text pairs of ``path`` (the formats of ``read_pairs``; sentence-transformers'
    column names by default), and the hard negatives of ``negative_columns`` (``negative_1`` ... as
    ``stepkit mine`` writes them): texts that answer no anchor of their row, each checked as a text.

    Raises:
        ValueError: naming the file, the row and the flag, for a missing column, a malformed row or an
            empty text (``skip_unreadable``: skipped and listed instead), or no pairs left.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
        >>> _ = path.write_text('{"anchor": "a cat?", "positive": "a feline"}\\n')
        >>> read_text_pairs(path).positives
        ['a feline']
    """
    path = Path(path)
    kind = _file_kind(path, flag)
    columns = (anchor_column, positive_column, *negative_columns)
    anchors, positives, negatives, skipped = [], [], [], []
    try:
        for where, record in _rows(path, kind, columns, flag):
            label = f"{path}:{where.split()[-1]}" if kind != "parquet" else f"{path} ({where})"
            empty = [c for c in columns if not isinstance(record[c], str) or not record[c].strip()]
            if empty:
                problem = f"{label}: empty text (column {empty[0]!r})"
                if not skip_unreadable:
                    raise ValueError(problem + "; pass --data.skip-unreadable to skip such rows")
                skipped.append(problem)
                continue
            anchors.append(record[anchor_column])
            positives.append(record[positive_column])
            if negative_columns:
                negatives.append([record[c] for c in negative_columns])
    except ValueError as err:  # name the text-pair flags, not the image ones
        named = str(err).replace(".image-column", ".anchor-column")
        raise ValueError(named.replace(".text-column", ".positive-column")) from None
    if not anchors:
        raise ValueError(f"{flag}={str(path)!r} is not allowed: it holds no usable pairs")
    ids = _first_seen_ids(positives)
    return TextPairs(anchors, positives, ids, skipped, path, negatives)


AnyPairs = TypeVar("AnyPairs", Pairs, TextPairs)


def split_pairs(pairs: AnyPairs, fraction: float, seed: int) -> tuple[AnyPairs, AnyPairs]:
    """A seeded held-out split by id (image, or positive text): about ``fraction`` of them, with all
    their pairs (``Pairs`` or ``TextPairs``).

    Examples:
        >>> pairs = Pairs([Path(f"{i}.jpg") for i in range(10)], [f"t{i}" for i in range(10)],
        ...               list(range(10)))
        >>> train, held = split_pairs(pairs, 0.2, seed=0)
        >>> len(train), len(held), set(train.ids) & set(held.ids)
        (8, 2, set())
    """
    _check.in_range("data.val_fraction", fraction, 0.0, 1.0)
    images = sorted(set(pairs.ids))
    held = max(1, round(fraction * len(images)))
    if held >= len(images):
        _check.fail("data.val_fraction", fraction,
                    f"a fraction that leaves training images ({len(images)} in {pairs.source})")
    chosen = set(numpy_rng(seed, "held-out split").permutation(images)[:held].tolist())
    rows = range(len(pairs))
    return (pairs.select(i for i in rows if pairs.ids[i] not in chosen),
            pairs.select(i for i in rows if pairs.ids[i] in chosen))

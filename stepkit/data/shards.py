"""Tar shards in the WebDataset layout, streamed across ranks and DataLoader workers, resumable to the sample.

A shard is a tar (or a gzip-compressed tar) whose consecutive members
sharing a key form one sample (``000123.jpg``, ``000123.txt``,
``000123.json``, ``000123.cls``: the key is the member's path up to the
first dot of its file name), as
img2dataset and webdataset write them. A shard list is a brace pattern
(``data/{00000..00127}.tar``, expanded by ``braceexpand``).

Why not an engine (compared 2026-12, the package index's versions): webdataset
1.0.2 reads these shards but keeps no reading position (its maintainers
recommend resampling instead: webdataset #177, #234, #271); mosaicml-streaming
0.13 and litdata 0.2 resume mid-epoch exactly but only from their own formats
(MDS, litdata chunks), so a tar set would be converted first; Hugging Face
``datasets``' webdataset loader with torchdata's ``StatefulDataLoader``
resumes at shard granularity, and a shuffle buffer's contents are not saved.
The reading itself needs no engine: stepkit reads the tar headers (ustar, GNU
and pax) straight from the file; the standard library's ``tarfile`` builds an
object per member and took 0.06 ms a sample to read a shard of 500 x 375 JPEGs
where this takes 0.02 ms (2026-12, a 2-core EPYC, from the page cache).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stepkit import check as _check

__all__ = ["ShardError", "expand_shards", "shard_samples", "check_readers", "image_field", "text_field",
           "class_field"]


_KEY = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")


class ShardError(ValueError):
    """A shard that cannot be read as a tar of samples; the message names the shard and member.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "0.tar"
        >>> _ = path.write_bytes(b"not a tar" * 100)
        >>> try:
        ...     list(shard_samples(path))
        ... except ShardError as err:
        ...     print(str(err).split(" (")[0].replace(str(path), "0.tar"))
        0.tar: cut off or not a tar shard at its start
    """


def expand_shards(pattern: str, *, flag: str = "data.shards") -> list[Path]:
    """The shard files a brace pattern names, in order; every one must exist.

    Args:
        pattern: ``"d/{0000..0003}.tar"``, ``"d/{a,b}.tar"`` or one path.
        flag: The CLI flag named in errors.

    Raises:
        ValueError: naming ``flag``, for a pattern that matches no file or names missing files.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     _ = (d / f"{i:04d}.tar").write_bytes(b"")
        >>> [p.name for p in expand_shards(str(d / "{0000..0002}.tar"))]
        ['0000.tar', '0001.tar', '0002.tar']
    """
    from braceexpand import braceexpand

    paths = [Path(p) for p in braceexpand(str(pattern))]
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        raise ValueError(
            f"{flag}={pattern!r} is not allowed: it matches no file (the first it names: "
            f"{str(paths[0])!r}); expected tar shards, e.g. 'data/{{0000..0127}}.tar'"
        )
    if missing:
        raise ValueError(
            f"{flag}={pattern!r} is not allowed: {len(missing)} of its {len(paths)} shards do not "
            f"exist (first: {str(missing[0])!r})"
        )
    return paths


def shard_samples(
    path: str | os.PathLike, *, start: int = 0, flag: str = "data.shards"
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(sample number, key, {extension: bytes})`` for each sample of a shard, from sample ``start``.

    Members before ``start`` are passed over by their headers (not read).
    Members whose names have no extension, and directories, are ignored. A
    gzip-compressed shard (``.tar.gz``, ``.tgz``) is read as it is decompressed.

    Raises:
        ShardError: naming the shard, the member and ``flag``, for a file that is not a tar or is cut off
            (a tar without its end-of-archive blocks counts as cut off).

    Examples:
        >>> import io, tarfile, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "0.tar"
        >>> with tarfile.open(path, "w") as tar:
        ...     for name, data in [("a.jpg", b"1"), ("a.txt", b"cat"), ("b.jpg", b"2"), ("b.txt", b"dog")]:
        ...         info = tarfile.TarInfo(name); info.size = len(data)
        ...         tar.addfile(info, io.BytesIO(data))
        >>> [(n, key, fields["txt"]) for n, key, fields in shard_samples(path)]
        [(0, 'a', b'cat'), (1, 'b', b'dog')]
        >>> [key for _, key, _ in shard_samples(path, start=1)]
        ['b']
    """
    path = Path(path)
    number, key, member = -1, None, "the first member"
    fields: dict[str, bytes] = {}
    try:
        with _open_shard(path) as file:
            for name, size in (members := _TarFiles(file)):
                match = _KEY.match(name)
                if match is None:
                    continue
                member = name
                name, ext = match.groups()
                if name != key:
                    if number >= start and key is not None:
                        yield number, key, fields
                    number, key, fields = number + 1, name, {}
                if number >= start:
                    data = file.read(size)
                    if len(data) != size:
                        raise tarfile.ReadError("unexpected end of data")
                    fields[ext.lower()] = data
            if not members.complete:  # one zero block and no more: the file stops early
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        where = f"after member {member!r}" if key is not None else "at its start"
        raise ShardError(
            f"{path}: cut off or not a tar shard {where} ({err}); from --{flag.replace('_', '-')} "
            "(pass --data.skip-unreadable to skip what cannot be read)"
        ) from None
    if key is not None and number >= start:
        yield number, key, fields


_BLOCK = 512


_ZEROS = bytes(_BLOCK)


_COMPRESSED = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


_REGULAR = (b"0", b"\0", b"7")  # a file, an old-style file, a contiguous file


_POSIX = b"ustar\x00"


def _open_shard(path: Path) -> Any:
    """The shard as a binary file: as it is, or decompressed as it is read when gzip-compressed."""
    file = open(path, "rb")
    magic = file.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        file.close()
        return gzip.open(path, "rb")
    for signature, name in _COMPRESSED.items():
        if magic.startswith(signature):
            file.close()
            raise tarfile.ReadError(f"compressed with {name}: decompress it first (stepkit reads tar and "
                                    "gzip-compressed tar shards)")
    return file


class _TarFiles:
    """``(name, size)`` of each regular file in a tar, the file positioned at its data; ``complete``, once
    done: whether the end-of-archive blocks are whole.

    The member headers are read straight from the file (``tarfile`` builds a ``TarInfo`` object per
    member: three times the reading time). ustar, GNU long names and pax headers are followed (the path
    and size they set); the header checksum is checked.
    """

    def __init__(self, file: Any) -> None:
        self.file, self.complete = file, False

    def __iter__(self) -> Iterator[tuple[str, int]]:
        file, offset, long_name, pax = self.file, 0, None, {}
        while True:
            file.seek(offset)
            header = file.read(_BLOCK)
            if len(header) < _BLOCK:
                raise tarfile.ReadError("empty file" if offset == 0 and not header else "truncated header")
            if header == _ZEROS:
                self.complete = len(file.read(_BLOCK)) == _BLOCK
                return
            size, kind = _header_size(header), header[156:157]
            data = offset + _BLOCK
            offset = data + -(-size // _BLOCK) * _BLOCK
            if kind in (b"L", b"K", b"x", b"g"):  # about the next member (GNU long names, pax) or all
                meta = file.read(size)
                if len(meta) != size:
                    raise tarfile.ReadError("unexpected end of data")
                if kind == b"L":
                    long_name = meta.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(meta)
                continue
            if kind not in _REGULAR:
                long_name, pax = None, {}
                continue
            name = pax.get("path") or long_name or _header_name(header)
            if "size" in pax:
                size = int(pax["size"]) if pax["size"].isdigit() else -1
                if size < 0:
                    raise tarfile.ReadError("invalid pax size")
                offset = data + -(-size // _BLOCK) * _BLOCK
            long_name, pax = None, {}
            if not name.endswith("/"):  # an old-style directory
                yield name, size


def _header_size(header: bytes) -> int:
    """A tar header's member size, after checking its checksum (ReadError for a block that is no header)."""
    try:
        stored = _number(header[148:156])
        size = _number(header[124:136])
    except ValueError:
        raise tarfile.ReadError("invalid header") from None
    if size < 0:  # a negative size would send the reader back over what it read
        raise tarfile.ReadError("invalid header")
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned and stored != sum(struct.unpack_from("148b8x356b", header)) + 8 * 32:
        raise tarfile.ReadError("bad checksum")  # (the second: writers that sum signed bytes)
    return size


def _number(field: bytes) -> int:
    """A header number: octal digits ending in NUL or space, or base-256 (GNU, for large sizes)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == _POSIX and header[345] != 0:  # ustar keeps a long path's directories apart
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(meta: bytes) -> dict[str, str]:
    """A pax header's ``"LEN key=value\\n"`` records."""
    records: dict[str, str] = {}
    at = 0
    while at < len(meta) and meta[at:at + 1] != b"\0":
        length = meta[at:at + 20].partition(b" ")[0]
        try:
            end = at + int(length)
        except ValueError:
            end = at
        if end <= at + len(length) + 1 or end > len(meta):
            raise tarfile.ReadError("invalid pax header")
        key, _, value = meta[at + len(length) + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at = end
    return records


def check_readers(shards: int, *, world: int, workers: int) -> None:
    """Refuse more readers (ranks x DataLoader workers) than shards: each reads shards of its own.

    Examples:
        >>> check_readers(8, world=2, workers=4)
        >>> try:
        ...     check_readers(3, world=2, workers=2)
        ... except ValueError as err:
        ...     print(str(err).split(" (")[0])
        data.workers=2 is not allowed: expected at most 1 with 3 shards over 2 ranks
    """
    if shards < world * max(1, workers):
        most = max(1, shards // world)
        _check.fail("data.workers", workers, f"at most {most} with {shards} shards over {world} ranks (every "
                    "worker reads shards of its own; or write the data into more shards)")


def _member(fields: dict[str, bytes], names: Sequence[str], where: str, what: str) -> tuple[str, bytes]:
    for name in names:
        if name in fields:
            return name, fields[name]
    raise ValueError(
        f"{where}: no {what} member (expected one of {', '.join('.' + n for n in names)}; "
        f"found {', '.join('.' + n for n in sorted(fields)) or 'none'})"
    )


def image_field(fields: dict[str, bytes], where: str) -> bytes:
    """A sample's image bytes (``.jpg``, ``.png``, ``.webp``, ...); ValueError naming it if none.

    Examples:
        >>> image_field({"png": b"...", "txt": b"a cat"}, "s.tar:a")
        b'...'
    """
    return _member(fields, ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"), where, "image")[1]


def text_field(fields: dict[str, bytes], where: str, *, json_key: str = "caption") -> str:
    """A sample's text: ``.txt``, else ``json_key`` of ``.json``; ValueError naming it if none or empty.

    Examples:
        >>> text_field({"json": b'{"caption": "a dog"}'}, "s.tar:a")
        'a dog'
    """
    if "txt" in fields:
        text = fields["txt"].decode("utf-8", errors="replace")
    elif "json" in fields:
        try:
            text = str(json.loads(fields["json"]).get(json_key, ""))
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{where}.json: not a JSON object with {json_key!r} ({err})") from None
    else:
        _member(fields, ("txt", "json"), where, "text")
    if not text.strip():
        raise ValueError(f"{where}: empty caption")
    return text


def class_field(fields: dict[str, bytes], where: str) -> int:
    """A sample's class from ``.cls`` (an integer), or -1 when it has none.

    Examples:
        >>> class_field({"cls": b"7\\n"}, "s.tar:a"), class_field({}, "s.tar:a")
        (7, -1)
    """
    if "cls" not in fields:
        return -1
    try:
        return int(fields["cls"].decode().strip())
    except ValueError:
        raise ValueError(f"{where}.cls: not an integer class ({fields['cls'][:20]!r})") from None

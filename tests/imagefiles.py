"""Image files the tests write: photo-sized JPEGs and PNGs of several sizes and aspects, in folders or shards.

Class ``c`` of ``CLASSES`` is a shape drawn at a random place and size on a
noisy background, so a probe can tell the classes apart only by content.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "bar", "cross")
SIZES = ((160, 120), (120, 160), (200, 150), (96, 96))


def picture(label: int, rng: np.random.Generator, size: tuple[int, int] | None = None) -> Image.Image:
    w, h = size or SIZES[int(rng.integers(len(SIZES)))]
    pixels = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    side = int(min(w, h) * rng.uniform(0.4, 0.7))
    x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
    colour = tuple(int(v) for v in rng.integers(150, 256, 3))
    if label == 0:
        draw.ellipse((x, y, x + side, y + side), fill=colour)
    elif label == 1:
        draw.rectangle((x, y + side // 3, x + side, y + 2 * side // 3), fill=colour)
    else:
        draw.rectangle((x + side // 3, y, x + 2 * side // 3, y + side), fill=colour)
        draw.rectangle((x, y + side // 3, x + side, y + 2 * side // 3), fill=colour)
    return image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_folder(
    root: Path, per_class: int, *, seed: int = 0, labelled: bool = True, nested: bool = False
) -> list[Path]:
    """``root/<class>/<i>.jpg`` (labelled), or the same images flat (``nested``: half in sub-folders)."""
    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
            if labelled:
                path = root / name / f"{i}.{ext}"
            elif nested and i % 2:
                path = root / f"trip{i % 3}" / f"{name}_{i}.{ext}"
            else:
                path = root / f"{name}_{i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded(picture(label, rng), fmt))
            paths.append(path)
    return paths


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int, per_shard: int, *, seed: int = 0, captions: bool = True,
                 negatives: int = 0) -> str:
    """``folder/{0000..}.tar`` of ``key.jpg`` + ``key.cls`` (+ ``key.txt``, + ``key.json`` holding
    ``negative_1 ...``: the captions of the next classes); returns the brace pattern."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                label = int(rng.integers(len(CLASSES)))
                key = f"{s:04d}{i:05d}"
                add_member(tar, f"{key}.jpg", encoded(picture(label, rng), "JPEG"))
                add_member(tar, f"{key}.cls", str(label).encode())
                if captions:
                    add_member(tar, f"{key}.txt", f"a {CLASSES[label]} on a grey background".encode())
                if negatives:
                    others = {f"negative_{j}": f"a {CLASSES[(label + j) % len(CLASSES)]} on a grey background"
                              for j in range(1, negatives + 1)}
                    add_member(tar, f"{key}.json", json.dumps(others).encode())
    return str(folder / f"{{0000..{shards - 1:04d}}}.tar")


def write_pairs(folder: Path, per_class: int, fmt: str = "csv", *, seed: int = 0,
                columns: tuple[str, str] = ("filepath", "title")) -> Path:
    """``folder/images/*.jpg`` and ``folder/pairs.<fmt>`` (csv, tsv, jsonl, parquet): one caption per image,
    naming its shape and where it is; image paths relative to the pairs file."""
    import csv
    import json

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            image = picture(label, rng)
            path = f"images/{name}_{i}.jpg"
            (folder / path).write_bytes(encoded(image, "JPEG"))
            rows.append({columns[0]: path, columns[1]: f"a {name} in a {image.width}x{image.height} picture"})
    out = folder / f"pairs.{fmt}"
    if fmt in ("csv", "tsv"):
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), out)
    return out


def write_text_pairs(folder: Path, n: int, fmt: str = "jsonl", *, seed: int = 0) -> Path:
    """``folder/qa.<fmt>``, ``anchor`` / ``positive`` rows: a question on a shape and a colour, its answer."""
    import csv
    import json

    rng = np.random.default_rng(seed)
    colours = ("red", "green", "blue", "yellow")
    rows = []
    for i in range(n):
        shape, colour = CLASSES[i % 3], colours[int(rng.integers(4))]
        rows.append({"anchor": f"which {colour} thing is a {shape}?",
                     "positive": f"the {shape} painted {colour}"})
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"qa.{fmt}"
    if fmt == "jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["anchor", "positive"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def write_tiny_text_model(folder: Path) -> str:
    """A Hugging Face BERT folder with MiniLM's tokenizer and a 1-layer, 16-wide encoder drawn at random:
    what ``--model.text FOLDER`` reads, at a fraction of MiniLM's cost (for tests of plumbing, not
    learning)."""
    import torch
    import transformers

    from stepkit.models.text import minilm_path

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=64)
        transformers.BertModel(config).save_pretrained(folder)
        transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return str(folder)

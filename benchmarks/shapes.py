"""An image set unlike the digits, drawn offline: shapes of random colour, size and place on photo-sized
canvases (issue #45's second image set), as class-per-folder PNG files the recipes read.

Four classes (disc, square, triangle, star); each image is one shape, filled with a random colour, its
diameter 30-80 % of the canvas's shorter side, at a random place and turn, on a background of another
random colour with a little noise. Where the shape is and what colour it has carry no label, so raw
pixels say little (the script prints a k-NN on them, the recipes' k = 20, cosine): a network must learn
shape to beat chance.

    python benchmarks/shapes.py --out data/shapes                  # 400 train + 100 val images a class
    python recipes/dino.py --run-dir runs/shapes --data.root data/shapes/train \\
        --eval.train-root data/shapes/train --eval.val-root data/shapes/val

Writes ``OUT/train/<class>/<i>.png`` and ``OUT/val/<class>/<i>.png``; prints the raw-pixel k-NN.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

CLASSES = ("disc", "square", "triangle", "star")
PER_CLASS, VAL_PER_CLASS, SIZE = 400, 100, (160, 120)  # train and val images a class; width x height


def outline(kind: str, centre: tuple[float, float], radius: float, turn: float) -> list[tuple[float, float]]:
    """The polygon of a shape (a disc as 48 points), turned by ``turn`` radians."""
    corners = {"disc": 48, "square": 4, "triangle": 3, "star": 10}[kind]
    points = []
    for i in range(corners):
        angle = turn + 2 * math.pi * i / corners
        r = radius * (0.45 if kind == "star" and i % 2 else 1.0)  # a star's inner corners
        points.append((centre[0] + r * math.cos(angle), centre[1] + r * math.sin(angle)))
    return points


def draw(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One ``(height, width, 3)`` uint8 image of ``kind``."""
    from PIL import Image, ImageDraw

    width, height = size
    background, fill = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(background.astype(int) - fill.astype(int)).sum() < 150:  # the shape must show
        fill = rng.integers(0, 256, 3)
    image = Image.new("RGB", size, tuple(int(v) for v in background))
    radius = rng.uniform(0.15, 0.4) * min(size)  # a diameter of 30-80 % of the shorter side
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    ImageDraw.Draw(image).polygon(outline(kind, centre, radius, rng.uniform(0, 2 * math.pi)),
                                  fill=tuple(int(v) for v in fill))
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def write_shapes(out: Path, *, per_class: int = PER_CLASS, val_per_class: int = VAL_PER_CLASS,
                 size: tuple[int, int] = SIZE, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for kind in CLASSES:
            folder = out / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw(kind, rng, size)).save(folder / f"{i}.png")


def pixel_knn(out: Path, k: int = 20, side: int = 32) -> float:
    """k-NN (cosine, majority of ``k``) of the val images on the train images' raw pixels at ``side`` px."""
    from PIL import Image

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows, labels = [], []
        for label, kind in enumerate(CLASSES):
            for path in sorted((out / split / kind).glob("*.png")):
                pixels = np.asarray(Image.open(path).convert("RGB").resize((side, side)), dtype=np.float32)
                rows.append(pixels.ravel() - pixels.mean())
                labels.append(label)
        x = np.stack(rows)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8), np.array(labels)

    (train, train_y), (val, val_y) = read("train"), read("val")
    nearest = np.argsort(-(val @ train.T), axis=1)[:, :k]
    votes = np.stack([(train_y[nearest] == c).sum(1) for c in range(len(CLASSES))], 1)
    return float((votes.argmax(1) == val_y).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS)
    parser.add_argument("--size", type=int, nargs=2, default=SIZE, metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_shapes(args.out, per_class=args.per_class, val_per_class=args.val_per_class,
                 size=tuple(args.size), seed=args.seed)
    print(f"wrote {args.out}: {len(CLASSES)} classes ({', '.join(CLASSES)}), {args.per_class} train and "
          f"{args.val_per_class} val images each; raw-pixel k-NN {pixel_knn(args.out):.3f} "
          f"(chance {1 / len(CLASSES):.2f})")


if __name__ == "__main__":
    main()

"""benchmarks/shapes.py: the offline image set of issue #45 (class folders of PNGs) and its raw-pixel k-NN."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import CLASSES, draw, pixel_knn, write_shapes  # noqa: E402


def read_all(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_writes_each_class_folder_with_its_counts_and_size_the_same_for_a_seed(tmp_path):
    write_shapes(tmp_path / "a", per_class=3, val_per_class=2, size=(40, 30), seed=1)
    write_shapes(tmp_path / "b", per_class=3, val_per_class=2, size=(40, 30), seed=1)
    write_shapes(tmp_path / "c", per_class=3, val_per_class=2, size=(40, 30), seed=2)
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (tmp_path / "a" / split).iterdir()) == sorted(CLASSES)
        for kind in CLASSES:
            assert len(list((tmp_path / "a" / split / kind).glob("*.png"))) == count
    a, b, c = (read_all(tmp_path / name) for name in "abc")
    assert {im.shape for im in a.values()} == {(30, 40, 3)}  # height, width, RGB
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_a_square_stands_out_from_its_background_at_its_drawn_size():
    for seed in range(5):
        image = draw("square", np.random.default_rng(seed), (64, 48)).astype(int)
        corners = [image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]
        background = np.median(corners, axis=0)
        away = np.abs(image - background).sum(-1) > 100  # colours >= 150 apart, the noise +-12 a channel
        # a square of diagonal 30-80 % of 48 px: 2 r^2 with r in 7.2..19.2 px, of 64 x 48
        assert 2 * 7.2**2 / 3072 * 0.8 < away.mean() < 2 * 19.2**2 / 3072 * 1.2


def test_pixel_knn_is_one_where_each_class_has_its_own_pattern_and_chance_where_none_does(tmp_path):
    rng = np.random.default_rng(0)

    def write(root: Path, pattern) -> None:
        for split, count in (("train", 25), ("val", 5)):
            for c, kind in enumerate(CLASSES):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    Image.fromarray(pattern(c)).save(root / split / kind / f"{i}.png")

    def stripe(c: int) -> np.ndarray:  # a bright band whose place is the class
        image = rng.integers(0, 40, (32, 32, 3))
        image[:, 8 * c:8 * c + 8] += 200
        return image.astype(np.uint8)

    write(tmp_path / "striped", stripe)
    assert pixel_knn(tmp_path / "striped") == 1.0
    shared = [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(4)]
    write(tmp_path / "same", lambda c: shared[rng.integers(4)])  # the class is not in the pixels
    assert pixel_knn(tmp_path / "same") < 0.6

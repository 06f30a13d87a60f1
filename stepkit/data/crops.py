"""Training crops and evaluation views of one image.


Training crops are drawn on the full-resolution image in DataLoader workers
(``read_crops``): each crop's box has an area fraction in ``scale`` of the
*image's* area and a width / height in ``ratio`` (torchvision's
``RandomResizedCrop`` rule: ten tries, then the largest centred box of an
allowed aspect), and is resampled with an antialiased bicubic filter.
A JPEG is decoded at the coarsest scale (1/2, 1/4, 1/8, Pillow's draft mode)
that still leaves every crop at least its output size, so a large photo
costs little more to read than a small one.

The crops of a sample come from its own generator, seeded by the run's seed,
the epoch and the sample (``sample_rng``): the same seed gives the same crops
in any number of workers, and a resumed run draws them again exactly.
The photometric augmentations run afterwards on the device (``stepkit.augment``).

Evaluation images are deterministic (``center_view``): the shorter side
resized, then the centre square cut, as the field evaluates.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepkit import check as _check
from stepkit.seeds import numpy_rng

__all__ = ["CropPlan", "crop_box", "sample_rng", "read_crops", "center_view"]


@dataclass(frozen=True)
class CropPlan:
    """The crops a training sample yields: one ``(size, scale)`` per view, drawn on the full image.

    Examples:
        >>> dino = CropPlan(views=((224, (0.4, 1.0)),) * 2 + ((96, (0.05, 0.4)),) * 8)
        >>> len(dino.views), dino.ratio
        (10, (0.75, 1.3333333333333333))
    """

    views: tuple[tuple[int, tuple[float, float]], ...]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("a CropPlan needs at least one view")
        for size, (low, high) in self.views:
            _check.integer_at_least("crop size", size, 1)
            if not 0 < low <= high <= 1:
                _check.fail("crop scale", (low, high), "(low, high) with 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            _check.fail("crop ratio", self.ratio, "(low, high) with 0 < low <= high")


def sample_rng(seed: int, epoch: int, *sample: int) -> np.random.Generator:
    """The generator of one sample's crops in one epoch: the same numbers in any worker and on resume.

    Examples:
        >>> sample_rng(0, 1, 7).random() == sample_rng(0, 1, 7).random() != sample_rng(0, 2, 7).random()
        True
    """
    return numpy_rng(seed, "crops", epoch, *sample)


def crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random crop ``(left, top, w, h)`` of a ``width x height`` image, as torchvision's
    ``RandomResizedCrop`` draws it.

    Up to ten tries of an area ``uniform(scale) * width * height`` and an
    aspect ``w / h`` log-uniform in ``ratio``; the first box that fits is
    placed uniformly. If none fits, the largest centred box whose aspect is
    clamped into ``ratio``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> left, top, w, h = crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        >>> 0 <= left <= 500 - w and 0 <= top <= 375 - h and 0.08 * 500 * 375 <= w * h * 1.05
        True
        >>> crop_box(100, 10, (1.0, 1.0), (1.0, 1.0), rng)  # no square of the whole area fits
        (45, 0, 10, 10)
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _open(source: str | os.PathLike | bytes):
    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _to_tensor(image) -> Any:
    import torch

    w, h = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(h, w, 3).permute(2, 0, 1).contiguous()


def read_crops(source: str | os.PathLike | bytes, plan: CropPlan, rng: np.random.Generator) -> list[Any]:
    """Decode an image once and cut ``plan``'s crops from it: a list of ``uint8 (3, size, size)`` tensors.

    The boxes are drawn from the header's size before decoding, so a JPEG is
    decoded at the coarsest power-of-two reduction that keeps every box at
    least its output size (Pillow's draft mode). Each box is resampled to its
    size with an antialiased bicubic filter (torch's ``interpolate(...,
    antialias=True)`` on uint8: Pillow's ``resize`` filter, to a twentieth of a
    level on average on photos, but vectorised, about twice as fast here; see
    ``benchmarks/data.py --case files``) and mirrored left-right with
    ``plan.flip_p``.

    Args:
        source: A path, or the file's bytes (a shard member).
        plan: The views.
        rng: This sample's generator (``sample_rng``).

    Raises:
        OSError, ValueError, SyntaxError: from Pillow, for a file it cannot decode.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "photo.jpg"
        >>> Image.new("RGB", (500, 375), "red").save(path)
        >>> plan = CropPlan(views=((32, (0.4, 1.0)), (16, (0.05, 0.4))))
        >>> [tuple(c.shape) for c in read_crops(path, plan, sample_rng(0, 0, 0))]
        [(3, 32, 32), (3, 16, 16)]
    """
    import torch
    import torch.nn.functional as F

    with _open(source) as image:
        width, height = image.size
        boxes = [crop_box(width, height, scale, plan.ratio, rng) for _, scale in plan.views]
        flips = [rng.random() < plan.flip_p for _ in plan.views]
        # the smallest box-to-output ratio over the views bounds the reduction the decoder may use
        shrink = min(min(w, h) / size for (_, _, w, h), (size, _) in zip(boxes, plan.views))
        if image.format == "JPEG" and shrink >= 2:
            image.draft(image.mode, (math.ceil(width / shrink), math.ceil(height / shrink)))
        rx, ry = image.size[0] / width, image.size[1] / height
        pixels = torch.from_numpy(np.array(_rgb(image)))  # (h, w, 3)
    image = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last in memory: the fast path
    crops = []
    for (left, top, w, h), (size, _), flip in zip(boxes, plan.views, flips):
        x0, y0 = math.floor(left * rx), math.floor(top * ry)
        x1, y1 = max(x0 + 1, math.ceil((left + w) * rx)), max(y0 + 1, math.ceil((top + h) * ry))
        crop = F.interpolate(image[:, :, y0:y1, x0:x1], size=(size, size), mode="bicubic", antialias=True)[0]
        crops.append((crop.flip(-1) if flip else crop).contiguous())
    return crops


def _rgb(image: Any) -> Any:
    # convert("RGB") copies an image that already is RGB (a tenth of a millisecond a photo)
    return image if image.mode == "RGB" else image.convert("RGB")


def center_view(source: str | os.PathLike | bytes, size: int, resize: int | None = None) -> Any:
    """An evaluation image: the shorter side resized to ``resize`` (antialiased bicubic), the centre
    ``size x size`` square cut; ``uint8 (3, size, size)``.

    Args:
        source: A path, or the file's bytes.
        size: The side of the square returned.
        resize: The shorter side before the cut (None: ``size``; the field's 256 for 224 is ``size / 0.875``).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "wide.png"
        >>> Image.new("RGB", (80, 40)).save(path)
        >>> tuple(center_view(path, 28, resize=32).shape)
        (3, 28, 28)
    """
    from PIL import Image

    resize = resize or size
    with _open(source) as image:
        width, height = image.size
        scale = resize / min(width, height)
        w, h = max(resize, round(width * scale)), max(resize, round(height * scale))
        if image.format == "JPEG":
            image.draft("RGB", (w, h))
        image = _rgb(image).resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(image.crop((left, top, left + size, top + size)))

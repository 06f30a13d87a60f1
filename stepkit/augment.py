"""Image augmentations as batched tensor ops that run where the images are (CPU or GPU).

Every function takes a batch ``(B, C, H, W)`` of images in [0, 1] and a
``torch.Generator`` (on the CPU) from which it draws each sample's own
parameters, so a seed fixes the result and no per-image Python loop runs.
torchvision is not needed. Differences from torchvision's transforms, by
design: a resized crop whose box would not fit is clamped to the image
instead of retried, resampling is bilinear without antialiasing, and colour
jitter applies brightness, contrast, saturation, hue in that fixed order
(hue as a rotation of the chroma plane in YIQ space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stepkit import check as _check

__all__ = ["random_resized_crop", "color_jitter", "random_grayscale", "gaussian_blur", "solarize",
           "MultiCrop", "multi_crop", "view_colors", "to_unit", "normalize"]


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` uniform draws on the host: a few numbers per image, the same on every device."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator is on {generator.device}; the augmentations draw their per-image parameters "
            "on the host: pass a CPU torch.Generator (the images may be on any device)"
        )
    return torch.rand(n, generator=generator)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * _rand(n, generator)


def _chance(n: int, p: float, generator: torch.Generator | None) -> Tensor:
    return _rand(n, generator) < p


def random_resized_crop(
    images: Tensor,
    size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random crop per image (area fraction in ``scale``, aspect in ``ratio``), resized to ``size``,
    mirrored left-right with probability ``flip_p``; one ``grid_sample`` for the batch.

    Args:
        images: ``(B, C, H, W)`` floats.
        size: The output side.
        scale: The crop's area as a fraction of the image's, drawn per image.
        ratio: The crop's width / height, log-uniform per image.
        flip_p: The chance of a left-right mirror.
        generator: The draw.

    Returns:
        ``(B, C, size, size)``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_resized_crop(torch.rand(2, 3, 32, 32), 16, generator=g).shape
        torch.Size([2, 3, 16, 16])
    """
    b, _, h, w = images.shape
    area = _uniform(b, *scale, generator)
    aspect = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator))
    crop_w = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # as fractions of the width / height
    crop_h = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    cx = crop_w / 2 + (1 - crop_w) * _rand(b, generator)
    cy = crop_h / 2 + (1 - crop_h) * _rand(b, generator)
    flip = torch.where(_chance(b, flip_p, generator), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, 2 * cy - 1
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(images: Tensor) -> Tensor:
    if images.shape[1] == 1:
        return images
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def color_jitter(
    images: Tensor,
    *,
    p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """With probability ``p`` per image: brightness, contrast, saturation (factors in ``1 ± x``) and
    hue (shift in ``± hue`` turns); saturation and hue only for 3-channel images.

    Args:
        images: ``(B, C, H, W)`` in [0, 1].
        p: The chance an image is jittered.
        brightness: Brightness factors in ``1 ± brightness``.
        contrast: Contrast factors in ``1 ± contrast``.
        saturation: Saturation factors in ``1 ± saturation`` (3 channels).
        hue: Hue shifts in ``± hue`` turns (3 channels).
        generator: The draw.

    Returns:
        The jittered images, clamped to [0, 1].

    Examples:
        >>> out = color_jitter(torch.rand(2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
        >>> out.shape, bool(out.min() >= 0 and out.max() <= 1)
        (torch.Size([2, 3, 4, 4]), True)
    """
    b = images.shape[0]
    on = _chance(b, p, generator)

    def factor(x: float) -> Tensor:
        f = _uniform(b, max(0.0, 1 - x), 1 + x, generator)
        return torch.where(on, f, torch.ones(b)).to(images).view(b, 1, 1, 1)

    f_bright, f_contrast, f_sat = factor(brightness), factor(contrast), factor(saturation)
    shift = torch.where(on, _uniform(b, -hue, hue, generator), torch.zeros(b)).to(images)
    x = (images * f_bright).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f_contrast + mean).clamp(0, 1)
    if images.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * f_sat + gray).clamp(0, 1)
        x = _rotate_hue(x, shift).clamp(0, 1)
    return x


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: Tensor, turns: Tensor) -> Tensor:
    to_yiq = _RGB_TO_YIQ.to(x)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = 2 * math.pi * turns.view(-1, 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def random_grayscale(images: Tensor, *, p: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Replace an image by its luminance (all channels) with probability ``p``.

    Args:
        images: ``(B, C, H, W)``.
        p: The chance per image.
        generator: The draw.

    Returns:
        The images, some grey in every channel.

    Examples:
        >>> grey = random_grayscale(torch.rand(1, 3, 2, 2), p=1.0)
        >>> torch.allclose(grey[:, 0], grey[:, 2])
        True
    """
    on = _chance(images.shape[0], p, generator).to(images.device).view(-1, 1, 1, 1)
    return torch.where(on, _gray(images).expand_as(images), images)


def gaussian_blur(
    images: Tensor,
    *,
    p: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Blur with probability ``p`` per image, ``sigma`` (pixels) drawn per image; separable, one
    grouped convolution per direction for the whole batch.

    Args:
        images: ``(B, C, H, W)``.
        p: The chance per image.
        sigma: ``(low, high)`` of the blur's sigma in pixels.
        generator: The draw.

    Returns:
        The images, some blurred.

    Examples:
        >>> x = torch.zeros(1, 1, 9, 9)
        >>> x[0, 0, 4, 4] = 1.0
        >>> blurred = gaussian_blur(x, p=1.0, sigma=(1.0, 1.0))
        >>> round(blurred.sum().item(), 4), bool(blurred[0, 0, 4, 4] < 1)  # mass kept, spread out
        (1.0, True)
    """
    b, c, h, w = images.shape
    on = _chance(b, p, generator)
    sigmas = _uniform(b, *sigma, generator)
    radius = max(1, min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-offsets.square() / (2 * sigmas.view(-1, 1).square()))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand(b, -1)
    kernels = torch.where(on.view(-1, 1), kernels, identity).to(images)
    weight = kernels.repeat_interleave(c, dim=0)  # (B*C, k): one kernel per image and channel
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), weight.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), weight.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def solarize(images: Tensor, *, p: float = 0.2, threshold: float = 0.5,
             generator: torch.Generator | None = None) -> Tensor:
    """With probability ``p`` per image, invert the pixels at or above ``threshold``.

    Args:
        images: ``(B, C, H, W)`` in [0, 1].
        p: The chance per image.
        threshold: Pixels at or above it become ``1 - x``.
        generator: The draw.

    Returns:
        The images, some solarised.

    Examples:
        >>> solarize(torch.tensor([[[[0.2, 0.9]]]]), p=1.0)
        tensor([[[[0.2000, 0.1000]]]])
    """
    on = _chance(images.shape[0], p, generator).to(images.device).view(-1, 1, 1, 1)
    return torch.where(on & (images >= threshold), 1.0 - images, images)


@dataclass
class MultiCrop:
    """DINO's multi-crop recipe: 2 global and ``local_crops`` local views per image.

    Examples:
        >>> cfg = MultiCrop(global_size=16, local_size=8, local_crops=2)
        >>> views = multi_crop(torch.rand(2, 3, 32, 32), cfg)
        >>> [tuple(v.shape) for v in views]
        [(2, 3, 16, 16), (2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 8, 8)]
    """

    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range, in pixels of every view (DINO's: the 96 px local views get the 224 px
    global views' sigma)."""
    blur_relative: bool = False
    """Scale blur_sigma by view side / 224 for views under 224 px (for tiny images, e.g. the CPU
    preset's 32 px digits, where 2 px would erase them)."""
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    """Blur probability for global view 1, global view 2, local views (DINO's)."""
    solarize_p: float = 0.2
    """Solarisation probability of global view 2 (DINO's; it erases white-on-black strokes)."""

    def __post_init__(self) -> None:
        _check.integer_at_least("global_size", self.global_size, 1)
        _check.integer_at_least("local_size", self.local_size, 1)
        _check.integer_at_least("local_crops", self.local_crops, 0)
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                _check.fail(name, getattr(self, name), "(low, high) with 0 < low <= high <= 1")
        for name in ("jitter_p", "grayscale_p", "solarize_p"):
            _check.in_range(name, getattr(self, name), 0.0, 1.0)
        for p in self.blur_p:
            _check.in_range("blur_p", p, 0.0, 1.0)


def multi_crop(images: Tensor, cfg: MultiCrop, generator: torch.Generator | None = None) -> list[Tensor]:
    """``2 + cfg.local_crops`` augmented views of a batch, global ones first (DINO's defaults:
    blur 1.0 / 0.1 / 0.5 and solarisation 0 / 0.2 / 0 for global 1 / global 2 / locals).

    Each view is a random resized crop (``random_resized_crop``) followed by
    ``view_colors``; views cropped elsewhere (from image files, in DataLoader
    workers) go through ``view_colors`` alone.

    Args:
        images: ``(B, C, H, W)`` in [0, 1].
        cfg: The views' settings.
        generator: The draw.

    Returns:
        ``2 + cfg.local_crops`` tensors, the global views first (see ``MultiCrop``'s example).

    Examples:
        >>> len(multi_crop(torch.rand(1, 3, 32, 32), MultiCrop(global_size=16, local_size=8, local_crops=3)))
        5
    """
    views = []
    for view in range(2 + cfg.local_crops):
        size, scale = (cfg.global_size, cfg.global_scale) if view < 2 else (cfg.local_size, cfg.local_scale)
        x = random_resized_crop(images, size, scale=scale, generator=generator)
        views.append(view_colors(x, cfg, view, generator))
    return views


def view_colors(x: Tensor, cfg: MultiCrop, view: int, generator: torch.Generator | None = None) -> Tensor:
    """The photometric part of DINO's view number ``view`` (0, 1: global; 2...: local): colour jitter,
    grayscale, blur and solarisation with that view's probabilities.

    Args:
        x: ``(B, C, h, w)`` crops in [0, 1].
        cfg: The views' settings.
        view: The view's place among ``2 + cfg.local_crops``.
        generator: The draw.

    Returns:
        ``x`` augmented, the same shape.

    Examples:
        >>> cfg = MultiCrop(global_size=8, local_size=4, local_crops=1, jitter_p=0.0, grayscale_p=0.0,
        ...                 blur_p=(0.0, 0.0, 0.0), solarize_p=1.0)
        >>> round(view_colors(torch.full((1, 3, 8, 8), 0.75), cfg, view=1).max().item(), 4)  # 1 - 0.75
        0.25
    """
    g1, g2, local = cfg.blur_p
    blur_p, solarize_p = [(g1, 0.0), (g2, cfg.solarize_p)][view] if view < 2 else (local, 0.0)
    size = x.shape[-1]
    x = color_jitter(x, p=cfg.jitter_p, brightness=cfg.brightness, contrast=cfg.contrast,
                     saturation=cfg.saturation, hue=cfg.hue, generator=generator)
    x = random_grayscale(x, p=cfg.grayscale_p, generator=generator)
    low, high = cfg.blur_sigma
    sigma = (low * size / 224, high * size / 224) if cfg.blur_relative and size < 224 else (low, high)
    x = gaussian_blur(x, p=blur_p, sigma=sigma, generator=generator)
    return solarize(x, p=solarize_p, generator=generator)


def to_unit(images: Tensor) -> Tensor:
    """Decoded uint8 images to floats in [0, 1]; float images pass through.

    Examples:
        >>> to_unit(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([0., 1.])
    """
    return images.float() / 255 if images.dtype == torch.uint8 else images


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean) / std`` per channel.

    Examples:
        >>> normalize(torch.ones(1, 1, 2, 2), (0.5,), (0.5,)).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s

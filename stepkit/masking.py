"""Masks for masked-prediction methods, each a pure function of a generator and shapes.

- ``multi_block_masks``: I-JEPA's context and target blocks on a patch grid;
- ``random_masks``: a random subset of tokens kept per sample (MAE);
- ``block_mask`` / ``ibot_masks``: BEiT's blockwise masks, drawn per image as DINOv2's iBOT does;
- ``span_masks``: contiguous spans over time (speech, fMRI, any series);
- ``token_masks``: BERT-style masking of text token ids.

Index tensors are sorted and have the same length for every sample of a
batch, so they stack and can be gathered with ``torch.gather``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from stepkit import check as _check

__all__ = ["MultiBlock", "block_size", "multi_block_masks", "random_masks", "block_mask", "ibot_masks",
           "span_masks", "token_masks", "mask_image"]


@dataclass
class MultiBlock:
    """I-JEPA's masks (``--mask.*``): ``targets`` blocks to predict and one context block to predict from.

    Examples:
        >>> cfg = MultiBlock(targets=2)
        >>> multi_block_masks(3, (8, 8), cfg, torch.Generator().manual_seed(0))[1].shape[:2]
        torch.Size([3, 2])
    """

    targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    """Each target block's area, as a fraction of the patch grid."""
    target_aspect: tuple[float, float] = (0.75, 1.5)
    """Each target block's height / width."""
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 4
    """Fewest context patches a sample may keep once the targets are removed."""
    sampler: Literal["stepkit", "ijepa"] = "stepkit"
    """stepkit: a block's scale and aspect drawn independently, blocks anywhere on the grid.
    ijepa: the original I-JEPA sampler's distribution (as lightly copies it): one uniform draw
    sets both a block's scale and its aspect, the area is floored, a side is capped at grid - 1
    and a block never touches the last row or column (so a 0.85-1.0 context is the top-left
    (grid-1)^2 square), a context keeps more than min_keep patches, and after every 20 failed
    context draws one more target stops being cut out. The paper presets use it."""

    def __post_init__(self) -> None:
        _check.integer_at_least("targets", self.targets, 1)
        _check.integer_at_least("min_keep", self.min_keep, 1)
        _check.one_of("sampler", self.sampler, ("stepkit", "ijepa"))
        for name in ("target_scale", "context_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                _check.fail(name, getattr(self, name), "(low, high) with 0 < low <= high <= 1")
        for name in ("target_aspect", "context_aspect"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                _check.fail(name, getattr(self, name), "(low, high) with 0 < low <= high")


def block_size(grid: tuple[int, int], scale: float, aspect: float) -> tuple[int, int]:
    """A block of ``scale`` of the grid's area with height / width ``aspect``, rounded, within the grid.

    Args:
        grid: ``(rows, cols)`` of the patch grid.
        scale: The block's area as a fraction of the grid's.
        aspect: Height / width.

    Returns:
        ``(h, w)``, each in ``1..`` the grid's side.

    Examples:
        >>> block_size((14, 14), 0.25, 1.0)
        (7, 7)
    """
    h_grid, w_grid = grid
    area = scale * h_grid * w_grid
    h = max(1, min(h_grid, round(math.sqrt(area * aspect))))
    w = max(1, min(w_grid, round(math.sqrt(area / aspect))))
    return h, w


def _uniform(low: float, high: float, g: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _block_at(grid: tuple[int, int], h: int, w: int, g: torch.Generator) -> Tensor:
    top = int(torch.randint(0, grid[0] - h + 1, (), generator=g))
    left = int(torch.randint(0, grid[1] - w + 1, (), generator=g))
    rows = torch.arange(top, top + h)[:, None]
    cols = torch.arange(left, left + w)[None, :]
    return (rows * grid[1] + cols).reshape(-1)


def multi_block_masks(
    batch: int, grid: tuple[int, int], cfg: MultiBlock, generator: torch.Generator, max_tries: int = 50
) -> tuple[Tensor, Tensor]:
    """I-JEPA masks for a batch: ``context`` ``(B, Kc)`` and ``targets`` ``(B, M, Kt)`` patch indices.

    One target size and one context size are drawn per batch (scale and
    aspect uniform in their ranges), so every sample's blocks have equal
    sizes; positions are drawn per sample. The context block loses every
    patch of the sample's targets (so context and targets are disjoint),
    then every sample keeps its first ``Kc`` = the batch's smallest context
    size, so the batch stacks. A sample whose context would keep fewer
    than ``cfg.min_keep`` patches redraws its context position, up to
    ``max_tries`` times, then its targets too (up to ``max_tries`` times).

    Args:
        batch: Samples.
        grid: ``(rows, cols)`` of the patch grid.
        cfg: The mask settings.
        generator: The draw (seeded by the caller for resumable runs).
        max_tries: Redraws per sample before giving up.

    Returns:
        ``(context_idx (B, Kc), target_idx (B, M, Kt))``, sorted patch indices.

    Raises:
        ValueError: when no draw in ``max_tries`` leaves ``min_keep`` context patches.

    Examples:
        >>> context, targets = multi_block_masks(2, (8, 8), MultiBlock(), torch.Generator().manual_seed(0))
        >>> targets.shape[:2], bool(torch.isin(context[0], targets[0]).any())
        (torch.Size([2, 4]), False)
    """
    _check.integer_at_least("batch", batch, 1)
    g = generator
    if cfg.sampler == "ijepa":
        return _ijepa_masks(batch, grid, cfg, g)
    th, tw = block_size(grid, _uniform(*cfg.target_scale, g), _uniform(*cfg.target_aspect, g))
    ch, cw = block_size(grid, _uniform(*cfg.context_scale, g), _uniform(*cfg.context_aspect, g))
    contexts, targets = [], []
    for _ in range(batch):
        context, blocks = _context_and_targets(grid, (th, tw), (ch, cw), cfg, g, max_tries)
        contexts.append(context.sort().values)
        targets.append(torch.stack([b.sort().values for b in blocks]))
    keep = min(len(c) for c in contexts)
    return torch.stack([c[:keep] for c in contexts]), torch.stack(targets)


def _context_and_targets(grid, target_hw, context_hw, cfg: MultiBlock, g: torch.Generator, max_tries: int):
    # Rare draws leave too little context (4 large targets on a small grid); redraw the whole sample then,
    # and fail only when no draw in max_tries x max_tries works (a configuration that cannot).
    for _ in range(max_tries):
        blocks = [_block_at(grid, target_hw[0], target_hw[1], g) for _ in range(cfg.targets)]
        covered = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        for block in blocks:
            covered[block] = True
        for _ in range(max_tries):
            context = _block_at(grid, context_hw[0], context_hw[1], g)
            context = context[~covered[context]]
            if len(context) >= cfg.min_keep:
                return context, blocks
    raise ValueError(
        f"mask: no context block keeps min_keep={cfg.min_keep} patches of a {grid[0]}x{grid[1]} grid "
        f"once {cfg.targets} target blocks of {target_hw[0]}x{target_hw[1]} are removed; lower targets or "
        "target_scale, or raise context_scale")


def _ijepa_block_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
                      g: torch.Generator) -> tuple[int, int]:
    # One uniform number for both scale and aspect, the area floored, sides capped below the grid.
    r = float(torch.rand((), generator=g))
    area = int(grid[0] * grid[1] * (scale[0] + r * (scale[1] - scale[0])))
    ratio = aspect[0] + r * (aspect[1] - aspect[0])
    h = min(grid[0] - 1, round(math.sqrt(area * ratio)))
    w = min(grid[1] - 1, round(math.sqrt(area / ratio)))
    return max(1, h), max(1, w)


def _ijepa_block(grid: tuple[int, int], h: int, w: int, g: torch.Generator) -> Tensor:
    top = int(torch.randint(0, grid[0] - h, (), generator=g))  # high exclusive: never the last row
    left = int(torch.randint(0, grid[1] - w, (), generator=g))
    rows = torch.arange(top, top + h)[:, None]
    return (rows * grid[1] + torch.arange(left, left + w)[None, :]).reshape(-1)


def _ijepa_masks(batch: int, grid: tuple[int, int], cfg: MultiBlock, g: torch.Generator,
                 timeout: int = 20) -> tuple[Tensor, Tensor]:
    """The original I-JEPA mask sampler's distribution (see ``MultiBlock.sampler``)."""
    th, tw = _ijepa_block_size(grid, cfg.target_scale, cfg.target_aspect, g)
    ch, cw = _ijepa_block_size(grid, cfg.context_scale, cfg.context_aspect, g)
    if ch * cw <= cfg.min_keep:
        raise ValueError(f"mask: a {ch}x{cw} context block cannot keep more than min_keep={cfg.min_keep} "
                         "patches; raise context_scale or lower min_keep")
    contexts, targets = [], []
    n = grid[0] * grid[1]
    for _ in range(batch):
        blocks = [_ijepa_block(grid, th, tw, g) for _ in range(cfg.targets)]
        for relaxed in range(cfg.targets + 1):  # every `timeout` failures, one target less is cut out
            covered = torch.zeros(n, dtype=torch.bool)
            for block in blocks[: cfg.targets - relaxed]:
                covered[block] = True
            for _ in range(timeout):
                context = _ijepa_block(grid, ch, cw, g)
                context = context[~covered[context]]
                if len(context) > cfg.min_keep:
                    break
            else:
                continue
            break
        contexts.append(context.sort().values)
        targets.append(torch.stack([b.sort().values for b in blocks]))
    keep = min(len(c) for c in contexts)
    return torch.stack([c[:keep] for c in contexts]), torch.stack(targets)


def random_masks(batch: int, tokens: int, ratio: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(keep, masked)`` sorted indices ``(B, K)`` and ``(B, N - K)``: ``round(ratio * N)`` of the ``N``
    tokens masked per sample, uniformly at random (MAE).

    Args:
        batch: Samples.
        tokens: ``N``, tokens per sample.
        ratio: The fraction masked, in [0, 1].
        generator: The draw.

    Returns:
        ``(keep, masked)`` index tensors.

    Examples:
        >>> keep, masked = random_masks(2, 10, 0.7, torch.Generator().manual_seed(0))
        >>> keep.shape, masked.shape
        (torch.Size([2, 3]), torch.Size([2, 7]))
    """
    _check.in_range("ratio", ratio, 0.0, 1.0)
    n_masked = round(ratio * tokens)
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order[:, n_masked:].sort(dim=1).values, order[:, :n_masked].sort(dim=1).values


def block_mask(grid: tuple[int, int], count: int, generator: torch.Generator, *, min_block: int = 4,
               max_block: int | None = None, min_aspect: float = 0.3) -> Tensor:
    """About ``count`` patches of a ``grid`` masked in rectangles (BEiT's blockwise masking, as in DINOv2).

    Rectangles are added until ``count`` patches are masked: each of area
    ``U(min_block, min(max_block, count left))`` and aspect ``exp(U(log min_aspect, -log min_aspect))``,
    placed uniformly; a rectangle that would add nothing or more than the patches left is drawn
    again, up to 10 times, after which the mask stays as it is (so it may fall a little short, as the
    reference's does).

    Args:
        grid: ``(h, w)`` patches.
        count: Patches to mask, at least 0.
        generator: The draw.
        min_block: The smallest rectangle's area (BEiT, DINOv2: 4).
        max_block: The largest rectangle's area (DINOv2: half the grid); None: ``count``.
        min_aspect: The narrowest aspect (DINOv2: 0.3; the widest is its inverse).

    Returns:
        ``(h * w,)`` booleans, row-major, True where masked.

    Examples:
        >>> mask = block_mask((8, 8), 20, torch.Generator().manual_seed(0))
        >>> mask.shape, 0 < int(mask.sum()) <= 20
        (torch.Size([64]), True)
    """
    _check.integer_at_least("count", count, 0)
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    largest = count if max_block is None else max_block
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    done = 0
    while done < count:
        added = _add_block(mask, min(count - done, largest), min_block, log_aspect, generator)
        if added == 0:
            break
        done += added
    return mask.flatten()


def _add_block(mask: Tensor, at_most: float, min_block: int, log_aspect: tuple[float, float],
               g: torch.Generator) -> int:
    grid_h, grid_w = mask.shape
    for _ in range(10):
        area = _uniform(min_block, at_most, g)
        aspect = math.exp(_uniform(*log_aspect, g))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if w < grid_w and h < grid_h:
            top = int(torch.randint(0, grid_h - h + 1, (), generator=g))
            left = int(torch.randint(0, grid_w - w + 1, (), generator=g))
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= at_most:
                region.fill_(True)
                return new
    return 0


def ibot_masks(images: int, grid: tuple[int, int], generator: torch.Generator, *, probability: float = 0.5,
               ratio: tuple[float, float] = (0.1, 0.5)) -> Tensor:
    """iBOT's masks for a batch of global crops, drawn as DINOv2's collate draws them.

    ``int(images * probability)`` crops are masked; their mask ratios are stratified over ``ratio``
    (crop ``i`` draws its ratio in the ``i``-th of as many equal slices), each a ``block_mask`` of
    ``int(N * ratio)`` patches with rectangles of at most half the grid; the others are not masked;
    the crops' order is then shuffled.

    Args:
        images: Global crops in the batch (DINOv2: 2 x the images).
        grid: ``(h, w)`` patches of a global crop.
        generator: The draw.
        probability: The fraction of crops masked (DINOv2: 0.5).
        ratio: The range of a masked crop's mask ratio (DINOv2: (0.1, 0.5)).

    Returns:
        ``(images, h * w)`` booleans, True where the student sees the mask token.

    Examples:
        >>> masks = ibot_masks(8, (6, 6), torch.Generator().manual_seed(0))
        >>> masks.shape, int((masks.sum(dim=1) > 0).sum())  # half of the crops masked
        (torch.Size([8, 36]), 4)
    """
    _check.in_range("probability", probability, 0.0, 1.0)
    if not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
        _check.fail("ratio", ratio, "(low, high) with 0 <= low <= high <= 1")
    n = grid[0] * grid[1]
    masked = int(images * probability)
    edges = torch.linspace(ratio[0], ratio[1], masked + 1).tolist()
    masks = [block_mask(grid, int(n * _uniform(edges[i], edges[i + 1], generator)), generator,
                        max_block=int(0.5 * n)) for i in range(masked)]
    masks += [torch.zeros(n, dtype=torch.bool)] * (images - masked)
    order = torch.randperm(images, generator=generator).tolist()
    return torch.stack([masks[i] for i in order]) if masks else torch.zeros(0, n, dtype=torch.bool)


def span_masks(batch: int, length: int, span: int, ratio: float, generator: torch.Generator) -> Tensor:
    """``(B, length)`` bool, True where masked: spans of ``span`` steps at random starts, added until at
    least ``ratio`` of every series is covered (spans may overlap; the last one is cut at the end).

    Args:
        batch: Series.
        length: Time steps per series.
        span: Steps per span, at least 1.
        ratio: The least fraction covered, in [0, 1].
        generator: The draw.

    Returns:
        ``(B, length)`` bool, True where masked.

    Examples:
        >>> mask = span_masks(3, 20, 4, 0.5, torch.Generator().manual_seed(0))
        >>> bool((mask.sum(dim=1) >= 10).all())
        True
    """
    _check.integer_at_least("length", length, 1)
    _check.integer_at_least("span", span, 1)
    _check.in_range("ratio", ratio, 0.0, 1.0)
    need = math.ceil(ratio * length)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in mask:
        while int(row.sum()) < need:
            start = int(torch.randint(0, length, (), generator=generator))
            row[start:start + span] = True
    return mask


def token_masks(
    input_ids: Tensor, ratio: float, *, mask_id: int, vocab_size: int, random_token_p: float = 0.1,
    special: Tensor | None = None, generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT-style: ``(corrupted_ids, mask)``. Each non-special token is chosen with probability ``ratio``;
    a chosen token becomes ``mask_id``, or with probability ``random_token_p`` a random id.

    Args:
        input_ids: ``(B, L)`` token ids.
        ratio: The chance a token is chosen, in [0, 1] (BERT: 0.15).
        mask_id: The mask token's id.
        vocab_size: Random ids are drawn from ``0..vocab_size - 1``.
        random_token_p: The chance a chosen token becomes a random id instead of ``mask_id``.
        special: Ids never chosen (padding, CLS, SEP).
        generator: The draw.

    Returns:
        ``(corrupted_ids, mask)``, ``mask`` True at the chosen tokens.

    Examples:
        >>> ids = torch.tensor([[5, 6, 7, 0]])
        >>> corrupted, mask = token_masks(ids, 1.0, mask_id=1, vocab_size=10, random_token_p=0.0,
        ...                               special=torch.tensor([0]), generator=torch.Generator())
        >>> corrupted.tolist(), mask.tolist()
        ([[1, 1, 1, 0]], [[True, True, True, False]])
    """
    _check.in_range("ratio", ratio, 0.0, 1.0)
    _check.in_range("random_token_p", random_token_p, 0.0, 1.0)
    chosen = torch.rand(input_ids.shape, generator=generator) < ratio
    if special is not None:
        chosen &= ~torch.isin(input_ids, special)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator)
    use_random = torch.rand(input_ids.shape, generator=generator) < random_token_p
    corrupted = torch.where(chosen, torch.where(use_random, random_ids, torch.full_like(input_ids, mask_id)),
                            input_ids)
    return corrupted, chosen


# Colours of the mask picture: context patches keep the image, target blocks are tinted.
_TARGET_COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.4, 1.0], [1.0, 0.8, 0.1]])


def mask_image(
    images: Tensor, context_idx: Tensor, target_idx: Tensor, patch_size: int, *, samples: int = 4
) -> Tensor:
    """A picture of multi-block masks: ``(3, H, samples * W)``, values in [0, 1], for ``Logger.image``.

    For each of the first ``samples`` images (``(B, C, H, W)``, any range:
    min-max scaled per image, grey if one channel): context patches show the
    image, patches in neither context nor a target are black, and target
    block ``m``'s patches are the image half blended with colour ``m``
    (red, green, blue, yellow, then again). ``context_idx`` ``(B, Kc)`` and
    ``target_idx`` ``(B, M, Kt)`` index the row-major patch grid.

    Args:
        images: ``(B, C, H, W)`` images.
        context_idx: ``(B, Kc)`` context patch indices.
        target_idx: ``(B, M, Kt)`` target patch indices.
        patch_size: Pixels per patch side.
        samples: How many images to draw side by side.

    Returns:
        ``(3, H, samples * W)`` in [0, 1].

    Examples:
        >>> context, targets = torch.tensor([[0], [1]]), torch.tensor([[[3]], [[2]]])
        >>> picture = mask_image(torch.rand(2, 1, 8, 8), context, targets, 4, samples=2)
        >>> tuple(picture.shape)
        (3, 8, 16)
    """
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images of {h}x{w} are not a multiple of patch_size={patch_size}")
    n = min(samples, b)
    gh, gw = h // patch_size, w // patch_size
    x = images[:n].detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    x = x.expand(-1, 3, -1, -1) if c == 1 else x[:, :3]
    patches = torch.zeros(n, gh * gw, 3)  # per-patch colour weight; black where nothing is shown
    shown = torch.zeros(n, gh * gw, 1)
    shown.scatter_(1, context_idx[:n].cpu()[..., None], 1.0)
    targets = target_idx[:n].cpu()
    for m in range(targets.shape[1]):
        colour = _TARGET_COLOURS[m % len(_TARGET_COLOURS)]
        idx = targets[:, m]
        shown.scatter_(1, idx[..., None], 0.5)
        patches.scatter_(1, idx[..., None].expand(-1, -1, 3), (0.5 * colour).expand(n, idx.shape[1], 3))

    def upsample(per_patch: Tensor) -> Tensor:  # (n, gh*gw, k) -> (n, k, h, w)
        grid = per_patch.transpose(1, 2).reshape(n, -1, gh, gw)
        return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)

    picture = x * upsample(shown) + upsample(patches)
    return torch.cat(list(picture), dim=2)  # side by side

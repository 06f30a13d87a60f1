import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepkit.masking import MultiBlock, block_size, multi_block_masks, random_masks, span_masks, token_masks


def gen(seed):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(side=st.integers(6, 16), targets=st.integers(1, 4), low=st.floats(0.05, 0.15),
       seed=st.integers(0, 10**6), batch=st.integers(1, 6))
def test_multi_block_masks_sizes_disjointness_and_stacking(side, targets, low, seed, batch):
    cfg = MultiBlock(targets=targets, target_scale=(low, low + 0.05), min_keep=2)
    context, target = multi_block_masks(batch, (side, side), cfg, gen(seed))
    assert context.shape[0] == target.shape[0] == batch and target.shape[1] == targets
    assert context.shape[1] >= cfg.min_keep
    n = side * side
    assert int(context.min()) >= 0 and int(context.max()) < n and int(target.max()) < n
    for b in range(batch):
        assert len(set(context[b].tolist())) == context.shape[1]  # no repeats
        assert not set(context[b].tolist()) & set(target[b].flatten().tolist())  # disjoint
        for block in target[b]:  # each target is a full rectangle of the drawn size
            rows, cols = block // side, block % side
            h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
            assert h * w == len(block)
    again = multi_block_masks(batch, (side, side), cfg, gen(seed))
    assert torch.equal(again[0], context) and torch.equal(again[1], target)  # a pure function of the seed


def test_block_size_follows_scale_and_aspect():
    assert block_size((14, 14), 0.25, 1.0) == (7, 7)
    h, w = block_size((14, 14), 0.2, 1.5)
    assert h > w and abs(h * w - 0.2 * 196) <= 6
    assert block_size((4, 4), 1.0, 20.0) == (4, 1)  # clipped to the grid


def test_min_keep_that_cannot_be_met_is_a_clear_error():
    cfg = MultiBlock(targets=4, target_scale=(0.5, 0.5), context_scale=(0.3, 0.3), min_keep=30)
    with pytest.raises(ValueError, match="min_keep=30"):
        multi_block_masks(2, (8, 8), cfg, gen(0))
    with pytest.raises(ValueError, match="target_scale"):
        MultiBlock(target_scale=(0.3, 0.1))


def test_a_draw_that_leaves_too_little_context_redraws_its_targets():
    # The tiny I-JEPA default (8x8 grid, 4 targets) drew, at this seed, four target blocks that left no
    # 7x7 context position min_keep patches; it ended a 6000-step run before the targets were redrawn.
    g = gen(1580 * 101)
    context, targets = multi_block_masks(64, (8, 8), MultiBlock(), g)
    assert context.shape[1] >= MultiBlock().min_keep
    for c, t in zip(context, targets):
        assert not set(c.tolist()) & set(t.flatten().tolist())


def test_random_masks_partition_the_tokens():
    keep, masked = random_masks(3, 10, 0.7, gen(0))
    assert keep.shape == (3, 3) and masked.shape == (3, 7)
    for k, m in zip(keep, masked):
        assert sorted(k.tolist() + m.tolist()) == list(range(10))


def test_span_masks_cover_the_ratio_in_contiguous_runs():
    mask = span_masks(4, 100, 5, 0.3, gen(1))
    assert mask.shape == (4, 100) and (mask.sum(1) >= 30).all()
    for row in mask.int():  # every run of True is at least one span long, except at the very end
        edges = torch.diff(torch.cat([torch.tensor([0]), row, torch.tensor([0])]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        assert all(e - s >= 5 or e == 100 for s, e in zip(starts.tolist(), ends.tolist()))


def test_token_masks_leave_special_tokens_and_use_the_mask_id():
    ids = torch.randint(5, 50, (8, 64), generator=gen(0))
    ids[:, 0] = 1  # a special token, e.g. [CLS]
    corrupted, mask = token_masks(ids, 0.3, mask_id=2, vocab_size=50, random_token_p=0.0,
                                  special=torch.tensor([1]), generator=gen(3))
    assert not mask[:, 0].any() and (corrupted[:, 0] == 1).all()
    assert (corrupted[mask] == 2).all() and torch.equal(corrupted[~mask], ids[~mask])
    assert 0.2 < mask.float().mean() < 0.4


def test_mask_image_shows_context_blacks_out_the_rest_and_tints_targets():
    from stepkit.masking import mask_image

    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # min-max scaled to [0, 1] by /15
    context, targets = torch.tensor([[0]]), torch.tensor([[[3]]])  # 2x2 grid of 2x2 patches
    picture = mask_image(x, context, targets, patch_size=2)
    assert picture.shape == (3, 4, 4)
    unit = (x[0, 0] / 15).expand(3, -1, -1)
    torch.testing.assert_close(picture[:, :2, :2], unit[:, :2, :2])  # context: the image
    assert picture[:, :2, 2:].abs().max() == 0 and picture[:, 2:, :2].abs().max() == 0  # neither: black
    red = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    torch.testing.assert_close(picture[:, 2:, 2:], 0.5 * unit[:, 2:, 2:] + 0.5 * red)  # target 0: red tint
    with pytest.raises(ValueError, match="not a multiple of patch_size=3"):
        mask_image(x, context, targets, patch_size=3)


def test_mask_image_puts_samples_side_by_side():
    from stepkit.masking import mask_image

    g = torch.Generator().manual_seed(0)
    context, targets = multi_block_masks(6, (8, 8), MultiBlock(), g)
    picture = mask_image(torch.rand(6, 3, 32, 32), context, targets, patch_size=4, samples=4)
    assert picture.shape == (3, 32, 128) and 0 <= picture.min() and picture.max() <= 1


# --- the original I-JEPA sampler's distribution ----------------------------------------------------


def original_ijepa_contexts(draws, grid=14, npred=4, pred_scale=(0.15, 0.2), aspect=(0.75, 1.5),
                            enc_scale=(0.85, 1.0), min_keep=4, seed=0):
    """The original I-JEPA MaskCollator's procedure written out (one sample per batch): context sizes."""
    import math as m

    g = torch.Generator().manual_seed(seed)

    def block_size(scale, ratio):
        r = torch.rand(1, generator=g).item()
        max_keep = int(grid * grid * (scale[0] + r * (scale[1] - scale[0])))
        ar = ratio[0] + r * (ratio[1] - ratio[0])
        h, w = int(round(m.sqrt(max_keep * ar))), int(round(m.sqrt(max_keep / ar)))
        while h >= grid:
            h -= 1
        while w >= grid:
            w -= 1
        return h, w

    def block_mask(size, acceptable=None):
        h, w = size
        tries, timeout = 0, 20
        while True:
            top = torch.randint(0, grid - h, (1,), generator=g)
            left = torch.randint(0, grid - w, (1,), generator=g)
            mask = torch.zeros((grid, grid), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if acceptable is not None:
                for region in acceptable[:max(len(acceptable) - tries, 0)]:
                    mask *= region
            idx = torch.nonzero(mask.flatten())
            if len(idx) > min_keep:
                complement = torch.ones((grid, grid), dtype=torch.int32)
                complement[top:top + h, left:left + w] = 0
                return idx.squeeze(), complement
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20

    sizes = []
    for _ in range(draws):
        p_size, e_size = block_size(pred_scale, aspect), block_size(enc_scale, (1.0, 1.0))
        complements = [block_mask(p_size)[1] for _ in range(npred)]
        sizes.append(len(block_mask(e_size, complements)[0]))
    return torch.tensor(sizes, dtype=torch.float64)


@pytest.mark.slow
def test_the_ijepa_sampler_has_the_original_procedures_statistics():
    cfg = MultiBlock(sampler="ijepa")
    g = torch.Generator().manual_seed(1)
    ours = torch.tensor([multi_block_masks(1, (14, 14), cfg, g)[0].shape[1] for _ in range(2000)],
                        dtype=torch.float64)
    original = original_ijepa_contexts(2000)
    assert abs(ours.mean() - original.mean()) < 1.5 and abs(ours.std() - original.std()) < 1.5
    stepkit_sizes = torch.tensor([multi_block_masks(1, (14, 14), MultiBlock(), g)[0].shape[1]
                                  for _ in range(2000)], dtype=torch.float64)
    # measured: the original 81.4 +- 13.7 patches, stepkit's own sampler 89.4 +- 17.6
    assert stepkit_sizes.mean() - ours.mean() > 5 and stepkit_sizes.std() - ours.std() > 2


def test_the_ijepa_sampler_never_touches_the_last_row_or_column_and_shares_one_draw():
    cfg = MultiBlock(sampler="ijepa")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        context, targets = multi_block_masks(8, (14, 14), cfg, g)
        for idx in (context.reshape(-1), targets.reshape(-1)):
            assert (idx // 14).max() < 13 and (idx % 14).max() < 13
        assert (context.shape[1] > cfg.min_keep) and targets.shape[1:] == (4, targets.shape[2])
    # one uniform number r sets both scale and aspect: area floored, sides rounded
    from stepkit.masking import _ijepa_block_size

    g = torch.Generator().manual_seed(3)
    r = float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    area = int(196 * (0.15 + r * 0.05))
    ratio = 0.75 + r * 0.75
    assert _ijepa_block_size((14, 14), (0.15, 0.2), (0.75, 1.5), g) == (
        min(13, round(math.sqrt(area * ratio))), min(13, round(math.sqrt(area / ratio))))


# BEiT's blockwise masks, drawn per crop as DINOv2's iBOT draws them


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 16), st.integers(2, 16), st.integers(0, 200), st.integers(0, 2**31 - 1))
def test_a_block_mask_never_exceeds_its_count(h, w, count, seed):
    from stepkit.masking import block_mask

    mask = block_mask((h, w), count, torch.Generator().manual_seed(seed), max_block=int(0.5 * h * w))
    assert mask.shape == (h * w,) and mask.dtype == torch.bool
    assert int(mask.sum()) <= count


def test_block_masks_come_in_rectangles_and_reach_their_count_on_a_roomy_grid():
    from stepkit.masking import block_mask

    g = torch.Generator().manual_seed(0)
    counts = [int(block_mask((14, 14), 60, g, max_block=98).sum()) for _ in range(50)]
    assert min(counts) >= 50 and max(counts) <= 60  # BEiT's loop stops within a rectangle of the count
    # rectangles: nearly every masked patch has a masked neighbour (about a third would, scattered at random)
    mask = torch.stack([block_mask((14, 14), 60, g, max_block=98).reshape(14, 14) for _ in range(20)])
    padded = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert (neighbours[mask] > 0).float().mean() > 0.95


def test_ibot_masks_mask_half_the_crops_with_stratified_ratios():
    from stepkit.masking import ibot_masks

    g = torch.Generator().manual_seed(0)
    n = 14 * 14
    sizes = []
    for _ in range(20):
        masks = ibot_masks(16, (14, 14), g, probability=0.5, ratio=(0.1, 0.5))
        counts = masks.sum(dim=1)
        assert masks.shape == (16, n) and int((counts > 0).sum()) == 8
        sizes.append(sorted(counts[counts > 0].tolist()))
    # the 8 masked crops draw their ratios from 8 slices of [0.1, 0.5]: crop i masks at most
    # int(n * (0.1 + 0.05 (i + 1))) patches
    for ordered in sizes:
        assert all(c <= int(n * (0.1 + 0.05 * (i + 1))) + 0 for i, c in enumerate(ordered))
    assert ibot_masks(3, (4, 4), g, probability=0.0).sum() == 0
    with pytest.raises(ValueError, match="ratio=.*0.6, 0.2.* is not allowed"):
        ibot_masks(3, (4, 4), g, ratio=(0.6, 0.2))

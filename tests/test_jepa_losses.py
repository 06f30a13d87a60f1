"""The JEPA loss variants against values computed by hand, at the settings used."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stepkit.losses import jepa_contrastive_loss, jepa_loss, multiscale_jepa_loss


def test_jepa_loss_averages_the_masked_tokens_only():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    # token errors: (1 + 4) / 2 = 2.5, (9 + 16) / 2 = 12.5 (not masked), (25 + 36) / 2 = 30.5
    assert jepa_loss(pred, target, mask).item() == pytest.approx((2.5 + 30.5) / 2)
    assert jepa_loss(pred, target, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_jepa_loss_with_every_token_masked_is_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    full = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(jepa_loss(pred, target, full), F.mse_loss(pred, target))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_jepa_loss_ignores_what_is_not_masked(seed):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    mask = torch.rand(2, 6, generator=g) < 0.5
    changed = torch.where(mask[..., None], pred, pred + 100 * torch.randn(2, 6, 3, generator=g))
    torch.testing.assert_close(jepa_loss(changed, target, mask), jepa_loss(pred, target, mask))


def contrastive_by_hand(p, t, temperature, columns=None):
    """Rows i: -s_ii + log sum_j exp(s_ij), over all j or the listed ``columns[i]`` (plus i)."""
    p = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in p]
    t = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in t]
    total = 0.0
    for i, row in enumerate(p):
        s = [sum(a * b for a, b in zip(row, col)) / temperature for col in t]
        keep = range(len(t)) if columns is None else [i, *columns[i]]
        total += -s[i] + math.log(sum(math.exp(s[j]) for j in keep))
    return total / len(p)


def test_contrastive_loss_by_hand_with_other_samples_as_negatives():
    # two samples, one masked token each (and one unmasked token that must not count)
    pred = torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[0.0, 2.0], [7.0, -1.0]]])
    target = torch.tensor([[[3.0, 0.0], [0.0, 9.0]], [[1.0, 1.0], [2.0, 2.0]]])
    mask = torch.tensor([[True, False], [True, False]])
    expected = contrastive_by_hand([[1, 0], [0, 2]], [[3, 0], [1, 1]], 0.5)
    # = mean(-2 + log(e^2 + e^sqrt2), -sqrt2 + log(1 + e^sqrt2))
    assert expected == pytest.approx(((-2 + math.log(math.e**2 + math.exp(2**0.5)))
                                      + (-(2**0.5) + math.log(1 + math.exp(2**0.5)))) / 2)
    got = jepa_contrastive_loss(pred, target, mask, temperature=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_with_sampled_negatives():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(1, 5, 3, generator=g), torch.randn(1, 5, 3, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    full = jepa_contrastive_loss(pred, target, mask, temperature=0.2)
    # as many negatives as there are others: the full loss
    many = jepa_contrastive_loss(pred, target, mask, temperature=0.2, negative_samples=4,
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(many, full)
    # one negative per token: the same draw as the function's, by hand
    scores = torch.rand(5, 5, generator=torch.Generator().manual_seed(7))
    scores.fill_diagonal_(-1.0)
    chosen = scores.topk(1, dim=1).indices.tolist()
    one = jepa_contrastive_loss(pred, target, mask, temperature=0.2, negative_samples=1,
                                generator=torch.Generator().manual_seed(7))
    assert one.item() == pytest.approx(contrastive_by_hand(pred[0].tolist(), target[0].tolist(), 0.2, chosen),
                                       rel=1e-5)
    assert one.item() < full.item()  # fewer negatives, a smaller log-sum


def test_contrastive_loss_with_fewer_than_two_tokens_is_zero():
    pred = torch.randn(1, 3, 2, requires_grad=True)
    loss = jepa_contrastive_loss(pred, torch.randn(1, 3, 2), torch.tensor([[False, True, False]]))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_multiscale_loss_by_hand():
    pred = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [9.0]]])  # the 5th token: a partial window at 2 and 4
    target = torch.zeros(1, 5, 1)
    mask = torch.tensor([[True, False, False, False, False]])
    # scale 1: token 0 alone -> 1; scale 2: windows [1.5, 3.5], the first masked -> 2.25;
    # scale 4: window [2.5] masked -> 6.25
    expected = 1.0 * 1.0 + 0.5 * 2.25 + 0.25 * 6.25
    got = multiscale_jepa_loss(pred, target, mask)  # the guide's scales (1, 2, 4), weights (1, 0.5, 0.25)
    assert got.item() == pytest.approx(expected)
    assert multiscale_jepa_loss(pred, target, mask, scales=(1,), weights=(1.0,)).item() == 1.0


@pytest.mark.parametrize(("call", "message"), [
    (lambda p, t, m: jepa_loss(p, t[:, :2], m), "pred and target must both be"),
    (lambda p, t, m: jepa_loss(p, t, m[:, :2]), "mask must be"),
    (lambda p, t, m: jepa_contrastive_loss(p, t, m, temperature=0.0), "temperature=0.0"),
    (lambda p, t, m: jepa_contrastive_loss(p, t, m, negative_samples=0), "negative_samples=0"),
    (lambda p, t, m: multiscale_jepa_loss(p, t, m, scales=(1, 8), weights=(1.0, 1.0)), "scales=.*1..4"),
    (lambda p, t, m: multiscale_jepa_loss(p, t, m, scales=(1, 2), weights=(1.0,)), "one weight per scale"),
])
def test_bad_arguments_name_what_is_wrong(call, message):
    p, t, m = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        call(p, t, m)

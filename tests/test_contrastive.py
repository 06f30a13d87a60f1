import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stepkit.losses.contrastive import (
    LogitBias,
    LogitScale,
    clip_loss,
    embedding_mse,
    info_nce,
    matryoshka_loss,
    siglip_loss,
    similarity_distillation_loss,
)


def unit(rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)


def direct_clip(image, text, scale):
    """Both directions written out row by row: -log softmax at the matching column."""
    n = len(image)
    total = 0.0
    for i in range(n):
        i2t = [math.exp(scale * float(image[i] @ text[j])) for j in range(n)]
        t2i = [math.exp(scale * float(text[i] @ image[j])) for j in range(n)]
        total += -math.log(i2t[i] / sum(i2t)) - math.log(t2i[i] / sum(t2i))
    return total / (2 * n)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(2, 9), dim=st.integers(2, 8), scale=st.floats(0.5, 30.0), seed=st.integers(0, 99))
def test_clip_loss_equals_the_formula(rows, dim, scale, seed):
    image, text = unit(rows, dim, seed), unit(rows, dim, seed + 1)
    assert float(clip_loss(image, text, scale)) == pytest.approx(direct_clip(image, text, scale), rel=1e-10)


def direct_siglip(image, text, negatives, t, b):
    """SigLIP's Algorithm 1 term by term: -log sigmoid(z (t x.y + b)), z = 1 for a pair, summed over
    every image and every text or negative, divided by the images."""
    keys = list(text) + list(negatives)
    total = 0.0
    for i, x in enumerate(image):
        for j, y in enumerate(keys):
            z = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-z * (t * float(x @ y) + b)))
    return total / len(image)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 7), dim=st.integers(2, 8), extra=st.integers(0, 9), t=st.floats(0.5, 30.0),
       b=st.floats(-12.0, 2.0), seed=st.integers(0, 99))
def test_siglip_loss_equals_the_papers_formula(rows, dim, extra, t, b, seed):
    image, text, negatives = unit(rows, dim, seed), unit(rows, dim, seed + 1), unit(extra, dim, seed + 2)
    got = siglip_loss(image, text, t, b, negatives=negatives if extra else None)
    assert float(got) == pytest.approx(direct_siglip(image, text, negatives, t, b), rel=1e-10)


def test_siglip_starts_at_the_papers_temperature_and_bias():
    scale, bias = LogitScale(init_temperature=0.1), LogitBias()
    assert (float(scale().detach()), float(bias().detach())) == pytest.approx((10.0, -10.0))
    image, text = unit(4, 8, 0).float().requires_grad_(), unit(4, 8, 1).float()
    siglip_loss(image, text, scale(), bias()).backward()
    assert scale.log_scale.grad is not None and bias.bias.grad is not None


def test_clip_hard_negatives_are_extra_columns_of_image_to_text_only():
    image, text, negatives = unit(3, 5, 0), unit(3, 5, 1), unit(6, 5, 2)
    i2t = F.cross_entropy(7.0 * image @ torch.cat([text, negatives]).T, torch.arange(3))
    t2i = F.cross_entropy(7.0 * text @ image.T, torch.arange(3))
    got = clip_loss(image, text, 7.0, negatives=negatives)
    assert float(got) == pytest.approx(float(i2t + t2i) / 2, rel=1e-12)
    assert float(got) > float(clip_loss(image, text, 7.0))  # more negatives, a harder task


def test_matryoshka_sums_the_weighted_losses_of_renormalised_prefixes():
    image, text = unit(5, 8, 0), unit(5, 8, 1)
    total, each = matryoshka_loss(siglip_loss, image, text, dims=(8, 4, 2), weights=(1.0, 0.5, 0.25),
                                  logit_scale=10.0, logit_bias=-3.0)
    for d in (8, 4, 2):
        prefix = [F.normalize(e[:, :d], dim=-1) for e in (image, text)]
        assert float(each[d]) == pytest.approx(float(siglip_loss(*prefix, 10.0, -3.0)), rel=1e-12)
    assert float(total) == pytest.approx(float(each[8] + 0.5 * each[4] + 0.25 * each[2]), rel=1e-12)


@pytest.mark.parametrize("dims, weights, message", [
    ((8, 9), None, r"distinct widths in \[1, 8\]"), ((4, 4), None, "distinct"),
    ((8, 4), (1.0,), "1 Matryoshka weights for 2 dims"),
])
def test_matryoshka_refuses_widths_it_cannot_cut(dims, weights, message):
    with pytest.raises(ValueError, match=message):
        matryoshka_loss(clip_loss, unit(2, 8, 0), unit(2, 8, 1), dims=dims, weights=weights, logit_scale=1.0)


def test_info_nce_offset_picks_the_positive_among_gathered_keys():
    q, keys = unit(3, 4, 0), unit(9, 4, 1)
    logits = 5.0 * q @ keys.T
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(3), torch.arange(3) + 6].mean()
    assert float(info_nce(q, keys, 5.0, offset=6)) == pytest.approx(float(expected), rel=1e-6)


def test_a_perfect_match_beats_a_random_one():
    image = unit(8, 16, 0)
    assert float(clip_loss(image, image, 50.0)) < 0.01 < float(clip_loss(image, unit(8, 16, 1), 50.0))


def test_logit_scale_starts_at_one_over_the_temperature_and_is_clamped():
    scale = LogitScale(init_temperature=0.07, max_scale=100.0)
    assert float(scale().detach()) == pytest.approx(1 / 0.07)
    scale.log_scale.data.fill_(math.log(500.0))
    value = scale()
    value.backward()
    assert float(value.detach()) == pytest.approx(100.0)
    assert float(scale.log_scale.grad) == 0.0  # past the clamp nothing pushes it further
    with pytest.raises(ValueError, match="max_scale"):
        LogitScale(max_scale=0.5)


def test_similarity_distillation_is_the_kl_between_softmaxed_similarities():
    sq, sk, tq, tk = (unit(5, 6, s) for s in range(4))
    temp = 0.5
    p_t = torch.softmax(tq @ tk.T / temp, dim=1)
    p_s = torch.softmax(sq @ sk.T / temp, dim=1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * temp**2
    value = similarity_distillation_loss(sq, sk, tq, tk, temp)
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    assert float(similarity_distillation_loss(tq, tk, tq, tk, temp)) == pytest.approx(0.0, abs=1e-12)


def test_embedding_mse_value_zero_at_identity_and_shape_check():
    a, b = unit(4, 3, 0), unit(4, 3, 1)
    assert float(embedding_mse(a, b)) == pytest.approx(float(((a - b) ** 2).mean()))
    assert float(embedding_mse(a, a)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        embedding_mse(a, unit(4, 5, 2))

"""What the JEPA recipes share (stepkit.jepa, the sequence loaders, the probe protocol), against hand math."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepkit.data import series_windows, tokenized_sentences, windowed_series
from stepkit.evaluation import frozen_probes
from stepkit.jepa import (
    JEPALoss,
    Levels,
    TargetAlarm,
    head_level,
    jepa_shard_units,
    level_losses,
    level_values_at,
    prediction_loss,
    raw_sequence_features,
    sequence_features,
    target_collapse_watch,
)
from stepkit.losses import jepa_contrastive_loss, multiscale_jepa_loss


def test_level_schedules_are_constant_or_cosine():
    assert level_values_at(7, (0.25, 1.0), None, 10) == [0.25, 1.0]
    start, final = (1.0, 0.5), (0.0, 1.0)
    assert level_values_at(0, start, final, 10) == [1.0, 0.5]
    assert level_values_at(10, start, final, 10) == [0.0, 1.0]
    assert level_values_at(5, start, final, 10) == pytest.approx([0.5, 0.75], abs=1e-12)  # the mean
    quarter = level_values_at(2, start, final, 8)  # cos(pi / 4)
    assert quarter[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)


def test_head_parameters_get_their_own_groups():
    assert [head_level(n) for n in ("heads.2.weight", "heads.0.bias", "encoder.convs.0.weight",
                                    "predictor.out.weight")] == [3, 1, 0, 0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"depths": (3, 2)}, "levels.depths"),
    ({"depths": (0,)}, "levels.depths"),
    ({"depths": (1, 2), "weights": (1.0,)}, "one value per level: 2"),
    ({"depths": (1, 2), "weights": (0.0, 0.0)}, "at least one positive weight"),
    ({"lr_scales": (-1.0,)}, "values >= 0"),
])
def test_levels_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Levels(**kwargs)


def test_the_loss_choice_is_the_public_functions():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g)
    mask = torch.rand(2, 8, generator=g) < 0.5
    loss = JEPALoss(kind="multiscale", scales=(1, 2), scale_weights=(1.0, 0.5))
    torch.testing.assert_close(prediction_loss(loss, pred, target, mask, g),
                               multiscale_jepa_loss(pred, target, mask, scales=(1, 2), weights=(1.0, 0.5)))
    contrastive = JEPALoss(kind="contrastive", temperature=0.3)
    torch.testing.assert_close(prediction_loss(contrastive, pred, target, mask, g),
                               jepa_contrastive_loss(pred, target, mask, temperature=0.3))
    # smooth L1 over the masked tokens only, by hand: mean over features, then over the chosen tokens
    per_token = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    torch.testing.assert_close(prediction_loss(JEPALoss(), pred, target, mask, g), per_token[mask].mean())
    torch.testing.assert_close(prediction_loss(JEPALoss(kind="mse"), pred, target, None, g),
                               F.mse_loss(pred, target))


def test_level_losses_weight_each_level_and_add_the_variance_guard():
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g), None) for _ in range(2)]
    pooled = torch.randn(6, 4, generator=g)
    cfg = JEPALoss(var_weight=2.0, cov_weight=0.5)
    total, aux = level_losses(pairs, pooled, depths=(3, 5), weights=[0.25, 1.0], loss=cfg, generator=g)
    each = [F.smooth_l1_loss(p, t) for p, t, _ in pairs]
    std = pooled.var(dim=0).add(1e-4).sqrt()  # VICReg's variance hinge at gamma 1
    variance = F.relu(1 - std).mean()
    centred = pooled - pooled.mean(dim=0)
    cov = centred.T @ centred / (len(pooled) - 1)
    covariance = (cov - torch.diag(torch.diag(cov))).square().sum() / 4
    torch.testing.assert_close(total, 0.25 * each[0] + each[1] + 2.0 * variance + 0.5 * covariance)
    assert aux["weight_depth3"] == 0.25 and {"loss_depth5", "depth3_target_std", "var_loss"} <= aux.keys()


def test_the_target_watch_warns_on_either_level():
    watch = target_collapse_watch(TargetAlarm(min_std=0.1, patience=2), (2, 4))
    healthy = {f"depth{d}_target_{m}": 10.0 for d in (2, 4) for m in ("effective_rank", "std")}
    assert watch(healthy) is None
    low = {**healthy, "depth4_target_std": 0.01}
    assert watch(low) is None and "depth4_target_std below 0.1" in watch(low)


def test_series_windows_end_at_the_last_step():
    x = torch.arange(10.0)[None]
    windows = series_windows(x, window=4, stride=3)
    assert windows[:, 0, 0].tolist() == [0.0, 3.0, 6.0] and windows[-1, 0, -1] == 9.0


def test_windowed_series_standardises_with_the_training_statistics():
    g = np.random.default_rng(0)
    train = [g.normal(5.0, 3.0, size=(2, 30)) for _ in range(4)]
    test = [g.normal(5.0, 3.0, size=(2, 30))]
    test[0][1, 7] = np.nan
    out = windowed_series({"train_series": train, "train_labels": [0, 1, 0, 1], "test_series": test,
                           "test_labels": [1]}, window=10, stride=10, source="toy")
    joined = torch.cat(out["train"][0], dim=1)
    torch.testing.assert_close(joined.mean(dim=1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(joined.std(dim=1, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    assert out["test"][0][0][1, 7] == 0.0  # a missing value becomes the mean
    x, y = out["train_set"].tensors
    assert x.shape == (12, 2, 10) and y.tolist() == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3


def test_tokenized_sentences_pad_with_zero_and_reserve_the_mask_id():
    texts = {"train_texts": ["the cat sat", "a dog"], "train_labels": [0, 1], "test_texts": ["the cow sat"],
             "test_labels": [0], "unlabelled_texts": ["the cat sat", "a dog", "the end"]}
    out = tokenized_sentences(texts, tokenizer="word", max_len=4, unlabelled=True)
    ids, _ = out["train"]
    assert ids.shape == (2, 4) and (ids[1, 2:] == 0).all() and (ids[0, :3] > 1).all()
    assert out["mask_id"] == out["vocab_size"] - 1 and len(out["train_set"]) == 3
    assert out["test"][0][0, 1] == 1  # 'cow' never occurs in pretraining: unknown
    labelled_only = tokenized_sentences(texts, tokenizer="word", max_len=4, unlabelled=False)
    assert len(labelled_only["train_set"]) == 2
    with pytest.raises(ValueError, match="data.tokenizer='bpe'"):
        tokenized_sentences(texts, tokenizer="bpe", max_len=4, unlabelled=True)


def test_sequence_features_pool_real_tokens_and_average_windows():
    from stepkit.models import MaskedTemporalCNN, TokenTransformer

    torch.manual_seed(0)
    net = TokenTransformer(vocab_size=12, length=5, dim=8, depth=2, heads=2).eval()
    ids = torch.tensor([[3, 4, 0, 0, 0], [5, 6, 7, 8, 0]])
    splits = {"train": (ids, torch.tensor([0, 1])), "test": (ids[:1], torch.tensor([0]))}
    cpu = torch.device("cpu")
    (train, _), (test, _) = sequence_features(net, splits, (1,), window=None, stride=1, device=cpu)
    assert train.shape == (2, 8)
    torch.testing.assert_close(test[0], train[0])  # a sentence's features do not depend on its batch
    from stepkit.models.sequence import sequence_tokens

    _, (last,) = sequence_tokens(net, ids[:1], None, layers=(1,))
    torch.testing.assert_close(train[0], last[0, :2].mean(dim=0))  # the mean over its two real tokens
    series_net = MaskedTemporalCNN(in_chans=1, widths=(4, 4)).eval()
    series = [torch.randn(1, 12), torch.randn(1, 12)]
    (feats, _), _ = sequence_features(series_net, {"train": (series, None), "test": (series, None)}, (0, 1),
                                      window=6, stride=6, device=torch.device("cpu"))
    halves = series_windows(series[0], 6, 6)
    _, outs = sequence_tokens(series_net, halves, None, layers=(0, 1))
    by_hand = torch.cat([o.mean(dim=1) for o in outs], dim=1).mean(dim=0)
    torch.testing.assert_close(feats[0], by_hand)


def test_raw_features_are_a_bag_of_words_or_the_resampled_series():
    ids = torch.tensor([[2, 2, 3, 0], [3, 0, 0, 0]])
    splits = {"train": (ids, None), "test": (torch.tensor([[1, 2, 0, 0]]), None)}
    (train, _), (test, _) = raw_sequence_features(splits, window=None, vocab_size=5)
    assert train.tolist() == [[2.0, 1.0], [0.0, 1.0]] and test.tolist() == [[1.0, 0.0]]  # ids 2 and 3 used
    series = [torch.arange(4.0)[None]]
    (resampled, _), _ = raw_sequence_features({"train": (series, None), "test": (series, None)}, window=7)
    torch.testing.assert_close(resampled, F.interpolate(series[0][None], size=7, mode="linear")[0])


def test_frozen_probes_report_the_better_of_last_layer_and_last_layers():
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    good = F.one_hot(y, 3).float() + 0.1 * torch.randn(60, 3)
    noise = torch.randn(60, 5)
    split = lambda f: ((f[:45], y[:45]), (f[45:], y[45:]))  # noqa: E731
    # the last layer (the last 3 columns) tells the classes apart; the concatenation has noise in front
    both = torch.cat([noise, good], 1)
    scores, last = frozen_probes({"": torch.nn.Identity()}, lambda net, layers: split(both), lambda net: 3,
                                 split(noise), "raw", layers=2, k=5)
    assert scores["knn_acc_last_layer"] == 1.0 and scores["knn_acc"] == 1.0 and scores["probe_layers"] == 2
    assert scores["linear_acc"] == max(scores["linear_acc_last_layer"], scores["linear_acc_last_layers"])
    assert scores["knn_acc_raw"] < 0.7 and last[""][0][0].shape == (45, 3)


def test_shard_units_put_the_encoder_on_its_own():
    from stepkit.models import JEPA, JEPAPredictor, VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, dim=16, depth=2, heads=2)
    model = JEPA(vit, JEPAPredictor(16, 16, 8, 1, 2, out_dim=16), [])
    units = jepa_shard_units(model)
    assert units[:3] == [*vit.blocks, vit] and units[3:] == list(model.predictor.blocks)


def test_ijepa_predictor_init_divides_residual_outputs_by_sqrt_2_depth():
    import math

    from stepkit.models.jepa import JEPAPredictor

    torch.manual_seed(0)
    plain = JEPAPredictor(16, enc_dim=8, dim=16, depth=3, heads=2)
    torch.manual_seed(0)
    ijepa = JEPAPredictor(16, enc_dim=8, dim=16, depth=3, heads=2, init="ijepa")
    for depth, (a, b) in enumerate(zip(plain.blocks, ijepa.blocks), start=1):
        assert torch.equal(b.mlp[2].weight, a.mlp[2].weight / math.sqrt(2 * depth))
        assert torch.equal(b.attn.proj.weight, a.attn.proj.weight / math.sqrt(2 * depth))
    assert torch.equal(plain.embed.weight, ijepa.embed.weight)

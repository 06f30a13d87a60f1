import pytest
import torch
import torch.nn.functional as F

from stepkit.models import VisionTransformer
from stepkit.models.jepa import JEPAPredictor, gather_tokens, jepa_targets


def test_predictor_output_shape_and_it_depends_on_context():
    torch.manual_seed(0)
    pred = JEPAPredictor(num_patches=64, enc_dim=32, dim=16, depth=2, heads=4)
    context, context_idx = torch.randn(2, 10, 32), torch.arange(10).repeat(2, 1)
    target_idx = torch.tensor([[[20, 21, 28], [40, 41, 42]], [[0, 1, 2], [60, 61, 62]]])
    out = pred(context, context_idx, target_idx)
    assert out.shape == (2, 2, 3, 32)
    assert not torch.allclose(out, pred(context + 1.0, context_idx, target_idx))


def test_targets_are_layer_normed_tokens_at_the_target_positions():
    tokens = torch.randn(2, 16, 8) * 5 + 3
    idx = torch.tensor([[[1, 2], [5, 6]], [[0, 3], [7, 9]]])
    t = jepa_targets(tokens, idx)
    assert t.shape == (2, 2, 2, 8)
    torch.testing.assert_close(t[1, 1, 0], F.layer_norm(tokens[1, 7], (8,)))
    assert torch.equal(gather_tokens(tokens, idx)[0, 1, 1], tokens[0, 6])


def test_masked_loss_only_sees_target_positions():
    torch.manual_seed(0)
    vit = VisionTransformer.preset("toy", img_size=16)
    tokens = vit.tokens(torch.randn(1, 3, 16, 16))[:, 1:]
    idx = torch.tensor([[[0, 1, 4, 5]]])
    pred = torch.zeros(1, 1, 4, 64)
    loss = F.smooth_l1_loss(pred, jepa_targets(tokens, idx))
    changed = tokens.clone()
    changed[:, 10:] += 100.0  # outside the target block
    changed_loss = F.smooth_l1_loss(pred, jepa_targets(changed, idx))
    assert torch.equal(loss, changed_loss)
    changed[:, 0, 0] += 100.0  # inside it
    assert not torch.equal(loss, F.smooth_l1_loss(pred, jepa_targets(changed, idx)))


def test_pooled_patches_average_the_token_grid():
    from stepkit.models.jepa import pooled_patches

    torch.manual_seed(0)
    encoder = VisionTransformer.preset("toy", img_size=16, in_chans=1)  # 4x4 patches of 4x4 pixels
    x = torch.randn(2, 1, 16, 16)
    tokens = encoder(x, all_tokens=True)[:, 1:].reshape(2, 4, 4, -1)  # row-major patch grid
    pooled = pooled_patches(encoder, x, 2).reshape(2, -1, 2, 2)  # (B, dim, 2, 2)
    torch.testing.assert_close(pooled[:, :, 0, 1], tokens[:, :2, 2:].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled_patches(encoder, x, 1), tokens.mean(dim=(1, 2)))


def test_predictor_positions_are_fixed_sincos_by_default():
    from stepkit.models.vit import sincos_pos_embed_2d

    predictor = JEPAPredictor(16, enc_dim=32, dim=16, depth=1, heads=2)
    assert "pos" not in dict(predictor.named_parameters())
    torch.testing.assert_close(predictor.pos[0], sincos_pos_embed_2d(16, 4, 4))
    assert "pos" in dict(JEPAPredictor(16, 32, 16, 1, 2, pos_embed="learned").named_parameters())
    with pytest.raises(ValueError, match="num_patches=12 .* square grid"):
        JEPAPredictor(12, enc_dim=32, dim=16, depth=1, heads=2)


def test_masked_batchnorm_counts_only_visible_positions():
    from stepkit.models.jepa import MaskedBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    visible = (torch.rand(3, 1, 5, 5) > 0.6).float()
    norm = MaskedBatchNorm2d(4, momentum=0.5)
    out = norm(x, visible)
    rows = x.permute(1, 0, 2, 3)[:, visible.permute(1, 0, 2, 3)[0].bool()]  # (C, visible count)
    mean, var = rows.mean(dim=1), rows.var(dim=1, unbiased=False)
    expected = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(norm.running_mean, 0.5 * mean)  # from 0, momentum 0.5
    torch.testing.assert_close(norm.running_var, 0.5 + 0.5 * rows.var(dim=1, unbiased=True))
    plain = torch.nn.BatchNorm2d(4, momentum=0.5)  # everything visible: BatchNorm exactly
    torch.testing.assert_close(MaskedBatchNorm2d(4, momentum=0.5)(x, torch.ones(3, 1, 5, 5)), plain(x))
    norm.eval()
    assert torch.equal(norm(x, visible), norm(x))  # eval: running statistics, the mask is not needed


def test_masked_cnn_never_sees_a_masked_patch():
    from stepkit.models.jepa import MaskedCNN

    torch.manual_seed(0)
    cnn = MaskedCNN(img_size=16, in_chans=1, widths=(4, 8), strides=(2, 2))  # 4x4 grid of 4x4-pixel patches
    x = torch.randn(2, 1, 16, 16)
    keep = torch.tensor([[0, 1, 5], [6, 10, 15]])
    tokens = cnn(x, keep=keep)
    assert tokens.shape == (2, 3, 8)
    changed = x.clone()
    changed[0, :, 8:, :] = 100.0  # rows 2-3 of sample 0's patch grid: none kept
    changed[1, :, :4, :4] = -50.0  # patch 0 of sample 1: not kept
    assert torch.equal(cnn(changed, keep=keep), tokens)
    changed[0, :, 0, 0] += 1.0  # inside kept patch 0
    assert not torch.equal(cnn(changed, keep=keep)[0], tokens[0])


def test_masked_cnn_tokens_and_stage_outputs_are_on_the_patch_grid():
    from stepkit.models.jepa import MaskedCNN, grid_mean_to

    torch.manual_seed(0)
    cnn = MaskedCNN(img_size=16, in_chans=1, widths=(4, 8), strides=(2, 2)).eval()
    x = torch.randn(2, 1, 16, 16)
    tokens, (stage0, stage1) = cnn(x, return_layers=(0, 1))
    assert tokens.shape == (2, 16, 8) and stage0.shape == (2, 16, 4)
    assert torch.equal(stage1, tokens)
    first = torch.relu(cnn.norms[0](cnn.convs[0](x)))  # (2, 4, 8, 8): stage 0 at stride 2
    torch.testing.assert_close(stage0, grid_mean_to(first, (4, 4)).flatten(2).transpose(1, 2))
    torch.testing.assert_close(stage0[:, 5], first[:, :, 2:4, 2:4].mean(dim=(2, 3)))  # patch (1, 1)
    every = torch.arange(16).repeat(2, 1)
    torch.testing.assert_close(cnn(x, keep=every), tokens)  # all kept: the unmasked network
    with pytest.raises(ValueError, match="strides"):
        MaskedCNN(widths=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match="img_size"):
        MaskedCNN(img_size=30, strides=(1, 2, 2))


def test_conv_predictor_fills_unseen_patches_with_the_mask_token():
    from stepkit.models.jepa import ConvPredictor

    torch.manual_seed(0)
    pred = ConvPredictor(grid=4, enc_dim=8, dim=16, depth=2, out_dim=5)
    context, context_idx = torch.randn(2, 3, 8), torch.tensor([[0, 1, 2], [3, 7, 11]])
    target_idx = torch.tensor([[[5, 6], [9, 10]], [[0, 1], [14, 15]]])
    out = pred(context, context_idx, target_idx)
    assert out.shape == (2, 2, 2, 5)
    assert not torch.allclose(out, pred(context + 1.0, context_idx, target_idx))
    out.sum().backward()
    assert pred.mask_token.grad.abs().sum() > 0
    pred.zero_grad()
    every = torch.arange(16).repeat(2, 1)  # nothing unseen: the mask token takes no part
    pred(torch.randn(2, 16, 8), every, target_idx).sum().backward()
    assert pred.mask_token.grad is None or pred.mask_token.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="kernel"):
        ConvPredictor(4, 8, kernel=2)


def test_patch_tokens_and_last_layers_probe_features_for_both_encoders():
    from stepkit.models.jepa import MaskedCNN, patch_tokens, pooled_patches

    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    vit = VisionTransformer.preset("toy", img_size=16, in_chans=1).eval()
    tokens, (third, fourth) = patch_tokens(vit, x, layers=(2, 3))
    torch.testing.assert_close(tokens, vit(x, all_tokens=True)[:, 1:])
    torch.testing.assert_close(fourth, tokens)
    both = pooled_patches(vit, x, 1, layers=2)
    torch.testing.assert_close(both, torch.cat([third.mean(1), fourth.mean(1)], dim=1))
    cnn = MaskedCNN(img_size=16, in_chans=1, widths=(4, 8), strides=(2, 2)).eval()
    _, stages = patch_tokens(cnn, x, layers=(0, 1))
    torch.testing.assert_close(pooled_patches(cnn, x, 1, layers=2), torch.cat([s.mean(1) for s in stages], 1))
    with pytest.raises(ValueError, match="layers"):
        pooled_patches(cnn, x, 1, layers=3)

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

import math

import pytest
import torch

from stepkit.models.vit import DropPath, VisionTransformer


def toy(**kw):
    torch.manual_seed(0)
    return VisionTransformer.preset("toy", img_size=32, in_chans=1, **kw)


def test_vit_small_has_the_papers_parameter_count():
    model = VisionTransformer.preset("small")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(21.67e6, rel=0.01)


def test_class_features_and_tokens():
    model = toy().eval()
    x = torch.randn(3, 1, 32, 32)
    assert model(x).shape == (3, 64)
    assert model.tokens(x).shape == (3, 1 + 64, 64)


def test_other_sizes_interpolate_the_position_grid():
    model = toy().eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 64)  # a local crop: 4x4 patches
    assert model.pos_embed_for(8, 8) is model.pos_embed
    small = model.pos_embed_for(4, 4)
    assert small.shape == (1, 17, 64) and torch.equal(small[:, 0], model.pos_embed[:, 0])
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        model(torch.randn(1, 1, 30, 30))


def test_keep_indices_encode_only_those_patches():
    model = toy().eval()
    x = torch.randn(2, 1, 32, 32)
    keep = torch.tensor([[0, 5, 9], [1, 2, 63]])
    out = model.tokens(x, keep=keep)
    assert out.shape == (2, 4, 64)
    # same as feeding only those patch tokens: independent of the dropped patches
    x2 = x.clone()
    x2[:, :, 16:, :16] += 5.0  # patches 32..35, 40..43, ... (none kept in row 0 except none)
    keep0 = torch.tensor([[0, 5, 9]])
    torch.testing.assert_close(model.tokens(x[:1], keep=keep0), model.tokens(x2[:1], keep=keep0))


def test_return_layers_gives_intermediate_normed_outputs():
    model = toy().eval()
    out, layers = model.tokens(torch.randn(2, 1, 32, 32), return_layers=(1, 3))
    assert len(layers) == 2 and torch.equal(layers[1], out)


def test_drop_path_is_identity_in_eval_and_unbiased_in_training():
    layer = DropPath(0.5)
    x = torch.ones(20000, 3)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    assert set(y.unique().tolist()) == {0.0, 2.0} and y.mean().item() == pytest.approx(1.0, abs=0.05)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="img_size=30"):
        VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="dim=10"):
        VisionTransformer(dim=10, heads=3)
    with pytest.raises(ValueError, match="preset='giant'"):
        VisionTransformer.preset("giant")


@pytest.mark.parametrize("size", [32, 16, 24])
def test_patch_embedding_matmul_equals_the_strided_convolution(size):
    torch.manual_seed(0)
    model = VisionTransformer.preset("toy", img_size=32).double()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    conv = model.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.embed_patches(x), conv, rtol=1e-12, atol=1e-12)


def test_forward_with_return_layers_matches_tokens():
    torch.manual_seed(0)
    model = VisionTransformer.preset("toy", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    out, layers = model.tokens(x, return_layers=(0, 2))
    cls, same = model(x, return_layers=(0, 2))
    torch.testing.assert_close(cls, out[:, 0])
    tokens, _ = model(x, all_tokens=True, return_layers=(0, 2))
    torch.testing.assert_close(tokens, out)
    assert len(same) == 2 and all(torch.equal(a, b) for a, b in zip(same, layers))


def test_sincos_positions_by_hand():
    from stepkit.models.vit import sincos_pos_embed_2d

    pe = sincos_pos_embed_2d(4, 2, 3)  # one frequency (1.0): [sin col, cos col, sin row, cos row]
    rows, cols = torch.tensor([0.0, 0, 0, 1, 1, 1]), torch.tensor([0.0, 1, 2, 0, 1, 2])
    expected = torch.stack([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)
    torch.testing.assert_close(pe, expected)
    pe8 = sincos_pos_embed_2d(8, 4, 4)  # frequencies 1 and 10000 ** -0.5
    torch.testing.assert_close(pe8[7, 1], torch.tensor(math.sin(3 * 0.01)))  # row 1, column 3
    torch.testing.assert_close(pe8[7, 7], torch.tensor(math.cos(1 * 0.01)))
    with pytest.raises(ValueError, match="dim=6 .* a multiple of 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_fixed_positions_are_a_buffer_exact_at_every_grid():
    from stepkit.models.vit import sincos_pos_embed_2d

    model = VisionTransformer.preset("toy", img_size=32, in_chans=1, pos_embed="sincos")
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()
    small = model.pos_embed_for(4, 4)
    assert torch.equal(small[0, 0], torch.zeros(64))  # the class token's position
    torch.testing.assert_close(small[0, 1:], sincos_pos_embed_2d(64, 4, 4))
    with pytest.raises(ValueError, match="pos_embed='rope' .* 'learned', 'sincos'"):
        VisionTransformer.preset("toy", pos_embed="rope")


def test_gradient_checkpointing_gives_the_plain_gradients():
    torch.manual_seed(0)
    plain = VisionTransformer.preset("toy", img_size=32, drop_path=0.2).double()
    checkpointed = VisionTransformer.preset("toy", img_size=32, drop_path=0.2,
                                            grad_checkpointing=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same stochastic-depth draws in both
        model.train()
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-14)
    from stepkit.monitor import SavedActivations

    with SavedActivations() as without:
        plain(x).sum()
    with SavedActivations() as with_ckpt:
        checkpointed(x).sum()
    assert with_ckpt.peak < without.peak / 2


def test_a_vit_with_a_handful_of_tokens_says_so():
    import warnings

    with pytest.warns(UserWarning, match=r"patch_size=16 on 32 px images gives 4 token\(s\) \(2 x 2\)"):
        VisionTransformer(img_size=32, patch_size=16, dim=32, depth=1, heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VisionTransformer(img_size=32, patch_size=8, dim=32, depth=1, heads=2)  # 16 tokens: quiet


def test_a_vit_without_class_token_has_only_patch_tokens_and_pools_their_mean():
    from stepkit.models import patch_tokens

    for positions in ("learned", "sincos"):
        vit = VisionTransformer.preset("toy", img_size=16, pos_embed=positions, class_token=False).eval()
        assert "cls_token" not in vit.state_dict() and vit.state_dict()["pos_embed"].shape == (1, 16, 64)
        x = torch.rand(2, 3, 16, 16)
        tokens = vit(x, all_tokens=True)
        assert tokens.shape == (2, 16, 64) and torch.equal(patch_tokens(vit, x)[0], tokens)
        assert torch.allclose(vit(x), tokens.mean(dim=1))
        assert vit(torch.rand(2, 3, 24, 24), all_tokens=True).shape == (2, 36, 64)  # positions resized


def small(init, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, dim=64, depth=4, heads=4, init=init)


def test_dino_init_is_stepkits_with_the_patch_embedding_reset_to_pytorchs_conv_default():
    expected = small("stepkit")
    expected.patch_embed.reset_parameters()  # drawn where init="dino" draws it: after everything else
    got = small("dino").state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    bound = 1 / math.sqrt(3 * 8 * 8)
    assert got["patch_embed.weight"].abs().max() <= bound  # uniform within +-1/sqrt(fan-in)


def test_ijepa_init_patch_std_002_and_residual_outputs_divided_by_sqrt_2_depth():
    stepkit, ijepa = small("stepkit"), small("ijepa")
    for depth, (a, b) in enumerate(zip(stepkit.blocks, ijepa.blocks), start=1):
        assert torch.allclose(b.attn.proj.weight, a.attn.proj.weight / math.sqrt(2 * depth), atol=0)
        assert torch.allclose(b.mlp[2].weight, a.mlp[2].weight / math.sqrt(2 * depth), atol=0)
        assert torch.equal(b.attn.qkv.weight, a.attn.qkv.weight)
        assert torch.equal(b.mlp[0].weight, a.mlp[0].weight)
    torch.manual_seed(0)
    wide = VisionTransformer.preset("small", init="ijepa")
    assert abs(wide.patch_embed.weight.std().item() / 0.02 - 1) < 0.02


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init='xavier' is not allowed"):
        small("xavier")

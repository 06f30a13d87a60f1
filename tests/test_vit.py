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


# DINOv2's pieces: LayerScale, registers, the mask token, SwiGLU, uniform drop path, offset interpolation


def reference_tokens(model, x, mask=None):
    """The DINOv2 forward written out by hand from the paper's / reference's equations."""
    import torch.nn.functional as F

    b = x.shape[0]
    p = model.patch_size
    patches = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=p)
    patches = patches.flatten(2).transpose(1, 2)
    if mask is not None:
        patches = torch.where(mask[..., None], model.mask_token[None], patches)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), patches], dim=1) + model.pos_embed
    if hasattr(model, "register_tokens"):
        tokens = torch.cat([tokens[:, :1], model.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
    for block in model.blocks:
        h = block.norm1(tokens)
        n, d, heads = h.shape[1], h.shape[2], block.attn.heads
        q, k, v = block.attn.qkv(h).reshape(b, n, 3, heads, d // heads).unbind(2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        out = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(b, n, d)
        tokens = tokens + block.ls1.gamma * block.attn.proj(out)
        h = block.norm2(tokens)
        if hasattr(block.mlp, "w12"):
            hidden = block.mlp.w12(h)
            half = hidden.shape[-1] // 2
            ffn = block.mlp.w3(F.silu(hidden[..., :half]) * hidden[..., half:])
        else:
            ffn = block.mlp[2](F.gelu(block.mlp[0](h)))
        tokens = tokens + block.ls2.gamma * ffn
    return model.norm(tokens)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_vit_equals_the_reference_forward(ffn, registers):
    model = toy(layer_scale=1e-5, registers=registers, mask_token=True, ffn=ffn).eval()
    with torch.no_grad():  # move every tensor off its initial value, so each one matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    x = torch.randn(2, 1, 32, 32)
    mask = torch.rand(2, 64) < 0.3
    for m in (None, mask):
        ours = model.tokens(x, mask=m)
        assert ours.shape == (2, 1 + registers + 64, 64) and model.prefix == 1 + registers
        torch.testing.assert_close(ours, reference_tokens(model, x, m), atol=1e-5, rtol=1e-5)
    assert torch.equal(model(x), model.tokens(x)[:, 0])


def test_layer_scale_starts_at_its_value_and_swiglu_has_dinov2s_width():
    from stepkit.models.vit import SwiGLU, swiglu_hidden

    model = toy(layer_scale=1e-5, ffn="swiglu")
    assert all(torch.equal(b.ls1.gamma, torch.full((64,), 1e-5)) for b in model.blocks)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, SwiGLU) and mlp.w12.weight.shape == (2 * 176, 64)  # (int(256 * 2/3) + 7) // 8 * 8
    assert [swiglu_hidden(d, 4.0) for d in (384, 768, 1024, 1536)] == [1024, 2048, 2736, 4096]
    # ViT-g/14's released SwiGLU width (dinov2_vitg14: w12 (8192, 1536), w3 (1536, 4096))
    assert VisionTransformer(dim=1536, depth=1, heads=24, patch_size=14, img_size=56,
                             ffn="swiglu").blocks[0].mlp.w3.weight.shape == (1536, 4096)


def test_the_defaults_have_none_of_dinov2s_tensors():
    names = set(toy().state_dict())
    assert not any("ls1" in n or "w12" in n for n in names)
    assert not {"register_tokens", "mask_token"} & names


def test_a_mask_without_a_mask_token_or_of_the_wrong_shape_is_refused():
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ValueError, match="no mask token; build it with mask_token=True"):
        toy()(x, mask=torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: shape \(2, 16\), expected \(2, 64\)"):
        toy(mask_token=True)(x, mask=torch.zeros(2, 16, dtype=torch.bool))


def test_drop_path_uniform_or_rising_with_depth():
    assert [b.drop_path.p for b in toy(drop_path=0.3, drop_path_uniform=True).blocks] == [0.3] * 4
    assert [round(b.drop_path.p, 6) for b in toy(drop_path=0.3).blocks] == [0.0, 0.1, 0.2, 0.3]


def test_dinov2_offset_interpolation_samples_at_scale_factors():
    import torch.nn.functional as F

    model = toy(pos_offset=0.1).eval()
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, scale_factor=(5.1 / 8, 6.1 / 8), mode="bicubic", align_corners=False)
    ours = model.pos_embed_for(5, 6)
    assert ours.shape == (1, 1 + 30, 64)
    assert torch.equal(ours[:, 1:], by_hand.permute(0, 2, 3, 1).reshape(1, 30, 64))
    plain = toy().pos_embed_for(5, 6)
    assert not torch.allclose(ours, plain)  # the offset moves the samples, not only the size
    with pytest.raises(ValueError, match=r"pos_offset=1.0 is not allowed: expected in \[0, 1\)"):
        toy(pos_offset=1.0)


def test_dinov2_init_puts_the_class_token_and_registers_near_zero():
    model = toy(init="dinov2", registers=4)
    assert model.cls_token.std() < 1e-5 and model.register_tokens.std() < 1e-5
    assert 0.005 < toy(registers=4).register_tokens.std() < 0.05

import pytest
import torch

from stepkit.augment import (
    MultiCrop,
    color_jitter,
    gaussian_blur,
    multi_crop,
    normalize,
    random_grayscale,
    random_resized_crop,
    solarize,
)


def images(b=6, c=3, s=32, seed=0):
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_full_crop_without_flip_is_the_identity_resize():
    x = images()
    out = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, generator=gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_mirrors_left_right():
    x = images()
    out = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, generator=gen())
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_a_crop_is_a_resized_part_of_the_image():
    x = torch.zeros(1, 1, 32, 32)
    x[..., :16, :] = 1.0  # top half white
    out = random_resized_crop(x, 8, scale=(0.01, 0.01), ratio=(1.0, 1.0), flip_p=0.0, generator=gen(3))
    assert out.shape == (1, 1, 8, 8)
    assert out.min() >= 0 and out.max() <= 1


def test_shapes_ranges_and_determinism_of_multi_crop():
    cfg = MultiCrop(global_size=32, local_size=16, local_crops=4)
    x = images(s=40)
    views = multi_crop(x, cfg, gen(7))
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 4
    assert all(v.min() >= 0 and v.max() <= 1 for v in views)
    again = multi_crop(x, cfg, gen(7))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = multi_crop(x, cfg, gen(8))
    assert not torch.equal(views[0], other[0])
    assert not torch.equal(views[2][0], views[2][1])  # each image gets its own crop


def test_grayscale_single_channel_images_pass_through_colour_ops():
    x = images(c=1)
    jittered = color_jitter(x, p=1.0, generator=gen())
    assert jittered.shape == x.shape and 0 <= jittered.min() and jittered.max() <= 1


def test_color_jitter_off_is_identity_and_on_changes_images():
    x = images()
    torch.testing.assert_close(color_jitter(x, p=0.0, generator=gen()), x)
    assert not torch.allclose(color_jitter(x, p=1.0, generator=gen()), x)


def test_zero_hue_shift_round_trips_through_yiq():
    x = images()
    out = color_jitter(x, p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, generator=gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_grayscale_makes_channels_equal():
    out = random_grayscale(images(), p=1.0, generator=gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_blur_keeps_a_constant_image_and_smooths_an_impulse():
    const = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, p=1.0, generator=gen()), const)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[..., 7, 7] = 1.0
    blurred = gaussian_blur(impulse, p=1.0, sigma=(1.0, 1.0), generator=gen())
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[..., 7, 7].item() < 0.2 and blurred[..., 7, 8].item() > 0.05
    torch.testing.assert_close(gaussian_blur(impulse, p=0.0, generator=gen()), impulse)


def test_solarize_inverts_bright_pixels():
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 1, 3)
    expected = torch.tensor([0.2, 0.5, 0.1]).view(1, 1, 1, 3)
    torch.testing.assert_close(solarize(x, p=1.0, generator=gen()), expected)


def test_normalize():
    x = torch.ones(1, 2, 2, 2)
    out = normalize(x, (0.5, 0.0), (0.5, 2.0))
    assert out[0, 0].unique().tolist() == [1.0] and out[0, 1].unique().tolist() == [0.5]


def test_multi_crop_config_is_checked():
    with pytest.raises(ValueError, match=r"local_scale=\(0.5, 0.2\)"):
        MultiCrop(local_scale=(0.5, 0.2))


def test_to_unit_scales_uint8_and_passes_floats_through():
    from stepkit.augment import to_unit

    decoded = torch.tensor([0, 51, 255], dtype=torch.uint8)
    torch.testing.assert_close(to_unit(decoded), torch.tensor([0.0, 0.2, 1.0]))
    x = torch.tensor([0.5, 2.0])
    assert to_unit(x) is x


def test_a_generator_off_the_host_is_refused_with_the_reason():
    class CudaGenerator:  # stands in for torch.Generator(device="cuda") on a machine without one
        device = torch.device("cuda", 0)

    with pytest.raises(ValueError, match="generator is on cuda:0; .* pass a CPU torch.Generator"):
        crops = MultiCrop(global_size=16, local_size=8, local_crops=1)
        multi_crop(images(), crops, generator=CudaGenerator())


def test_blur_sigma_is_in_pixels_of_every_view_unless_relative():
    """DINO blurs its 96 px local views with the 224 px views' sigma; blur_relative scales it down."""
    from stepkit.augment import view_colors

    impulse = torch.zeros(1, 3, 16, 16)
    impulse[..., 8, 8] = 1.0
    quiet = dict(global_size=16, local_size=16, local_crops=1, jitter_p=0.0, grayscale_p=0.0,
                 blur_sigma=(2.0, 2.0), blur_p=(1.0, 1.0, 1.0), solarize_p=0.0)
    pixels = view_colors(impulse, MultiCrop(**quiet), 2, torch.Generator().manual_seed(0))
    relative = view_colors(impulse, MultiCrop(**quiet, blur_relative=True), 2,
                           torch.Generator().manual_seed(0))
    # a sigma of 2 px spreads the impulse: its peak falls far below that of a sigma of 2 x 16/224 px
    assert pixels[0, 0, 8, 8] < 0.1 < 0.9 < relative[0, 0, 8, 8]

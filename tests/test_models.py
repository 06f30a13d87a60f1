import pytest
import torch

from stepkit.models import MultimodalAutoencoder


def test_autoencoder_shapes_and_gradients_reach_every_tower():
    dims = {"video": 5, "audio": 3, "text": 4}
    model = MultimodalAutoencoder(dims, window=6, voxels=7, hidden=16)
    windows = {m: torch.randn(9, 6, d) for m, d in dims.items()}
    bottleneck, recon = model(windows)
    assert bottleneck.shape == (9, 7)
    assert {m: tuple(r.shape) for m, r in recon.items()} == {m: (9, 6, d) for m, d in dims.items()}
    (bottleneck.sum() + sum(r.sum() for r in recon.values())).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_autoencoder_names_a_missing_modality():
    model = MultimodalAutoencoder({"video": 2, "audio": 2}, window=3, voxels=4, hidden=8)
    with pytest.raises(ValueError, match=r"no input for \['audio'\]"):
        model({"video": torch.randn(2, 3, 2)})


def test_the_huge_preset_is_vit_h14():
    from stepkit.models.vit import PRESETS

    assert PRESETS["huge"] == dict(dim=1280, depth=32, heads=16, patch_size=14)  # I-JEPA's ViT-H/14

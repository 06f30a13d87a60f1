import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepkit.losses import (
    autoencoder_fmri_loss,
    correlation_loss,
    fmri_matching_loss,
    pearson_per_voxel,
    voxel_corr_summary,
    weighted_mse,
)


def test_pearson_equals_numpy_corrcoef_per_column():
    rng = np.random.default_rng(0)
    p, y = rng.standard_normal((40, 5)), rng.standard_normal((40, 5))
    expected = [np.corrcoef(p[:, v], y[:, v])[0, 1] for v in range(5)]
    got = pearson_per_voxel(torch.tensor(p), torch.tensor(y))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7)


def test_correlation_loss_is_one_minus_the_mean_pearson():
    rng = np.random.default_rng(1)
    p, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    r = np.mean([np.corrcoef(p[:, v], y[:, v])[0, 1] for v in range(4)])
    assert correlation_loss(torch.tensor(p), torch.tensor(y)).item() == pytest.approx(1 - r, rel=1e-7)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-100, 100))
def test_correlation_loss_is_scale_and_shift_invariant(scale, shift):
    torch.manual_seed(0)
    p, y = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    base = correlation_loss(p, y)
    torch.testing.assert_close(correlation_loss(scale * p + shift, y), base, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(correlation_loss(p, scale * y + shift), base, rtol=1e-6, atol=1e-9)


def test_constant_voxels_give_zero_correlation_and_finite_gradients():
    p = torch.randn(20, 3, requires_grad=True)
    y = torch.randn(20, 3)
    y[:, 1] = 4.0  # a constant voxel
    r = pearson_per_voxel(p, y)
    assert r[1].item() == 0.0 and torch.isfinite(r).all()
    correlation_loss(p, y).backward()
    assert torch.isfinite(p.grad).all()
    const_pred = torch.zeros(20, 3, requires_grad=True)
    loss = correlation_loss(const_pred, y)
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(const_pred.grad).all()


def test_perfect_and_anti_correlation():
    y = torch.randn(25, 2)
    assert correlation_loss(3 * y + 1, y).item() == pytest.approx(0.0, abs=1e-6)
    assert correlation_loss(-y, y).item() == pytest.approx(2.0, abs=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"same shape.*\(4, 2\) and \(4, 3\)"):
        pearson_per_voxel(torch.zeros(4, 2), torch.zeros(4, 3))


def test_voxel_corr_summary():
    s = voxel_corr_summary(torch.tensor([0.0, 0.05, 0.2, 0.5]), threshold=0.1)
    assert s["voxel_corr"].item() == pytest.approx(0.1875)
    assert s["voxel_corr_median"].item() == pytest.approx(0.05)  # torch's lower median
    assert s["voxel_corr_frac_above_0.1"].item() == 0.5


def test_fmri_matching_kinds():
    p, y = torch.randn(10, 3), torch.randn(10, 3)
    assert fmri_matching_loss(p, y, "mse").item() == pytest.approx(((p - y) ** 2).mean().item())
    assert fmri_matching_loss(p, y).item() == pytest.approx(correlation_loss(p, y).item())
    with pytest.raises(ValueError, match="kind='l1'"):
        fmri_matching_loss(p, y, "l1")


def test_weighted_mse_and_the_combined_loss_return_every_part():
    torch.manual_seed(0)
    recon = {"video": torch.randn(4, 2, 3), "audio": torch.randn(4, 2, 5)}
    inputs = {"video": torch.randn(4, 2, 3), "audio": torch.randn(4, 2, 5)}
    weights = {"video": 2.0, "audio": 0.0}
    total, parts = weighted_mse(recon, inputs, weights)
    mse_v = ((recon["video"] - inputs["video"]) ** 2).mean()
    assert parts["recon_video"].item() == pytest.approx(mse_v.item())
    assert parts["recon_audio"].item() > 0  # measured even with weight 0
    assert total.item() == pytest.approx(2 * mse_v.item())
    fp, f = torch.randn(4, 6), torch.randn(4, 6)
    all_total, all_parts = autoencoder_fmri_loss(recon, inputs, fp, f, recon_weights=weights, fmri_weight=0.5)
    assert set(all_parts) == {"fmri", "recon", "recon_video", "recon_audio"}
    expected = 0.5 * correlation_loss(fp, f) + total
    assert all_total.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match=r"no reconstruction or target for \['text'\]"):
        weighted_mse(recon, inputs, {"text": 1.0})


def test_variance_covariance_loss_by_hand():
    import numpy as np

    from stepkit.losses.jepa import variance_covariance_loss

    z = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 2.0], [2.0, 5.0, 2.0], [0.0, 2.0, 2.0]],
                     dtype=torch.float64)
    a = z.numpy()
    std = np.sqrt(a.var(axis=0, ddof=1) + 1e-4)
    expected_var = np.maximum(0.0, 1.0 - std).mean()
    cov = np.cov(a, rowvar=False)
    expected_cov = (np.square(cov).sum() - np.square(np.diag(cov)).sum()) / 3
    variance, covariance = variance_covariance_loss(z)
    assert variance.dtype == torch.float64
    assert float(variance) == pytest.approx(expected_var, rel=1e-12)
    assert float(covariance) == pytest.approx(expected_cov, rel=1e-12)
    # a collapsed batch: every std is sqrt(eps), so the hinge is gamma - sqrt(eps), no covariance
    v, c = variance_covariance_loss(torch.ones(5, 4), gamma=2.0)
    assert float(v) == pytest.approx(2.0 - 0.01) and float(c) == 0.0
    with pytest.raises(ValueError, match="at least 2 rows"):
        variance_covariance_loss(torch.ones(1, 3))


def test_weighted_mse_needs_a_weight():
    with pytest.raises(ValueError, match="weights is empty"):
        weighted_mse({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, {})

"""Against the reference procedures at the exact settings used, and the one dtype rule everywhere.

The dtype rule: every loss and metric computes in at least float32, and a float64 input stays float64
(so a float64 check against a reference agrees to ~1e-15, not ~1e-7).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from stepkit.evaluation import knn_accuracy, linear_probe_accuracy, retrieval_metrics
from stepkit.losses.contrastive import clip_loss, embedding_mse, info_nce, similarity_distillation_loss
from stepkit.losses.correlation import (
    correlation_loss,
    fmri_matching_loss,
    pearson_per_voxel,
    voxel_corr_summary,
)
from stepkit.losses.dino import dino_loss, koleo_loss, sinkhorn_knopp, teacher_softmax
from stepkit.losses.reconstruction import autoencoder_fmri_loss, weighted_mse
from stepkit.losses.weighting import UncertaintyWeighting
from stepkit.monitor import collapse_metrics


def reference_sinkhorn(teacher_out, temp, iterations):
    """SwAV's / DINOv2's procedure, written out plainly (float64)."""
    q = torch.exp(teacher_out.double() / temp).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


@pytest.mark.parametrize("iterations", [1, 3, 10])
@pytest.mark.parametrize("temp", [0.5, 0.1, 0.04])
@pytest.mark.parametrize("shape", [(16, 32), (64, 8)])
def test_sinkhorn_knopp_equals_the_reference_at_every_iteration_count(iterations, temp, shape):
    torch.manual_seed(iterations * 100 + shape[0])
    x = torch.randn(*shape, dtype=torch.float64) * 2
    got = sinkhorn_knopp(x, temp, iterations)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_sinkhorn(x, temp, iterations), rtol=1e-12, atol=1e-15)


def test_the_issue_reproduction_prints_about_1e_15():
    torch.manual_seed(0)
    x = torch.randn(16, 32, dtype=torch.float64)
    assert (sinkhorn_knopp(x, 0.1, 3) - reference_sinkhorn(x, 0.1, 3)).abs().max() < 1e-14


def test_sinkhorn_knopp_stays_finite_where_the_plain_form_overflows():
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=torch.float64) * 3
    assert not torch.isfinite(reference_sinkhorn(x, 0.001, 3)).all()  # exp(3000) overflows
    q = sinkhorn_knopp(x, 0.001, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16, dtype=torch.float64))  # last step: columns
    # scaled logits: the plain form (finite here) gives the same answer, the shift cancels exactly
    torch.testing.assert_close(sinkhorn_knopp(x / 50, 0.05, 3), reference_sinkhorn(x / 50, 0.05, 3),
                               rtol=1e-12, atol=1e-15)


def test_sinkhorn_knopp_returns_the_inputs_precision():
    x = torch.randn(8, 4)
    assert sinkhorn_knopp(x, 0.1).dtype == torch.float32
    assert sinkhorn_knopp(x.bfloat16(), 0.1).dtype == torch.float32


# --- float64 in, float64 out -----------------------------------------------------------------------


def f64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LOSSES = {
    "dino_loss": lambda: dino_loss(f64(8, 5), F.softmax(f64(4, 5, seed=1), -1), n_student_views=4),
    "teacher_softmax": lambda: teacher_softmax(f64(4, 5), torch.zeros(1, 5), 0.04),
    "sinkhorn_knopp": lambda: sinkhorn_knopp(f64(4, 5), 0.05),
    "koleo_loss": lambda: koleo_loss(f64(6, 3)),
    "info_nce": lambda: info_nce(f64(4, 3), f64(4, 3, seed=1), 10.0),
    "clip_loss": lambda: clip_loss(f64(4, 3), f64(4, 3, seed=1), 10.0),
    "similarity_distillation_loss": lambda: similarity_distillation_loss(
        f64(4, 3), f64(4, 3, seed=1), f64(4, 3, seed=2), f64(4, 3, seed=3)),
    "embedding_mse": lambda: embedding_mse(f64(4, 3), f64(4, 3, seed=1)),
    "pearson_per_voxel": lambda: pearson_per_voxel(f64(20, 3), f64(20, 3, seed=1)),
    "correlation_loss": lambda: correlation_loss(f64(20, 3), f64(20, 3, seed=1)),
    "fmri_matching_loss mse": lambda: fmri_matching_loss(f64(20, 3), f64(20, 3, seed=1), kind="mse"),
    "voxel_corr_summary": lambda: voxel_corr_summary(f64(20))["voxel_corr_frac_above_0.1"],
    "weighted_mse": lambda: weighted_mse({"a": f64(4, 2)}, {"a": f64(4, 2, seed=1)}, {"a": 1.0})[0],
    "autoencoder_fmri_loss": lambda: autoencoder_fmri_loss(
        {"a": f64(20, 2)}, {"a": f64(20, 2, seed=1)}, f64(20, 3, seed=2), f64(20, 3, seed=3),
        recon_weights={"a": 1.0})[0],
    "UncertaintyWeighting": lambda: UncertaintyWeighting(["a", "b"]).double()(
        {"a": f64(()), "b": f64((), seed=1)})[0],
    "collapse_metrics std": lambda: collapse_metrics(f64(8, 4))["std"],
    "collapse_metrics effective_rank": lambda: collapse_metrics(f64(8, 4))["effective_rank"],
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float64_in_float64_out(name):
    assert LOSSES[name]().dtype == torch.float64


def test_koleo_in_float64_matches_the_formula():
    x = F.normalize(f64(5, 3), dim=-1)
    dist = torch.cdist(x, x) + torch.eye(5, dtype=torch.float64) * 10
    expected = -torch.log(dist.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(x), expected, rtol=1e-12, atol=0)


def test_knn_accuracy_under_a_float64_default_and_with_float64_features():
    train, test = f64(30, 4), f64(10, 4, seed=1)
    labels, test_labels = torch.arange(30) % 3, torch.arange(10) % 3
    expected = knn_accuracy(train.float(), labels, test.float(), test_labels, k=5)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert knn_accuracy(train, labels, test, test_labels, k=5) == expected
    finally:
        torch.set_default_dtype(previous)
    assert linear_probe_accuracy(train, labels, test, test_labels) >= 0.0
    assert set(retrieval_metrics(train[:10], test, ks=(1,))) == {"recall_at_1_i2t", "recall_at_1_t2i"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_knn_accuracy_with_features_on_the_gpu():
    train, test = f64(30, 4), f64(10, 4, seed=1)
    labels, test_labels = torch.arange(30) % 3, torch.arange(10) % 3
    expected = knn_accuracy(train, labels, test, test_labels, k=5)
    assert knn_accuracy(train.cuda(), labels, test.cuda(), test_labels, k=5) == expected


def test_dino_loss_in_float64_equals_the_pairwise_formula():
    student, teacher = f64(8, 5), F.softmax(f64(4, 5, seed=1), -1)
    log_p = F.log_softmax(student / 0.1, -1).chunk(4)
    q = teacher.chunk(2)
    pairs = [-(q[i] * log_p[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    expected = torch.stack(pairs).mean()
    torch.testing.assert_close(dino_loss(student, teacher, student_temp=0.1, n_student_views=4), expected,
                               rtol=1e-13, atol=0)
    assert math.isfinite(float(expected))


def test_koleo_gives_a_duplicated_row_distance_eps():
    x = F.normalize(f64(6, 4), dim=-1)
    x[1] = x[0]
    nearest = (torch.cdist(x, x) + torch.eye(6, dtype=torch.float64) * 10).min(dim=1).values
    nearest[:2] = 1e-8  # the duplicated pair: floored at eps
    torch.testing.assert_close(koleo_loss(x), -torch.log(nearest + 1e-8).mean(), rtol=1e-6, atol=0)

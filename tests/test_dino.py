import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepkit.losses.dino import (
    dino_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax,
    teacher_temp_at,
    update_center,
)
from stepkit.models.dino import DINOHead, cancel_last_layer_gradients, multi_crop_forward, resolution_groups


def reference_dino_loss(student, teacher, center, s_temp, t_temp, n_crops):
    """The loop of the DINO paper's pseudo-code, written out."""
    s = (student / s_temp).chunk(n_crops)
    t = F.softmax((teacher - center) / t_temp, dim=-1).chunk(2)
    total, pairs = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_crops", [2, 6])
def test_dino_loss_equals_the_formula(n_crops):
    torch.manual_seed(n_crops)
    b, k = 5, 17
    student, teacher, center = torch.randn(n_crops * b, k), torch.randn(2 * b, k), torch.randn(1, k)
    targets = teacher_softmax(teacher, center, 0.04)
    got = dino_loss(student, targets, student_temp=0.1, n_student_views=n_crops)
    want = reference_dino_loss(student, teacher, center, 0.1, 0.04, n_crops)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_dino_loss_gradient_flows_only_to_the_student():
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    dino_loss(student, teacher_softmax(teacher, torch.zeros(1, 5), 0.04), n_student_views=4).backward()
    assert student.grad is not None and teacher.grad is None


def test_centering_is_an_ema_of_the_batch_mean():
    center = torch.ones(1, 3)
    out = torch.tensor([[0.0, 2.0, 4.0], [2.0, 2.0, 0.0]])
    update_center(center, out, momentum=0.9)
    torch.testing.assert_close(center, 0.9 * torch.ones(1, 3) + 0.1 * torch.tensor([[1.0, 2.0, 2.0]]))


def test_teacher_temperature_schedule_matches_dinos_linspace():
    for warmup in (0, 1, 2, 30):
        ref = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(40 - warmup) * 0.07))
        got = [teacher_temp_at(t, warmup_temp=0.04, temp=0.07, warmup_steps=warmup) for t in range(40)]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)


def test_sinkhorn_knopp_balances_prototypes():
    torch.manual_seed(0)
    q = sinkhorn_knopp(torch.randn(64, 8), teacher_temp=0.5, iterations=50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 64 / 8), rtol=1e-3, atol=1e-3)
    sharp = sinkhorn_knopp(torch.randn(16, 4) * 3, teacher_temp=0.001)  # logits of thousands
    assert torch.isfinite(sharp).all()
    torch.testing.assert_close(sharp.sum(dim=1), torch.ones(16))


def test_koleo_on_known_points():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # neighbours sqrt(2) apart
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    spread, clumped = torch.randn(64, 8), torch.randn(64, 8) * 0.01 + torch.ones(8)
    assert koleo_loss(spread) < koleo_loss(clumped)


def test_dino_head_outputs_cosines_with_a_fixed_norm_last_layer():
    head = DINOHead(16, 32, hidden=24, bottleneck=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32) and out.abs().max() <= 1.0 + 1e-6
    assert not head.last_layer.weight_g.requires_grad
    assert DINOHead(16, 32, norm_last_layer=False).last_layer.weight_g.requires_grad
    linears = [m for m in DINOHead(16, 32, nlayers=3, batch_norm=True).mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 2048), (2048, 2048), (2048, 256)]


def test_last_layer_is_frozen_for_the_first_steps():
    head = DINOHead(4, 6, hidden=8, bottleneck=3)
    for step, frozen in [(0, True), (2, True), (3, False)]:
        head(torch.randn(2, 4)).sum().backward()
        cancel_last_layer_gradients(head, step, freeze_steps=3)
        assert (head.last_layer.weight_v.grad is None) == frozen
        assert head.mlp[0].weight.grad is not None
        head.zero_grad()


def test_crops_are_grouped_by_resolution_and_run_once_per_group():
    views = [torch.randn(2, 1, 8, 8)] * 2 + [torch.randn(2, 1, 4, 4)] * 3
    assert resolution_groups(views) == [(0, 2), (2, 5)]
    calls = []

    def backbone(x):
        calls.append(tuple(x.shape))
        return x.flatten(1)[:, :3]

    out = multi_crop_forward(backbone, None, views)
    assert calls == [(4, 1, 8, 8), (6, 1, 4, 4)] and out.shape == (10, 3)
    torch.testing.assert_close(out[4:6], views[2].flatten(1)[:, :3])


def test_koleo_gradient_is_finite_for_duplicate_points():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("student_rows", "teacher_rows", "views"), [(10, 4, 4), (8, 6, 4), (8, 4, 1)])
def test_dino_loss_refuses_rows_that_are_not_views_of_one_batch(student_rows, teacher_rows, views):
    with pytest.raises(ValueError, match="not views of one batch"):
        dino_loss(torch.zeros(student_rows, 3), torch.full((teacher_rows, 3), 1 / 3), n_student_views=views)


def test_dino_last_layer_init_is_nn_linears_default():
    torch.manual_seed(0)
    head = DINOHead(64, 4096, hidden=64, bottleneck=256, last_layer_init="dino")
    v = head.last_layer.weight_v
    assert v.abs().max() <= 1 / 16 and abs(v.std().item() / (1 / 16 / math.sqrt(3)) - 1) < 0.01
    torch.manual_seed(0)
    ours = DINOHead(64, 4096, hidden=64, bottleneck=256).last_layer.weight_v
    assert abs(ours.std().item() / 0.02 - 1) < 0.01  # stepkit's: a truncated normal, std 0.02


# iBOT's masked-patch loss (DINOv2)


def ibot_reference(student_all, teacher_all, masks, temp=0.1):
    """DINOv2's iBOTPatchLoss.forward on whole (B, N, K) tensors: per image, the mean over its masked
    patches, then the mean over images."""
    per_patch = torch.sum(teacher_all * F.log_softmax(student_all / temp, dim=-1), dim=-1)
    per_image = torch.sum(per_patch * masks.float(), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
    return -per_image.mean()


def test_ibot_patch_loss_equals_the_reference_on_masked_rows():
    from stepkit.losses.dino import ibot_patch_loss

    torch.manual_seed(0)
    masks = torch.rand(6, 16) < 0.3
    masks[2] = False  # an image without masked patches still counts in the mean
    student = torch.randn(6, 16, 32)
    teacher = torch.randn(6, 16, 32).softmax(-1)
    ours = ibot_patch_loss(student[masks], teacher[masks], masks, student_temp=0.1)
    torch.testing.assert_close(ours, ibot_reference(student, teacher, masks), atol=1e-6, rtol=1e-6)
    # by hand: one image of two, one masked patch with uniform targets and logits -> log K / 2
    one = torch.tensor([[True, False, False], [False, False, False]])
    assert ibot_patch_loss(torch.zeros(1, 4), torch.full((1, 4), 0.25), one).item() == pytest.approx(
        math.log(4) / 2, abs=1e-7)


def test_ibot_patch_loss_gradients_reach_only_the_masked_rows_and_mixed_dtypes_meet():
    from stepkit.losses.dino import ibot_patch_loss

    masks = torch.tensor([[True, True, False], [False, True, False]])
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5).softmax(-1)  # float32 targets beside float64 logits
    loss = ibot_patch_loss(student, teacher, masks)
    assert loss.dtype == torch.float64
    loss.backward()
    # rows of image 0 weigh 1/2 each, image 1's row 1, all over B = 2
    expected = (F.softmax(student.detach() / 0.1, -1) - teacher.double()) / 0.1 * torch.tensor(
        [0.25, 0.25, 0.5], dtype=torch.float64)[:, None]
    torch.testing.assert_close(student.grad, expected)
    with pytest.raises(ValueError, match="3 student rows and 2 teacher rows"):
        ibot_patch_loss(student, teacher[:2], masks)


def test_dino_loss_takes_float64_logits_beside_float32_targets():
    student = torch.randn(4, 3, dtype=torch.float64)
    teacher = torch.randn(4, 3).softmax(-1)
    loss = dino_loss(student, teacher, n_student_views=2)
    assert loss.dtype == torch.float64
    same = dino_loss(student, teacher.double(), n_student_views=2)
    assert loss.item() == pytest.approx(same.item(), abs=1e-12)


def test_the_patch_center_averages_each_ranks_mean():
    from stepkit.losses.dino import update_patch_center

    center = torch.ones(1, 2)
    update_patch_center(center, torch.tensor([[2.0, 0.0], [4.0, 2.0], [0.0, 1.0]]), momentum=0.9)
    torch.testing.assert_close(center, 0.9 * torch.ones(1, 2) + 0.1 * torch.tensor([[2.0, 1.0]]))

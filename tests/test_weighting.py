import math

import pytest
import torch

from stepkit.losses import UncertaintyWeighting, fixed_weighting


def test_uncertainty_weighting_value_and_gradients_match_the_formula():
    weighting = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.3, -1.2]))
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(0.5, requires_grad=True)
    total, parts = weighting({"a": la, "b": lb})
    s = [0.3, -1.2]
    expected = sum(0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, [2.0, 0.5]))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    # d/dL_i = 0.5 exp(-s_i); d/ds_i = -0.5 exp(-s_i) L_i + 0.5
    assert la.grad.item() == pytest.approx(0.5 * math.exp(-0.3), rel=1e-6)
    assert lb.grad.item() == pytest.approx(0.5 * math.exp(1.2), rel=1e-6)
    expected_grad = [-0.5 * math.exp(-si) * li + 0.5 for si, li in zip(s, [2.0, 0.5])]
    assert weighting.log_var.grad.tolist() == pytest.approx(expected_grad, rel=1e-6)
    assert parts["weight_a"].item() == pytest.approx(0.5 * math.exp(-0.3)) and parts["loss_b"].item() == 0.5


def test_uncertainty_weighting_learns_to_downweight_the_noisier_task():
    weighting = UncertaintyWeighting(["small", "large"])
    opt = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(300):
        total, _ = weighting({"small": torch.tensor(0.1), "large": torch.tensor(10.0)})
        opt.zero_grad()
        total.backward()
        opt.step()
    # the optimum is s_i = log L_i
    assert weighting.log_var.tolist() == pytest.approx([math.log(0.1), math.log(10.0)], abs=0.05)


def test_fixed_weighting():
    total, parts = fixed_weighting({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": 0.5, "b": 2.0})
    assert total.item() == 7.0 and parts == {"loss_a": 2.0, "loss_b": 3.0}
    with pytest.raises(ValueError, match=r"no loss named \['c'\]"):
        fixed_weighting({"a": torch.tensor(1.0)}, {"c": 1.0})


def test_bad_task_lists_are_refused():
    with pytest.raises(ValueError, match="tasks="):
        UncertaintyWeighting(["a", "a"])
    with pytest.raises(ValueError, match=r"no loss for tasks \['b'\]"):
        UncertaintyWeighting(["a", "b"])({"a": torch.tensor(1.0)})


def test_fixed_weighting_needs_a_weight():
    with pytest.raises(ValueError, match="weights is empty"):
        fixed_weighting({"a": torch.tensor(1.0)}, {})

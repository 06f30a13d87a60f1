import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from stepkit import ema_copy, ema_update


def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()


def train_bn_stats(model):
    model.train()
    model(torch.randn(8, 4, dtype=torch.float64))  # moves running stats, counts a batch


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_momentum_one_keeps_the_target():
    target, online = net(0), net(1)
    before = params(target)
    ema_update(target, online, 1.0)
    for p, b in zip(target.parameters(), before):
        assert torch.equal(p, b)


def test_momentum_zero_copies_the_online_weights_and_buffers():
    target, online = net(0), net(1)
    train_bn_stats(online)
    ema_update(target, online, 0.0)
    for (name, t), o in zip(target.state_dict().items(), online.state_dict().values()):
        assert torch.equal(t, o), name


@settings(max_examples=25, deadline=None)
@given(m=st.floats(0.0, 1.0))
def test_ema_matches_the_formula(m):
    target, online = net(0), net(1)
    expected = [m * t + (1 - m) * o for t, o in zip(params(target), params(online))]
    ema_update(target, online, m)
    for p, e in zip(target.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-15)


def test_buffers_are_copied_not_averaged():
    target, online = net(0), net(1)
    train_bn_stats(online)
    ema_update(target, online, 0.9)
    bn_t, bn_o = target[1], online[1]
    assert torch.equal(bn_t.running_mean, bn_o.running_mean)
    assert bn_t.num_batches_tracked.item() == 1


def test_tensor_momentum_equals_float_momentum():
    a, b, online = net(0), net(0), net(1)
    ema_update(a, online, 0.7)
    ema_update(b, online, torch.tensor(0.7, dtype=torch.float64))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_dict_target_evaluated_with_functional_call():
    online = net(1)
    train_bn_stats(online)
    target = ema_copy(online)
    module_target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    train_bn_stats(online)
    ema_update(target, online, 0.9)
    ema_update(module_target, online, 0.9)
    online.eval()
    module_target.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(functional_call(online, target, (x,)), module_target(x), rtol=0, atol=0)


def test_a_dict_of_tensors_is_an_online_too():
    # weights trained functionally (torch.func): a dict online, into a module target or a dict one
    online = net(1)
    train_bn_stats(online)
    weights = {k: v.detach().clone() for k, v in online.state_dict().items()}
    module_target, dict_target = copy.deepcopy(net(2)), ema_copy(net(2))
    before_module = copy.deepcopy(module_target.state_dict())
    before_dict = {k: v.clone() for k, v in dict_target.items()}
    ema_update(module_target, weights, 0.75)
    ema_update(dict_target, weights, 0.75)
    buffers = {name for name, _ in online.named_buffers()}
    for name, value in module_target.state_dict().items():  # the module's split: buffers copied
        expected = weights[name] if name in buffers else 0.75 * before_module[name] + 0.25 * weights[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-15)
    for name, value in dict_target.items():  # a dict's: floats averaged, the batch counter copied
        floating = value.is_floating_point()
        expected = 0.75 * before_dict[name] + 0.25 * weights[name] if floating else weights[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-15)
    assert int(dict_target["1.num_batches_tracked"]) == 1
    with pytest.raises(ValueError, match="0.weight"):
        ema_update(dict_target, {k: v for k, v in weights.items() if k != "0.weight"}, 0.5)


def test_ddp_and_compile_wrappers_are_seen_through():
    target, online = net(0), net(1)
    wrapped = torch.compile(online)  # lazy: nothing is compiled until called
    ema_update(target, wrapped, 0.0)
    for p, q in zip(target.parameters(), online.parameters()):
        assert torch.equal(p, q)


def test_fsdp2_sharded_target_is_updated_shard_by_shard(gloo_world_of_one):
    from torch.distributed.fsdp import fully_shard

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()

    plain_target, plain_online = mlp(0), mlp(1)
    target, online = mlp(0), mlp(1)
    for model in (target, online):
        fully_shard(model)
    ema_update(plain_target, plain_online, 0.75)
    ema_update(target, online, 0.75)
    for p, q in zip(plain_target.parameters(), target.parameters()):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=0, atol=1e-15)


def test_mismatched_models_are_refused_with_the_names():
    target = net(0)
    other = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()).double()
    with pytest.raises(ValueError, match=r"missing in target \[\], not in online \['3.bias', '3.weight'\]"):
        ema_update(target, other, 0.5)
    with pytest.raises(ValueError, match="'extra'"):
        ema_update(dict(ema_copy(target), extra=torch.zeros(1)), target, 0.5)


def test_momentum_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"momentum=1.5 .* \[0.0, 1.0\]"):
        ema_update(net(0), net(1), 1.5)


def test_ema_of_a_lower_precision_target_from_float_online():
    online = net(1).float()
    target = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ema_copy(online).items()}
    ema_update(target, online, 0.0)
    assert target["0.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(target["0.weight"], online[0].weight.detach().to(torch.bfloat16))


def test_a_replaced_parameter_is_noticed_by_the_cached_plan():
    target, online = net(0), net(1)
    ema_update(target, online, 0.5)  # builds and keeps the plan
    online[3] = nn.Linear(6, 2).double()  # new tensor objects
    with torch.no_grad():
        online[3].weight.fill_(2.0)
    before = target[3].weight.detach().clone()
    ema_update(target, online, 0.5)
    torch.testing.assert_close(target[3].weight, 0.5 * before + 0.5 * 2.0, rtol=0, atol=1e-15)
    target[0] = nn.Linear(4, 6).double()  # the target's side too
    with torch.no_grad():
        target[0].weight.fill_(1.0)
    ema_update(target, online, 0.25)
    torch.testing.assert_close(target[0].weight, 0.25 + 0.75 * online[0].weight, rtol=0, atol=1e-15)


def test_the_cached_plan_follows_in_place_changes_and_new_targets():
    target, online = net(0), net(1)
    ema_update(target, online, 0.9)
    with torch.no_grad():
        online[0].weight.data = torch.full_like(online[0].weight, 3.0)  # same Parameter, new data
    before = target[0].weight.detach().clone()
    ema_update(target, online, 0.9)
    torch.testing.assert_close(target[0].weight, 0.9 * before + 0.1 * 3.0, rtol=0, atol=1e-15)
    other = ema_copy(online)  # another target for the same online model
    ema_update(other, online, 0.0)
    assert torch.equal(other["0.weight"], online[0].weight)
    online.float()  # dtype changed in place: the lists are checked again, the float64 target converts
    ema_update(target, online, 0.5)
    assert target[0].weight.dtype == torch.float64


def test_a_shape_changed_in_place_still_gets_the_clear_error():
    target, online = net(0), net(1)
    ema_update(target, online, 0.9)
    with torch.no_grad():
        online[0].weight.data = torch.zeros(7, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(6, 4\) in target, \(7, 4\) online"):
        ema_update(target, online, 0.9)


def test_target_copy_is_deterministic_in_training_mode():
    from stepkit.ema import target_copy
    from stepkit.models import DINOHead, VisionTransformer

    student = nn.Sequential(VisionTransformer.preset("toy", img_size=16, drop_path=0.3), nn.Dropout(0.5),
                            DINOHead(64, 32, hidden=16, bottleneck=8)).train()
    teacher = target_copy(student)
    x = torch.rand(4, 3, 16, 16)
    assert teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher(x), teacher(x))
    assert not torch.equal(student(x), student(x))  # the student keeps its stochastic depth and dropout
    for a, b in zip(student.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)

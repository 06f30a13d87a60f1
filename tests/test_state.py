import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepkit import (
    LRSchedule,
    MomentumSchedule,
    TrainState,
    accumulate,
    apply_update,
    clip,
    ema_copy,
    ema_update,
    forward_loss,
    lr_at,
    momentum_at,
)
from stepkit.state import rng_state, set_rng_state

TOTAL = 12


def build(seed=0, dict_target=False, scaler=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4))
    target = ema_copy(model) if dict_target else _clone(model)
    return TrainState(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        target=target,
        scaler=torch.amp.GradScaler("cpu") if scaler else None,
        extras={"center": torch.zeros(4), "note": "dino"},
    )


def _clone(model):
    import copy

    return copy.deepcopy(model).requires_grad_(False)


def loss_fn(state, batch):
    out = state.model(batch)  # dropout draws from torch's RNG
    noise = torch.randn(out.shape)  # and so does the loss
    return F.mse_loss(out, noise + np.random.rand() + random.random())


def train(state, steps):
    lr, mom = LRSchedule(lr=1e-2, warmup_steps=3), MomentumSchedule(momentum=0.9)
    while state.step < steps:
        batch = torch.randn(8, 6)
        state.data_position += 1
        loss, _ = forward_loss(loss_fn, state, batch)
        if accumulate(state, loss, every=2):
            clip(state, max_norm=1.0)
            apply_update(state, lr=lr_at(state.step, lr, TOTAL), wd=0.05)
            ema_update(state.target, state.model, momentum_at(state.step, mom, TOTAL))
            state.extras["center"].mul_(0.9).add_(0.1)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weights(state):
    t = state.target
    t = t if isinstance(t, dict) else t.state_dict()
    return [*state.model.state_dict().values(), *t.values()]


@pytest.mark.parametrize("dict_target", [False, True])
def test_resume_is_bit_identical_to_the_run_that_never_stopped(tmp_path, dict_target):
    seed_everything(7)
    straight = build(dict_target=dict_target)
    train(straight, TOTAL)

    seed_everything(7)
    first = build(dict_target=dict_target)
    train(first, TOTAL // 2)
    torch.save(first.state_dict(), tmp_path / "half.pt")
    seed_everything(12345)  # the new process starts with other RNG states and fresh weights
    resumed = build(seed=99, dict_target=dict_target)
    resumed.load_state_dict(torch.load(tmp_path / "half.pt", weights_only=True))
    train(resumed, TOTAL)

    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    assert torch.equal(straight.extras["center"], resumed.extras["center"])
    assert (straight.step, straight.micro_step, straight.data_position) == (
        resumed.step, resumed.micro_step, resumed.data_position
    )
    assert straight.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        resumed.optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_state_dict_round_trips_every_field(tmp_path):
    state = build(scaler=True)
    state.step, state.micro_step, state.accum, state.data_position = 5, 11, 2, 40
    state.run_id = "abc123"
    state.skipped_steps += 3
    state.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    state.extras["center"].fill_(0.5)
    path = tmp_path / "s.pt"
    torch.save(state.state_dict(), path)

    other = build(seed=3, scaler=True)
    center = other.extras["center"]
    other.load_state_dict(torch.load(path, weights_only=True))
    assert (other.step, other.micro_step, other.accum, other.data_position, other.run_id) == (
        5, 11, 2, 40, "abc123"
    )
    assert other.skipped_steps.item() == 3
    assert other.scaler.get_scale() == 64.0
    assert other.extras["center"] is center and torch.equal(center, torch.full((4,), 0.5))
    assert other.extras["note"] == "dino"
    for a, b in zip(weights(state), weights(other)):
        assert torch.equal(a, b)


def test_rng_states_round_trip():
    seed_everything(3)
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(4)
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_refuses_a_state_without_the_target_it_needs():
    saved = build().state_dict()
    del saved["target"]
    with pytest.raises(ValueError, match="target: the saved state has no EMA target"):
        build().load_state_dict(saved)


def test_load_refuses_a_dict_target_of_another_model():
    saved = build(dict_target=True).state_dict()
    saved["target"]["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"target\['0.weight'\]: saved shape \(3, 3\)"):
        build(dict_target=True).load_state_dict(saved)


def test_load_refuses_something_that_is_not_a_train_state():
    with pytest.raises(ValueError, match="missing .*'model'"):
        build().load_state_dict({"step": 1})


def test_bad_counters_are_refused():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accum=0"):
        TrainState(model=model, optimizer=opt, accum=0)
    with pytest.raises(ValueError, match="step=-1"):
        TrainState(model=model, optimizer=opt, step=-1)

"""A step composed of stepkit functions under torch.compile: same numbers, no breaks of ours.

torch's own ``Optimizer.step`` graph-breaks on purpose (pytorch#104053) and
``Tensor.backward`` breaks unless ``trace_autograd_ops`` is on; those are
the only breaks allowed. The pieces that hold no such call compile with
``fullgraph=True``, which also proves they never read a value on the host.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepkit import (
    LRSchedule,
    MomentumSchedule,
    TrainState,
    WDSchedule,
    accumulate,
    apply_update,
    clip,
    ema_copy,
    ema_update,
    forward_loss,
    lr_at,
    momentum_at,
    param_groups,
    wd_at,
)

TOTAL = 6
LR = LRSchedule(lr=1e-2, warmup_steps=2)
WD = WDSchedule(wd=0.04, wd_final=0.4)
EMA = MomentumSchedule(momentum=0.9)


def make_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 2)).double()
    # Fused AdamW with a float32 tensor lr: skips non-finite steps without a
    # host read and takes a new lr each step without recompiling.
    opt = torch.optim.AdamW(param_groups(model), lr=torch.tensor(1e-3), fused=True)
    return TrainState(model=model, optimizer=opt, target=ema_copy(model))


def loss_fn(state, batch):
    x, y = batch
    out = state.model(x)
    return F.mse_loss(out, y), {"out_std": out.std()}


def train_step(state, batch, t):
    loss, aux = forward_loss(loss_fn, state, batch)
    accumulate(state, loss)
    loss = loss.detach()  # live past the optimizer's graph break: must not hold the used graph
    norm = clip(state, max_norm=1.0)
    apply_update(state, lr=lr_at(t, LR, TOTAL), wd=wd_at(t, WD, TOTAL))
    ema_update(state.target, state.model, momentum_at(t, EMA, TOTAL))
    return loss, norm


def batches():
    g = torch.Generator().manual_seed(1)
    shape = dict(generator=g, dtype=torch.float64)
    return [(torch.randn(16, 4, **shape), torch.randn(16, 2, **shape)) for _ in range(TOTAL)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_equals_eager():
    eager, compiled = make_state(), make_state()
    step = torch.compile(train_step)
    for i, batch in enumerate(batches()):
        t = torch.tensor(i)
        l_e, n_e = train_step(eager, batch, t)
        l_c, n_c = step(compiled, batch, t)
        torch.testing.assert_close(l_c, l_e, rtol=0, atol=1e-8)
        torch.testing.assert_close(n_c, n_e, rtol=0, atol=1e-8)
    assert compiled.step == eager.step == TOTAL
    assert [g["lr"].item() for g in compiled.optimizer.param_groups] == [
        g["lr"].item() for g in eager.optimizer.param_groups
    ]
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8)
    for k in eager.target:
        torch.testing.assert_close(compiled.target[k], eager.target[k], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_only_torch_itself_breaks_the_graph():
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(train_step)(make_state(), batches()[0], torch.tensor(3))
    stepkit_dir = os.path.dirname(os.path.abspath(__import__("stepkit").__file__))
    for reason in explained.break_reasons:
        innermost = reason.user_stack[-1].filename
        assert not innermost.startswith(stepkit_dir), (reason.reason, innermost)
        assert os.sep + os.path.join("torch", "optim") in innermost, (reason.reason, innermost)


@pytest.mark.slow
def test_the_pieces_compile_whole_with_fullgraph():
    state = make_state()
    batch = batches()[0]
    full = lambda fn: torch.compile(fn, fullgraph=True)  # noqa: E731
    loss, aux = full(lambda s, b: forward_loss(loss_fn, s, b, amp="bf16"))(state, batch)
    loss.backward()
    norm = full(lambda s: clip(s, max_norm=0.5, max_value=0.1))(state)
    assert norm.item() > 0
    full(lambda s, t: ema_update(s.target, s.model, momentum_at(t, EMA, TOTAL)))(state, torch.tensor(2))
    lr = full(lambda t: lr_at(t, LR, TOTAL))(torch.tensor(1))
    assert lr.item() == pytest.approx(lr_at(1, LR, TOTAL))


@pytest.mark.slow
def test_a_float64_cpu_tensor_lr_is_still_updated_under_compile():
    # torch.compile drops in-place writes to 0-d float64 CPU tensors; stepkit
    # writes that case outside the graph so the lr does not silently freeze.
    model = nn.Linear(2, 1)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr, fused=True))
    step = torch.compile(lambda s, v: apply_update(s, lr=v))
    for value in (0.5, 0.25):
        model(torch.randn(3, 2)).sum().backward()
        step(state, torch.tensor(value))
        assert lr.item() == value

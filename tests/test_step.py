import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stepkit import TrainState, accumulate, apply_update, clip, forward_loss, param_groups


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def mse(state, batch):
    x, y = batch
    out = state.model(x)
    return F.mse_loss(out, y), {"out_mean": out.mean(), "label": "mse"}


def data(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def sgd_state(model, **kw):
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


# --- forward_loss -----------------------------------------------------------------------------


def test_forward_loss_returns_float32_loss_and_detached_aux():
    state = sgd_state(mlp(torch.float32))
    x, y = data(8, torch.float32)
    loss, aux = forward_loss(mse, state, (x, y))
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert loss.item() == pytest.approx(F.mse_loss(state.model(x), y).item())
    assert not aux["out_mean"].requires_grad and aux["label"] == "mse"


def test_forward_loss_accepts_a_bare_loss():
    state = sgd_state(mlp(torch.float32))
    loss, aux = forward_loss(lambda s, b: s.model(b).sum(), state, torch.randn(2, 5))
    assert aux == {} and loss.ndim == 0


def test_bf16_autocast_runs_the_matmuls_in_bf16():
    state = sgd_state(mlp(torch.float32))
    loss, aux = forward_loss(mse, state, data(8, torch.float32), amp="bf16")
    assert aux["out_mean"].dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    _, plain = forward_loss(mse, state, data(8, torch.float32), amp="none")
    assert plain["out_mean"].dtype == torch.float32


def test_unknown_amp_mode_is_refused():
    state = sgd_state(mlp())
    with pytest.raises(ValueError, match=r"amp='fp8' .* None, 'none', 'bf16', 'fp16'"):
        forward_loss(mse, state, data(2), amp="fp8")


def test_fp16_without_a_scaler_is_refused():
    with pytest.raises(ValueError, match="GradScaler"):
        forward_loss(mse, sgd_state(mlp()), data(2), amp="fp16")


def test_non_scalar_loss_is_refused():
    with pytest.raises(ValueError, match=r"scalar tensor .* shape \(2, 3\)"):
        forward_loss(lambda s, b: s.model(b[0]), sgd_state(mlp()), data(2))


# --- accumulate -------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 6), per=st.integers(1, 5))
def test_accumulated_micro_batches_equal_the_big_batch_gradient(k, per):
    x, y = data(k * per)
    big = sgd_state(mlp())
    loss, _ = forward_loss(mse, big, (x, y))
    assert accumulate(big, loss, every=1)
    expected = grads(big.model)

    small = sgd_state(mlp())
    boundaries = []
    for i in range(k):
        sl = slice(i * per, (i + 1) * per)
        loss, _ = forward_loss(mse, small, (x[sl], y[sl]))
        boundaries.append(accumulate(small, loss, every=k))
    assert boundaries == [False] * (k - 1) + [True]
    assert small.micro_step == k and small.accum == k
    for got, want in zip(grads(small.model), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_accumulate_scales_through_the_grad_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = sgd_state(mlp(torch.float32), scaler=scaler)
    plain = sgd_state(mlp(torch.float32))
    for s in (state, plain):
        loss, _ = forward_loss(mse, s, data(4, torch.float32))
        accumulate(s, loss, every=2)
    for got, want in zip(grads(state.model), grads(plain.model)):
        torch.testing.assert_close(got, want * 1024.0)


def test_accumulate_rejects_every_below_one():
    state = sgd_state(mlp())
    loss, _ = forward_loss(mse, state, data(2))
    with pytest.raises(ValueError, match="every=0"):
        accumulate(state, loss, every=0)


class RecordsGradientSync(nn.Module):
    """Stands in for an FSDP2 module: records set_requires_gradient_sync calls."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 3).double()
        self.calls = []

    def forward(self, x):
        return self.inner(x)

    def set_requires_gradient_sync(self, flag, recurse=True):
        self.calls.append(flag)


def test_fsdp2_gradient_sync_only_on_the_boundary_micro_step():
    model = RecordsGradientSync()
    state = sgd_state(model)
    for _ in range(6):
        loss, _ = forward_loss(lambda s, b: s.model(b).sum(), state, data(2)[0])
        accumulate(state, loss, every=3)
    assert model.calls == [False, False, True, False, False, True]


@pytest.mark.parametrize("accum, expected_reduces", [(4, 2), (1, 8)])
def test_ddp_all_reduces_once_per_update(gloo_world_of_one, accum, expected_reduces):
    model = nn.parallel.DistributedDataParallel(mlp())
    reduces = []

    def counting_hook(process_group, bucket):  # the small model fits one bucket
        reduces.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, counting_hook)
    state = sgd_state(model, accum=accum)
    x, y = data(32)
    updates = 0
    for i in range(8):
        loss, _ = forward_loss(mse, state, (x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]))
        if accumulate(state, loss, every=accum):
            apply_update(state, lr=0.1)
            updates += 1
    assert updates == 8 // accum
    assert len(reduces) == expected_reduces


def test_fsdp2_accumulate_clip_and_update_match_the_unsharded_model(gloo_world_of_one):
    from torch.distributed.fsdp import fully_shard

    plain, sharded = mlp(), mlp()
    fully_shard(sharded[0])
    fully_shard(sharded)
    x, y = data(12)
    norms, states = [], []
    for model in (plain, sharded):
        state = sgd_state(model)
        for i in range(3):
            loss, _ = forward_loss(mse, state, (x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]))
            boundary = accumulate(state, loss, every=3)
        assert boundary
        norms.append(clip(state, max_norm=0.05))
        apply_update(state, lr=0.1)
        states.append(state)
    assert type(norms[1]) is torch.Tensor  # reduced from the DTensor shards to a plain tensor
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-12, atol=0)
    for p, q in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-12, atol=0)


# --- clip -------------------------------------------------------------------------------------


def backward_once(state, scale=1.0):
    x, y = data(16, next(state.model.parameters()).dtype)
    loss, _ = forward_loss(lambda s, b: mse(s, b)[0] * scale, state, (x, y))
    accumulate(state, loss)


def total_norm(model):
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))


@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e6])
def test_clip_returns_the_true_pre_clip_norm_and_leaves_the_norm_at_most_max(max_norm):
    state = sgd_state(mlp())
    backward_once(state, scale=10.0)
    before = total_norm(state.model)
    returned = clip(state, max_norm=max_norm)
    assert isinstance(returned, torch.Tensor) and returned.ndim == 0
    assert returned.item() == pytest.approx(before, rel=1e-6)
    after = total_norm(state.model)
    assert after <= max_norm * (1 + 1e-6)
    if before <= max_norm:
        assert after == pytest.approx(before, rel=1e-12)  # untouched
    else:
        assert after == pytest.approx(max_norm, rel=1e-5)


def test_clip_by_value():
    state = sgd_state(mlp())
    backward_once(state, scale=10.0)
    biggest = max(float(p.grad.abs().max()) for p in state.model.parameters())
    clip(state, max_value=biggest / 4)
    assert max(float(p.grad.abs().max()) for p in state.model.parameters()) == pytest.approx(biggest / 4)


def test_clip_unscales_the_grad_scaler_first():
    plain = sgd_state(mlp(torch.float32))
    scaled = sgd_state(mlp(torch.float32), scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for s in (plain, scaled):
        backward_once(s)
    assert clip(scaled, max_norm=1.0).item() == pytest.approx(clip(plain, max_norm=1.0).item(), rel=1e-5)
    for p, q in zip(plain.model.parameters(), scaled.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_rejects_negative_limits():
    state = sgd_state(mlp())
    backward_once(state)
    with pytest.raises(ValueError, match="max_norm=-1.0"):
        clip(state, max_norm=-1.0)


# --- apply_update ------------------------------------------------------------------------------


def test_apply_update_sets_scaled_lr_and_wd_per_group_then_zeroes_grads():
    model = mlp()
    groups = param_groups(model)
    groups[0]["lr_scale"] = 0.5
    state = TrainState(model=model, optimizer=torch.optim.AdamW(groups, lr=1.0))
    backward_once(state)
    apply_update(state, lr=0.01, wd=0.1, group_scales=[2.0, 3.0])
    pg = state.optimizer.param_groups
    assert [g["lr"] for g in pg] == [0.01 * 0.5 * 2.0, 0.01 * 3.0]
    assert [g["weight_decay"] for g in pg] == [0.1, 0.0]  # no decay on biases
    assert all(p.grad is None for p in model.parameters())
    assert state.step == 1


def test_apply_update_equals_a_hand_written_sgd_step():
    state = sgd_state(mlp())
    before = [p.detach().clone() for p in state.model.parameters()]
    backward_once(state)
    g = grads(state.model)
    apply_update(state, lr=0.25)
    for p, b, gr in zip(state.model.parameters(), before, g):
        torch.testing.assert_close(p.detach(), b - 0.25 * gr, atol=0, rtol=0)


def test_apply_update_fills_a_tensor_lr_in_place():
    model = mlp(torch.float32)
    lr = torch.tensor(1.0)
    state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr, fused=True))
    backward_once(state)
    apply_update(state, lr=torch.tensor(0.125))
    assert state.optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.125


def test_group_scales_must_match_the_groups():
    state = sgd_state(mlp())
    backward_once(state)
    with pytest.raises(ValueError, match=r"group_scales=\[1.0, 2.0\] .* one scale per param group \(1\)"):
        apply_update(state, lr=0.1, group_scales=[1.0, 2.0])


def snapshot(state):
    return copy.deepcopy(
        ([p.detach().clone() for p in state.model.parameters()], state.optimizer.state_dict())
    )


def assert_untouched(state, snap):
    params, opt = snap
    for p, q in zip(state.model.parameters(), params):
        assert torch.equal(p.detach(), q)
    now = state.optimizer.state_dict()["state"]
    for k, v in opt["state"].items():
        for name, t in v.items():
            assert torch.equal(now[k][name], t), name


def inf_step(state, amp=None):
    x, y = data(4, torch.float32)
    x[0, 0] = float("inf")
    loss, _ = forward_loss(mse, state, (x, y), amp=amp)
    accumulate(state, loss)
    clip(state, max_norm=1.0)
    apply_update(state, lr=0.1, wd=0.1)


def finite_step(state, amp=None):
    loss, _ = forward_loss(mse, state, data(4, torch.float32), amp=amp)
    accumulate(state, loss)
    clip(state, max_norm=1.0)
    apply_update(state, lr=0.1, wd=0.1)


def test_fp16_with_a_scaler_skips_an_inf_step_without_touching_weights():
    model = mlp(torch.float32)
    state = TrainState(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10),
    )
    finite_step(state, amp="fp16")  # creates the optimizer state
    snap = snapshot(state)
    inf_step(state, amp="fp16")
    assert_untouched(state, snap)
    assert state.skipped_steps.item() == 1 and state.step == 2
    assert state.scaler.get_scale() == 2.0**9  # backed off
    finite_step(state, amp="fp16")
    assert state.skipped_steps.item() == 1 and state.step == 3


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_step_is_skipped_and_counted_without_a_scaler(fused):
    model = mlp(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), fused=fused, foreach=None if fused else True)
    state = TrainState(model=model, optimizer=opt)
    finite_step(state)
    snap = snapshot(state)
    inf_step(state)
    assert_untouched(state, snap)
    assert state.skipped_steps.item() == 1 and state.step == 2
    assert all(p.grad is None for p in model.parameters())
    finite_step(state)
    assert state.skipped_steps.item() == 1
    assert not torch.equal(next(model.parameters()).detach(), snap[0][0])


def test_skip_nonfinite_off_lets_the_step_through():
    state = sgd_state(mlp(torch.float32))
    x, y = data(4, torch.float32)
    x[0, 0] = float("inf")
    loss, _ = forward_loss(mse, state, (x, y))
    accumulate(state, loss)
    apply_update(state, lr=0.1, skip_nonfinite=False)
    assert not all(torch.isfinite(p).all() for p in state.model.parameters())
    assert state.skipped_steps.item() == 0


def test_forward_loss_keeps_a_float64_loss_exact():
    state = sgd_state(mlp(torch.float64))
    x, y = data(8, torch.float64)
    loss, _ = forward_loss(mse, state, (x, y))
    assert loss.dtype == torch.float64
    assert loss.item() == torch.nn.functional.mse_loss(state.model(x), y).item()


def dino_clip_gradients(model: nn.Module, clip_at: float) -> None:
    """DINO's utils.clip_gradients, written out: each parameter's gradient on its own."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            coef = clip_at / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 10.0), st.integers(0, 10_000))
def test_per_parameter_clipping_equals_dinos_formula(clip_at, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    model(torch.randn(4, 5)).pow(2).sum().mul(seed % 7 + 0.1).backward()
    reference = copy.deepcopy(model)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        theirs.grad = ours.grad.clone()
    dino_clip_gradients(reference, clip_at)
    before = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    norm = clip(TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1)), max_norm_per_param=clip_at)
    assert torch.allclose(norm, before)  # the pre-clip global norm, as ever
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)
        assert ours.grad.norm() <= clip_at * (1 + 1e-5) or torch.allclose(ours.grad, theirs.grad)


class _NoHostReads:
    """Fails any ``bool(tensor)``: the host read a foreach optimizer's non-finite check makes."""

    def __enter__(self):
        self.original = torch.Tensor.__bool__

        def refuse(tensor):
            raise AssertionError("a tensor was read on the host")

        torch.Tensor.__bool__ = refuse
        return self

    def __exit__(self, *exc):
        torch.Tensor.__bool__ = self.original


@pytest.mark.parametrize("finite", [True, False])
def test_the_recipes_optimizer_is_fused_and_its_update_reads_nothing_on_the_host(finite):
    from stepkit.step import adamw

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    state = TrainState(model=model, optimizer=adamw(param_groups(model), device="cpu"))
    assert state.optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 1.0 if finite else float("nan"))
    with _NoHostReads():
        apply_update(state, lr=0.1, wd=0.0)
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert moved == [finite, finite] and state.skipped_steps.item() == (0 if finite else 1)
    assert state.step == 1


def test_a_foreach_optimizer_reads_the_norm_on_the_host():  # the check above can fail
    model = nn.Linear(3, 2)
    state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), foreach=True))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(AssertionError, match="read on the host"), _NoHostReads():
        apply_update(state, lr=0.1)

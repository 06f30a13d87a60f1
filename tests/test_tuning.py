import torch
import torch.nn.functional as F
from torch import nn

from stepkit import TrainState
from stepkit.tuning import MemoryCap, largest_batch_size, lr_range_test


def least_squares(seed=0, n=256, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64)
    # for mean((x w - y)^2) the Hessian is 2/n x^T x; SGD diverges for lr > 2 / lambda_max
    lam_max = torch.linalg.eigvalsh(2 * x.T @ x / n).max().item()
    return x, y, lam_max


def linear_state():
    torch.manual_seed(0)
    model = nn.Linear(8, 1, bias=False).double()
    return TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))


def mse(state, batch):
    return F.mse_loss(state.model(batch[0]), batch[1])


def test_range_test_finds_the_good_region_of_a_convex_problem(tmp_path):
    x, y, lam_max = least_squares()
    state = linear_state()
    before = state.model.weight.detach().clone()
    rng_before = torch.get_rng_state()
    result = lr_range_test(mse, state, [(x, y)], min_lr=1e-5, max_lr=10.0, steps=120)
    # fastest descent somewhere between a tenth of the optimal step and the stability limit
    assert 0.1 / lam_max < result.suggested_lr < 2.0 / lam_max
    assert result.diverged_at is not None and result.diverged_at > 1.0 / lam_max
    assert torch.equal(state.model.weight, before) and state.step == 0  # the original is untouched
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert result.plot(tmp_path / "range.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_cap_raises_torchs_out_of_memory_error():
    import pytest

    with MemoryCap(1000) as cap:
        torch.zeros(100)  # 400 bytes
        torch.zeros(10).view(2, 5)  # a view is free
        with pytest.raises(torch.cuda.OutOfMemoryError, match="over the cap of 1000"):
            torch.zeros(200)
    assert cap.allocated == 400 + 40 + 800
    with MemoryCap(10_000) as cap:
        x = torch.zeros(10)
        x.add_(1.0)  # in place: no new memory
    assert cap.allocated == 40


def test_batch_finder_returns_the_largest_size_under_a_memory_cap_and_restores_state():
    state = linear_state()
    weight = state.model.weight.detach().clone()
    tried = []

    def step(st, batch_size: int) -> None:
        with MemoryCap(100_000):
            x = torch.randn(batch_size, 8, dtype=torch.float64)
            st.model(x).square().mean().backward()
            st.optimizer.param_groups[0]["lr"] = 0.1
            st.optimizer.step()
        st.step += 1

    def train_step(batch_size: int) -> None:
        tried.append(batch_size)
        step(state, batch_size)

    def fits(b):  # the same step on a fresh state, for a brute-force answer
        try:
            step(linear_state(), b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False

    best = largest_batch_size(train_step, state=state, max_size=4096)
    assert best > 100 and fits(best) and not fits(best + 1)
    assert tried[:4] == [1, 2, 4, 8] and len(tried) < 30  # doubling, then bisection
    assert torch.equal(state.model.weight, weight) and state.step == 0
    assert state.model.weight.grad is None


def test_batch_finder_edge_cases():
    import pytest

    assert largest_batch_size(lambda b: None, max_size=100) == 100

    def too_big(b):
        raise torch.cuda.OutOfMemoryError("no")

    assert largest_batch_size(too_big) == 0
    with pytest.raises(ValueError, match="boom"):
        largest_batch_size(lambda b: (_ for _ in ()).throw(ValueError("boom")))


def test_tune_writes_its_numbers_without_matplotlib_and_nothing_else(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from stepkit.rundir import start_run
    from stepkit.tuning import TuneConfig, tune

    x, y, _ = least_squares()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tune(TuneConfig(find_lr=True, lr_steps=20, min_lr=1e-4, max_lr=1.0), tmp_path, mse, linear_state(),
               lambda size: (x[:size], y[:size]), batch_size=64)
    assert json.loads((tmp_path / "tune.json").read_text())["suggested_lr"] == out["suggested_lr"]
    assert 'no plot: matplotlib is not installed (pip install "stepkit[plot]")' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.json"]
    start_run(tmp_path, {"a": 1}, resume=False)  # the real run may use the folder

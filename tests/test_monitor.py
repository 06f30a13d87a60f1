import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stepkit.monitor import collapse_metrics, layer_group, norms_by_group, singular_values, system_metrics


@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_rank_k_batch_with_equal_singular_values_has_effective_rank_k(k):
    torch.manual_seed(k)
    u, _ = torch.linalg.qr(torch.randn(64, k))
    v, _ = torch.linalg.qr(torch.randn(32, k))
    z = 3.0 * u @ v.T  # rank k, all singular values 3
    assert collapse_metrics(z)["effective_rank"].item() == pytest.approx(k, rel=1e-4)


def test_random_rank_k_batch_is_close_to_k():
    torch.manual_seed(0)
    z = torch.randn(256, 5) @ torch.randn(5, 64)
    assert 4.0 < collapse_metrics(z)["effective_rank"].item() <= 5.0 + 1e-4


def test_constant_batch_has_zero_std_and_rank_one():
    m = collapse_metrics(torch.full((16, 8), 2.0), prefix="z_")
    assert m["z_std"].item() == 0.0
    assert m["z_norm"].item() == pytest.approx(2.0 * math.sqrt(8))
    assert m["z_effective_rank"].item() == pytest.approx(1.0)


def test_std_and_norm_match_their_definitions():
    torch.manual_seed(1)
    z = torch.randn(10, 4, 6)  # leading dims are flattened into the batch
    flat = z.reshape(-1, 6)
    m = collapse_metrics(z)
    assert m["std"].item() == pytest.approx(flat.std(dim=0).mean().item(), rel=1e-6)
    assert m["norm"].item() == pytest.approx(flat.norm(dim=1).mean().item(), rel=1e-6)
    assert all(t.ndim == 0 for t in m.values())


def test_norms_by_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    norms = norms_by_group(model)
    for i in (0, 2):
        layer = model[i]
        w = torch.cat([layer.weight.flatten(), layer.bias]).norm()
        g = torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()
        assert norms[f"weight_norm/{i}"].item() == pytest.approx(w.item(), rel=1e-6)
        assert norms[f"grad_norm/{i}"].item() == pytest.approx(g.item(), rel=1e-6)
    assert layer_group("blocks.3.attn.qkv.weight", 2) == "blocks.3"


def test_system_metrics_reads_host_memory():
    m = system_metrics("cpu")
    assert 0.001 < m["host_rss_gb"] < 1000 and "device_mem_gb" not in m


def test_collapse_alarm_names_the_metric_after_patience_intervals():
    import math

    from stepkit.monitor import collapse_alarm

    ranks = [9, 3, 1.5, 1.2, 1.1]
    history = [{"step": s, "target_effective_rank": r, "loss": 1.0} for s, r in enumerate(ranks)]
    assert collapse_alarm(history[:4], below={"target_effective_rank": 2.0}, patience=3) is None
    message = collapse_alarm(history, below={"target_effective_rank": 2.0}, patience=3)
    assert message == "collapse warning: target_effective_rank below 2 for 3 intervals (last 1.1)"
    uniform = [{"teacher_entropy": math.log(128) - 0.01}] * 4
    assert "teacher_entropy above" in collapse_alarm(uniform, above={"teacher_entropy": 0.95 * math.log(128)})
    assert collapse_alarm([{"other": 0.0}] * 5, below={"target_std": 0.01}) is None  # never logged: silent


def test_collapse_watch_warns_once_when_a_metric_newly_holds():
    from stepkit.monitor import CollapseWatch

    watch = CollapseWatch(below={"std": 0.1}, above={"entropy": 4.0}, patience=2)
    assert watch({"std": 0.05, "entropy": 1.0}) is None  # one interval: not yet
    first = watch({"std": 0.04, "entropy": 1.0})
    assert first == "collapse warning: std below 0.1 for 2 intervals (last 0.04)" and watch.last == first
    assert watch({"std": 0.03, "entropy": 1.0}) is None  # the same metric still low: not repeated
    both = watch({"std": 0.03, "entropy": 4.5})  # a second metric joins: a new warning
    assert both is None and watch.last.startswith("collapse warning: std below")
    both = watch({"std": 0.03, "entropy": 4.6})
    assert "entropy above 4 for 2 intervals" in both and "std below 0.1" in both
    assert watch({"std": 0.5, "entropy": 1.0}) is None and watch.last == ""  # recovered


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), rank=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_singular_values_are_the_svds_of_wide_tall_and_low_rank_batches(rows, cols, rank, seed):
    g = torch.Generator().manual_seed(seed)
    inner = min(rank, rows, cols)  # the batch's rank
    z = torch.randn(rows, inner, generator=g) @ torch.randn(inner, cols, generator=g)
    want = torch.linalg.svdvals(z.double()).flip(0)  # ascending, as eigvalsh gives them
    got = singular_values(z)
    assert got.dtype == z.dtype and got.shape == (min(rows, cols),)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.max()))

"""torch.distributed helpers, in real 2-process gloo groups on the CPU.

The 2-rank parts run this file under torchrun (``python -m torch.distributed.run
--nproc_per_node=2 tests/test_dist.py MODE OUT_DIR ARG``): fresh processes that
join the group from torchrun's environment, as the recipes do.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stepkit import dist as sk_dist
from stepkit.losses.contrastive import clip_loss, siglip_loss

WORLD, ROWS, DIM = 2, 4, 6


def batch(seed):
    """Every rank's images, texts and one hard-negative text per image, as one process would see them."""
    g = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
                 for _ in range(3))


def two_ranks(tmp_path, mode: str, arg: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, mode, str(tmp_path), arg]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]


LOSSES = {  # name -> loss of (images, texts, negatives) on this process's rows
    "clip_local": lambda i, t, n: clip_loss(i, t, 10.0),
    "clip_full": lambda i, t, n: clip_loss(i, t, 10.0, local_loss=False),
    "clip_negatives": lambda i, t, n: clip_loss(i, t, 10.0, negatives=n),
    "siglip": lambda i, t, n: siglip_loss(i, t, 10.0, -10.0),
    "siglip_negatives": lambda i, t, n: siglip_loss(i, t, 10.0, -5.0, negatives=n),
}


def losses_and_gradients(rows: slice) -> dict:
    """Each loss of ``LOSSES`` on the rows ``rows`` of ``batch(0)`` and its gradient to them."""
    out = {}
    for name, loss_fn in LOSSES.items():
        parts = [t[rows].clone().requires_grad_() for t in batch(0)]
        loss = loss_fn(*parts)
        loss.backward()
        out[name] = {"loss": loss.detach(), "grads": [t.grad for t in parts]}
    return out


def _losses_worker(out_dir):
    rank = sk_dist.rank()
    try:
        result = losses_and_gradients(slice(rank * ROWS, (rank + 1) * ROWS))
        result["mean"] = sk_dist.all_reduce_mean(torch.tensor([float(rank)]))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        sk_dist.shutdown()


@pytest.fixture(scope="module")
def two_rank_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("losses")
    two_ranks(out, "losses", "-")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip_local", "clip_negatives", "siglip", "siglip_negatives"])
def test_each_rank_scoring_its_rows_gives_the_full_batch_loss_and_gradient(two_rank_losses, name):
    whole = losses_and_gradients(slice(None))[name]  # one process, the concatenated batch
    # The mean of the ranks' losses is the full-batch loss; each rank's rows get the sum over ranks of the
    # gradients (the gather's or the ring's backward), which DDP's averaging divides by the world size.
    ranks = [r[name] for r in two_rank_losses]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, whole["loss"], rtol=1e-12, atol=0)
    for rank, r in enumerate(ranks):
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        for got, want in zip(r["grads"], whole["grads"]):
            if want is None:  # no negatives in this loss
                assert got is None
                continue
            torch.testing.assert_close(got / WORLD, want[mine], rtol=1e-10, atol=1e-12)
    assert [float(r["mean"]) for r in two_rank_losses] == [0.5, 0.5]  # all_reduce_mean of ranks 0 and 1


@pytest.mark.slow
def test_full_matrix_variant_computes_the_whole_loss_on_every_rank(two_rank_losses):
    whole = losses_and_gradients(slice(None))["clip_full"]
    for rank, r in enumerate(two_rank_losses):
        torch.testing.assert_close(r["clip_full"]["loss"], whole["loss"], rtol=1e-12, atol=0)
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(r["clip_full"]["grads"][0] / WORLD, whole["grads"][0][mine],
                                   rtol=1e-10, atol=1e-12)


def test_world_of_one_without_torchrun():
    assert not sk_dist.is_initialized()
    assert (sk_dist.rank(), sk_dist.world_size(), sk_dist.is_main()) == (0, 1, True)
    x = torch.ones(3, requires_grad=True)
    assert sk_dist.all_gather_with_grad(x) is x
    assert sk_dist.init_from_env("cpu") == torch.device("cpu")
    assert not sk_dist.is_initialized()


STEPS, ACCUM, B = 3, 2, 4


def _train(out_dir, strategy):
    from stepkit import TrainState, accumulate, apply_update, clip, forward_loss, param_groups
    from stepkit.state import unwrap

    rank, world = sk_dist.rank(), sk_dist.world_size()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).double()
        model = sk_dist.parallelize(model, strategy, torch.device("cpu"))
        allreduces = []
        if strategy == "ddp" and world > 1:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def count(group, bucket):
                allreduces.append(1)
                return allreduce_hook(group, bucket)
            model.register_comm_hook(None, count)
        state = TrainState(model=model, optimizer=torch.optim.AdamW(param_groups(unwrap(model)), lr=0.01),
                           accum=ACCUM)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(STEPS * ACCUM, 2 * B, 6, generator=g, dtype=torch.float64)
        y = torch.randn(STEPS * ACCUM, 2 * B, 3, generator=g, dtype=torch.float64)
        rows = slice(rank * B, (rank + 1) * B) if world > 1 else slice(None)  # same global batch, split
        loss_fn = lambda s, b: F.mse_loss(s.model(b[0]), b[1])  # noqa: E731
        for i in range(STEPS * ACCUM):
            loss, _ = forward_loss(loss_fn, state, (x[i, rows], y[i, rows]))
            if accumulate(state, loss):
                clip(state, max_norm=0.5)
                apply_update(state, lr=0.01, wd=0.1)
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for n, p in unwrap(model).named_parameters()}
        if rank == 0:
            torch.save({"params": params, "allreduces": len(allreduces)}, f"{out_dir}/{strategy}_{world}.pt")
    finally:
        sk_dist.shutdown()  # a barrier first: no rank tears down while another still talks


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_batch_b_equal_one_rank_with_2b(strategy, tmp_path):
    _train(str(tmp_path), strategy)  # one process, batch 2B
    two_ranks(tmp_path, "train", strategy)
    one, two = torch.load(tmp_path / f"{strategy}_1.pt"), torch.load(tmp_path / f"{strategy}_2.pt")
    assert one["params"].keys() == two["params"].keys()
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-10)
    assert any((p != 0).any() for p in one["params"].values())
    if strategy == "ddp":  # one bucket, all-reduced once per update, not once per micro-batch
        assert two["allreduces"] == STEPS


def _sinkhorn_teacher_out():
    return torch.randn(2 * 6, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2


def _sinkhorn_worker(out_dir, iterations):
    from stepkit.losses.dino import sinkhorn_knopp

    rank = sk_dist.rank()
    try:
        mine = _sinkhorn_teacher_out()[rank * 6:(rank + 1) * 6]
        torch.save(sinkhorn_knopp(mine, 0.05, iterations), f"{out_dir}/sinkhorn{rank}.pt")
    finally:
        sk_dist.shutdown()


@pytest.mark.slow
def test_sinkhorn_knopp_over_two_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    from stepkit.losses.dino import sinkhorn_knopp

    two_ranks(tmp_path, "sinkhorn", "3")
    gathered = torch.cat([torch.load(tmp_path / f"sinkhorn{r}.pt") for r in range(WORLD)])
    whole = sinkhorn_knopp(_sinkhorn_teacher_out(), 0.05, 3)
    torch.testing.assert_close(gathered, whole, rtol=1e-12, atol=1e-15)


if __name__ == "__main__":  # a rank under torchrun
    mode, out_dir, arg = sys.argv[1:4]
    sk_dist.init_from_env("cpu")
    if mode == "losses":
        _losses_worker(out_dir)
    elif mode == "sinkhorn":
        _sinkhorn_worker(out_dir, int(arg))
    else:
        _train(out_dir, arg)


def test_a_restarted_group_agrees_on_a_namespace_the_dead_group_never_used():
    """torchrun's shared store keeps the dead group's keys (its nonces, acks and confirmations); the new
    group's rank 0 may read a stale nonce first. Every new worker still learns the new name."""
    import datetime
    import threading
    import time

    from stepkit.dist import _agree_on_namespace

    store = torch.distributed.HashStore()
    store.set_timeout(datetime.timedelta(seconds=20))
    old = {}
    threads = [threading.Thread(target=lambda r=r: old.__setitem__(r, _agree_on_namespace(store, r, 3, 20)))
               for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(old.values())) == 1  # the first group agreed
    new = {}

    def late(rank, delay):
        time.sleep(delay)  # rank 0 reads this rank's stale nonce meanwhile
        new[rank] = _agree_on_namespace(store, rank, 3, 20)

    threads = [threading.Thread(target=late, args=(r, d)) for r, d in ((0, 0.0), (1, 0.2), (2, 0.4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(new) == 3 and len(set(new.values())) == 1 and set(new.values()) != set(old.values())

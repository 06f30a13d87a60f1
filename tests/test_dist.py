"""torch.distributed helpers, in real 2-process gloo groups on the CPU."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stepkit import dist as sk_dist
from stepkit.losses.contrastive import clip_loss

WORLD, ROWS, DIM = 2, 4, 6


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def _clip_worker(rank, store, out_dir, local_loss):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        image, text = batch(0)
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        image, text = image[mine].clone().requires_grad_(), text[mine].clone().requires_grad_()
        loss = clip_loss(image, text, 10.0, local_loss=local_loss)
        loss.backward()
        torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad,
                    "mean": sk_dist.all_reduce_mean(torch.tensor([float(rank)]))},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_clip(tmp_path, local_loss):
    mp.spawn(_clip_worker, args=(str(tmp_path / "store"), str(tmp_path), local_loss), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def single_process_reference():
    image, text = (t.requires_grad_() for t in batch(0))
    loss = clip_loss(image, text, 10.0)
    loss.backward()
    return loss.detach(), image.grad, text.grad


def test_gathered_local_loss_gives_every_rank_the_full_batch_gradient(tmp_path):
    loss, image_grad, text_grad = single_process_reference()
    ranks = run_clip(tmp_path, local_loss=True)
    # The mean of the ranks' losses is the full-batch loss; each rank's rows get the sum
    # over ranks of the gradients, which DDP's averaging divides by the world size.
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss, rtol=1e-12, atol=0)
    for rank, r in enumerate(ranks):
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(r["image"] / WORLD, image_grad[mine], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["text"] / WORLD, text_grad[mine], rtol=1e-10, atol=1e-12)
        assert float(r["mean"]) == 0.5  # all_reduce_mean of ranks 0 and 1


def test_full_matrix_variant_computes_the_whole_loss_on_every_rank(tmp_path):
    loss, image_grad, _ = single_process_reference()
    ranks = run_clip(tmp_path, local_loss=False)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["loss"], loss, rtol=1e-12, atol=0)
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(r["image"] / WORLD, image_grad[mine], rtol=1e-10, atol=1e-12)


def test_world_of_one_without_torchrun():
    assert not sk_dist.is_initialized()
    assert (sk_dist.rank(), sk_dist.world_size(), sk_dist.is_main()) == (0, 1, True)
    x = torch.ones(3, requires_grad=True)
    assert sk_dist.all_gather_with_grad(x) is x
    assert sk_dist.init_from_env("cpu") == torch.device("cpu")
    assert not sk_dist.is_initialized()


STEPS, ACCUM, B = 3, 2, 4


def _train(rank, world, store, out_dir, strategy):
    from stepkit import TrainState, accumulate, apply_update, clip, forward_loss, param_groups
    from stepkit.state import unwrap

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
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
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_batch_b_equal_one_rank_with_2b(strategy, tmp_path):
    _train(0, 1, None, str(tmp_path), strategy)
    mp.spawn(_train, args=(WORLD, str(tmp_path / "store"), str(tmp_path), strategy), nprocs=WORLD)
    one, two = torch.load(tmp_path / f"{strategy}_1.pt"), torch.load(tmp_path / f"{strategy}_2.pt")
    assert one["params"].keys() == two["params"].keys()
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-10)
    assert any((p != 0).any() for p in one["params"].values())
    if strategy == "ddp":  # one bucket, all-reduced once per update, not once per micro-batch
        assert two["allreduces"] == STEPS

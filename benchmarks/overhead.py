"""What stepkit's functions cost over the same step written by hand: a small MLP, CPU.

Both loops do the same math on the same weights and data: forward, cross-
entropy, backward, global-norm clipping, an AdamW update with the lr and
weight decay of a warm-up + cosine schedule, and an EMA of the weights.

- ``stepkit``: ``forward_loss`` -> ``accumulate`` -> ``clip`` -> ``apply_update``
  -> ``ema_update`` with ``lr_at`` / ``wd_at`` / ``momentum_at``;
- ``by_hand``: ``loss.backward()``, ``clip_grad_norm_(foreach=True)``, the
  schedules' formulas inline, ``opt.step()``, ``zero_grad``, ``_foreach_lerp_``.

Rounds alternate the two (each round times ``--steps`` steps of each; the
order flips every round); the median round is reported. After the run the
two models must hold the same weights, which the script checks.

    python benchmarks/overhead.py
    python benchmarks/overhead.py --rounds 3 --steps 20      # smoke test (CI)

Prints a table; writes benchmarks/results/overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkit import (  # noqa: E402
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

TOTAL = 10_000  # the schedules' run length (only their shape matters here)


@dataclass
class Schedules(LRSchedule, WDSchedule):
    pass


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(256, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 10))


def stepkit_loop(model, target, sched, ema):
    state = TrainState(model=model, optimizer=torch.optim.AdamW(param_groups(model)), target=target)

    def loss_fn(state, batch):
        return F.cross_entropy(state.model(batch[0]), batch[1])

    def step(batch):
        loss, _ = forward_loss(loss_fn, state, batch)
        accumulate(state, loss)
        clip(state, max_norm=1.0)
        apply_update(state, lr=lr_at(state.step, sched, TOTAL), wd=wd_at(state.step, sched, TOTAL))
        ema_update(state.target, state.model, momentum_at(state.step, ema, TOTAL))

    return step


def by_hand_loop(model, target, sched, ema):
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    params, ema_params = list(model.parameters()), list(target.values())
    counter = [0]

    def step(batch):
        t = counter[0]
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        if t < sched.warmup_steps:
            lr = sched.warmup_start_lr + (sched.lr - sched.warmup_start_lr) * t / sched.warmup_steps
        else:
            frac = (t - sched.warmup_steps) / (TOTAL - sched.warmup_steps)
            lr = sched.min_lr + (sched.lr - sched.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
        wd = sched.wd_final + (sched.wd - sched.wd_final) * 0.5 * (1 + math.cos(math.pi * t / TOTAL))
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, lr
        opt.param_groups[0]["weight_decay"] = wd
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter[0] = t + 1
        cosine = 0.5 * (1 + math.cos(math.pi * (t + 1) / TOTAL))
        m = ema.momentum_final - (ema.momentum_final - ema.momentum) * cosine
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - m)

    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="steps per loop per round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base = mlp(args.width)
    models = {"stepkit": copy.deepcopy(base), "by_hand": copy.deepcopy(base)}
    targets = {name: ema_copy(m) for name, m in models.items()}
    sched = Schedules(lr=1e-3, warmup_steps=100, min_lr=1e-5, wd=0.04, wd_final=0.4)
    ema = MomentumSchedule(momentum=0.99, momentum_final=1.0)
    loops = {"stepkit": stepkit_loop(models["stepkit"], targets["stepkit"], sched, ema),
             "by_hand": by_hand_loop(models["by_hand"], targets["by_hand"], sched, ema)}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch, 256, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
            for _ in range(args.steps)]

    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds + 1):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))
        for name in order:
            t0 = time.perf_counter()
            for batch in data:
                loops[name](batch)
            if r > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)

    # Equal work: fresh copies, a few steps of each loop, the same weights and EMA weights after.
    # (Over the whole run rounding differences between the two clip implementations compound.)
    check = {name: copy.deepcopy(base) for name in loops}
    check_targets = {name: ema_copy(m) for name, m in check.items()}
    for name, make in (("stepkit", stepkit_loop), ("by_hand", by_hand_loop)):
        loop = make(check[name], check_targets[name], sched, ema)
        for batch in data[:10]:
            loop(batch)
    weights_equal = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in
                        zip(check["stepkit"].parameters(), check["by_hand"].parameters()))
    ema_equal = all(torch.allclose(check_targets["stepkit"][k], check_targets["by_hand"][k], rtol=1e-5,
                                   atol=1e-7) for k in check_targets["stepkit"])
    ms = {name: statistics.median(v) / args.steps * 1e3 for name, v in times.items()}
    ratio = ms["stepkit"] / ms["by_hand"]
    result = dict(
        benchmark="overhead", device="cpu", cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        width=args.width, batch=args.batch, steps_per_round=args.steps, rounds=args.rounds,
        step_ms=({k: round(v, 4) for k, v in ms.items()}), ratio=round(ratio, 4),
        same_weights=bool(weights_equal and ema_equal), target_ratio_max=1.03,
        meets_target=bool(ratio <= 1.03),
    )
    print(f"one training step of an MLP (256-{args.width}-{args.width}-10, batch {args.batch}) on CPU "
          f"({result['threads']} threads), torch {torch.__version__}, {result['date']}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'loop':<10}{'ms/step':>10}")
    for name, v in ms.items():
        print(f"{name:<10}{v:>10.4f}")
    verdict = "met" if result["meets_target"] else "NOT met"
    print(f"stepkit / by hand: {ratio:.3f} (target <= 1.03: {verdict}); "
          f"same weights after the run: {result['same_weights']}")
    out = args.out or Path(__file__).parent / "results" / "overhead_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

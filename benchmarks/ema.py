"""EMA update of a ViT-B-sized set of weights: stepkit's ema_update against the loops people write.

Six ways to do ``target = m * target + (1 - m) * online`` over the same
tensors, timed round-robin in one run so they share the machine's noise:

- ``ema_update``: stepkit (one multi-tensor lerp per device and dtype);
- ``param_loop``: ``t.mul_(m).add_((1 - m) * o)`` per parameter;
- ``data_reassign``: ``t.data = m * t.data + (1 - m) * o.data`` per parameter
  (the shape of the original DINO code);
- ``flat_lerp``: one ``lerp_`` over a single flat buffer of the same size,
  the memory-bandwidth limit nothing can beat;
- ``foreach_lerp``: the bare ``torch._foreach_lerp_`` over lists built once
  (``ema_update`` minus its per-call work: matching names, checking shapes,
  grouping by device);
- ``per_tensor_lerp``: one ``lerp_`` per tensor.

    python benchmarks/ema.py                     # ViT-B shapes, ~86M fp32 params
    python benchmarks/ema.py --size tiny         # smoke test (CI)
    python benchmarks/ema.py --device cuda

Prints a table and writes benchmarks/results/ema_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkit import ema_update  # noqa: E402


def vit_shapes(dim: int, depth: int, mlp: int, patch: int, tokens: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a ViT (patch embedding, cls/pos tokens, blocks, final norm)."""
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]
        shapes += [(dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes + [(dim,), (dim,)]


SIZES = {
    "vit-b": dict(dim=768, depth=12, mlp=3072, patch=16, tokens=197),
    "tiny": dict(dim=64, depth=2, mlp=128, patch=4, tokens=17),
}


class Weights(nn.Module):
    def __init__(self, shapes, device):
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(s, device=device)) for s in shapes)


def param_loop(target, online, m):
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.mul_(m).add_((1 - m) * o.detach())


def data_reassign(target, online, m):
    for t, o in zip(target.parameters(), online.parameters()):
        t.data = m * t.data + (1 - m) * o.data


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    shapes = vit_shapes(**SIZES[args.size])
    torch.manual_seed(0)
    target, online = Weights(shapes, device), Weights(shapes, device)
    n = sum(p.numel() for p in target.parameters())
    flat_t, flat_o = torch.randn(n, device=device), torch.randn(n, device=device)
    m = 0.996
    ts, os_ = [p.detach() for p in target.parameters()], [p.detach() for p in online.parameters()]
    methods = {
        "ema_update": lambda: ema_update(target, online, m),
        "param_loop": lambda: param_loop(target, online, m),
        "data_reassign": lambda: data_reassign(target, online, m),
        "flat_lerp": lambda: flat_t.lerp_(flat_o, 1 - m),
        "foreach_lerp": lambda: torch._foreach_lerp_(ts, os_, 1 - m),
        "per_tensor_lerp": lambda: [t.lerp_(o, 1 - m) for t, o in zip(ts, os_)],
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(args.repeats + 2):
        for name, fn in methods.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= 2:  # the first two rounds warm caches and the allocator
                times[name].append(time.perf_counter() - t0)

    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    gbytes = 3 * n * 4 / 1e9  # read target and online, write target
    rows = [
        dict(
            method=k,
            median_ms=round(v, 3),
            vs_flat_lerp=round(v / ms["flat_lerp"], 3),
            speedup_vs_data_reassign=round(ms["data_reassign"] / v, 2),
            gb_per_s=round(gbytes / (v / 1e3), 1),
        )
        for k, v in ms.items()
    ]
    result = dict(
        benchmark="ema",
        size=args.size,
        params=n,
        tensors=len(shapes),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        repeats=args.repeats,
        rows=rows,
        targets=dict(vs_flat_lerp_max=1.15, speedup_vs_data_reassign_min=3.0),
    )
    result["meets_targets"] = bool(
        ms["ema_update"] / ms["flat_lerp"] <= 1.15 and ms["data_reassign"] / ms["ema_update"] >= 3.0
    )

    print(f"EMA of {n / 1e6:.1f}M fp32 params in {len(shapes)} tensors on {result['device']} "
          f"({result['threads']} threads), torch {torch.__version__}, {result['date']}, "
          f"median of {args.repeats}")
    print(f"{'method':<15}{'ms':>10}{'vs flat lerp':>14}{'vs .data loop':>15}{'GB/s':>8}")
    for row in rows:
        print(f"{row['method']:<15}{row['median_ms']:>10.2f}{row['vs_flat_lerp']:>13.2f}x"
              f"{row['speedup_vs_data_reassign']:>14.2f}x{row['gb_per_s']:>8.1f}")
    print(f"targets (ema_update <= 1.15x flat lerp, >= 3x faster than .data loop): "
          f"{'met' if result['meets_targets'] else 'NOT met'}")

    out = args.out or Path(__file__).parent / "results" / f"ema_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

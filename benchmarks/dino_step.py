"""One DINO training step: a loop in the shape of the original DINO code against the stepkit loop.

Both train the same ViT + DINO head on the same random multi-crop batch
(2 global + N local crops; random data, so only the step is timed):

- ``reference``: the original code's shape: attention written out
  (``softmax(q k^T / sqrt(d)) v``), the patch embedding as a strided
  convolution, fp16 autocast with a GradScaler, the loss as a double loop
  over (teacher view, student view) pairs, per-tensor gradient clipping that
  reads each norm to the host, a per-parameter EMA loop, plain
  ``torch.optim.AdamW``;
- ``stepkit``: the loop ``recipes/dino.py`` runs: SDPA attention, the patch
  embedding as one matmul, bf16 autocast, fused AdamW, ``forward_loss`` /
  ``accumulate`` / ``clip`` (multi-tensor) / ``apply_update`` /
  ``ema_update`` (multi-tensor lerp), no host reads;
- ``stepkit+compile``: the same with the whole forward (both networks and the
  loss) compiled, AOTAutograd compiling its backward;
- ``stepkit+cudagraphs``: the same compiled with ``mode="reduce-overhead"``,
  which replays forward and backward as CUDA graphs.

Reported per loop: step ms (median), images/s, TFLOP/s (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``), MFU against a bf16 matmul
measured in the same run, and peak memory (CUDA allocator; on the CPU, the
bytes autograd saved for backward).

    python benchmarks/dino_step.py --device cuda --loops reference,stepkit,stepkit+compile,stepkit+cudagraphs
    python benchmarks/dino_step.py --device cuda --compile --profile 3    # + torch.profiler tables
    python benchmarks/dino_step.py --size tiny --steps 3       # smoke test (CPU, CI)

Prints a table; writes benchmarks/results/dino_step_<device>_<size>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkit import TrainState, accumulate, apply_update, clip, ema_update, forward_loss, param_groups  # noqa: E402
from stepkit.losses.dino import dino_loss, teacher_softmax, update_center  # noqa: E402
from stepkit.models import DINOHead, VisionTransformer, cancel_last_layer_gradients, multi_crop_forward  # noqa: E402
from stepkit.monitor import SavedActivations  # noqa: E402

SIZES = {
    "vit-s16": dict(vit="small", patch=16, global_size=224, local_size=96, local_crops=8, batch=64,
                    out_dim=65536, hidden=2048, bottleneck=256),
    "tiny": dict(vit="toy", patch=4, global_size=32, local_size=16, local_crops=2, batch=8,
                 out_dim=512, hidden=128, bottleneck=32),
}
STUDENT_TEMP, TEACHER_TEMP, CLIP, MOMENTUM, LR, WD = 0.1, 0.04, 3.0, 0.996, 5e-4, 0.04


class Dino(nn.Module):
    def __init__(self, size: dict) -> None:
        super().__init__()
        self.backbone = VisionTransformer.preset(size["vit"], img_size=size["global_size"],
                                                 patch_size=size["patch"], drop_path=0.1)
        self.head = DINOHead(self.backbone.dim, size["out_dim"], hidden=size["hidden"],
                             bottleneck=size["bottleneck"], batch_norm=False)
        self.out_dim = size["out_dim"]

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.head(multi_crop_forward(self.backbone, None, views))


def manual_attention(attn: nn.Module):
    """The attention of the original DINO/timm code, written out."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = attn.qkv(x).view(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1)) * (d // attn.heads) ** -0.5
        out = weights.softmax(dim=-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(b, n, d))

    return forward


def conv_patches(backbone: nn.Module):
    """The patch embedding of the original code: a strided ``Conv2d``."""
    return lambda x: backbone.patch_embed(x).flatten(2).transpose(1, 2)


def reference_loop(student: Dino, device: torch.device):
    teacher = copy.deepcopy(student).requires_grad_(False)
    for model in (student, teacher):  # patched after the copy: each closure must hold its own model
        for block in model.backbone.blocks:
            block.attn.forward = manual_attention(block.attn)
        model.backbone.embed_patches = conv_patches(model.backbone)
    opt = torch.optim.AdamW(param_groups(student), lr=LR)
    scaler = torch.amp.GradScaler(device.type)
    center = torch.zeros(1, student.out_dim, device=device)

    def step(views):
        with torch.autocast(device.type, dtype=torch.float16):
            student_out = student(views)
            teacher_out = teacher(views[:2])
            t = F.softmax((teacher_out - center) / TEACHER_TEMP, dim=-1).detach().chunk(2)
            s = (student_out / STUDENT_TEMP).chunk(len(views))
            loss, terms = 0.0, 0
            for iq, q in enumerate(t):
                for v in range(len(s)):
                    if v == iq:
                        continue
                    loss = loss + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                    terms += 1
            loss = loss / terms
        with torch.no_grad():
            center.mul_(0.9).add_(teacher_out.float().mean(0, keepdim=True), alpha=0.1)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in student.parameters():  # DINO's clip_gradients: one host read per tensor
            if p.grad is not None:
                coef = CLIP / (p.grad.data.norm(2).item() + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():  # DINO's teacher update: one pair of kernels per parameter
            for q, k in zip(student.parameters(), teacher.parameters()):
                k.data.mul_(MOMENTUM).add_((1 - MOMENTUM) * q.detach().data)

    return step


def stepkit_loop(student: Dino, device: torch.device, compiled: bool | str = False,
                 checkpointing: bool = False):
    """The recipe's step. ``compiled``: False (eager), True or a ``torch.compile`` mode.

    Compiled, the whole forward (student on all crops, teacher on the global
    ones, teacher softmax and the cross-entropy over all view pairs) is one
    graph, and AOTAutograd compiles its backward; ``"reduce-overhead"`` also
    replays both as CUDA graphs. The center update stays outside (it mutates
    a tensor the graph reads, which CUDA graphs would refuse).
    """
    teacher = copy.deepcopy(student).requires_grad_(False)
    student.backbone.grad_checkpointing = checkpointing  # recompute each block in backward
    fused = device.type == "cuda"
    state = TrainState(model=student, target=teacher,
                       optimizer=torch.optim.AdamW(param_groups(student), lr=LR, fused=fused))
    center = torch.zeros(1, student.out_dim, device=device)

    def forward(views, center):
        student_out = student(views)
        with torch.no_grad():
            teacher_out = teacher(views[:2])
        targets = teacher_softmax(teacher_out, center, TEACHER_TEMP)
        loss = dino_loss(student_out, targets, student_temp=STUDENT_TEMP, n_student_views=len(views))
        return loss, teacher_out.detach()

    cudagraphs = compiled == "reduce-overhead"
    if compiled:
        forward = torch.compile(forward, mode=None if compiled is True else compiled, dynamic=False)

    def loss_fn(state, views):
        loss, teacher_out = forward(views, center)
        update_center(center, teacher_out, 0.9)
        return loss

    def step(views):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = forward_loss(loss_fn, state, views, amp="bf16")
        accumulate(state, loss)
        cancel_last_layer_gradients(student.head, state.step, 0)
        clip(state, max_norm=CLIP)
        apply_update(state, lr=LR, wd=WD)
        ema_update(state.target, state.model, MOMENTUM)

    return step


LOOPS = {  # name -> how to build it
    "reference": lambda model, device: reference_loop(model, device),
    "stepkit": lambda model, device: stepkit_loop(model, device, compiled=False),
    "stepkit+compile": lambda model, device: stepkit_loop(model, device, compiled=True),
    "stepkit+cudagraphs": lambda model, device: stepkit_loop(model, device, compiled="reduce-overhead"),
    "stepkit+ckpt": lambda model, device: stepkit_loop(model, device, checkpointing=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def count_flops(base: Dino, views, device: torch.device) -> float:
    """FLOPs of one step of the eager stepkit loop: the model's math, the same for every loop.

    Counted once: compiled code runs Inductor's kernels, which the counter
    (a dispatch mode) does not see.
    """
    step = stepkit_loop(copy.deepcopy(base), device, compiled=False)
    step(views)
    with FlopCounterMode(display=False) as flops:
        step(views)
    return flops.get_total_flops()


def measure(name: str, step, views, size: dict, device: torch.device, args) -> dict:
    sync(device)
    if device.type == "cuda":  # before the warm-up: CUDA graphs take their memory pool while recording
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(views)
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    # On CUDA the allocator's peak says it all; the hooks would only add host work.
    with contextlib.nullcontext(None) if device.type == "cuda" else SavedActivations() as saved:
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            step(views)
            sync(device)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else saved.peak
    return dict(loop=name, step_ms=round(seconds * 1e3, 2), images_per_s=round(size["batch"] / seconds, 1),
                peak_mb=round(peak / 2**20, 1), warmup_s=round(warmup_s, 1))


def profile(name: str, step, views, device: torch.device, steps: int, folder: Path,
            prefix: str = "dino_step") -> dict:
    """Where one loop's time goes: device busy time per step and the top kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step(views)
        sync(device)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()

    def self_device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    busy = sum(self_device_us(e) for e in events) / steps / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC", "cudaGraphLaunch")) / steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=30)
    out = folder / f"{prefix}_profile_{name.replace('+', '_')}.txt"
    out.write_text(f"{name}: wall {wall * 1e3:.2f} ms/step, device busy {busy:.2f} ms/step, "
                   f"{launches:.0f} kernel launches/step\n\n{table}\n")
    return dict(loop=name, wall_ms=round(wall * 1e3, 2), device_busy_ms=round(busy, 2),
                launches_per_step=round(launches), table=os.path.relpath(out))


def largest_batch(name: str, base: nn.Module, size: dict, device: torch.device, cap_bytes: int,
                  views_of, loops=None) -> int:
    """The largest batch one step of loop ``name`` fits: device memory on CUDA, else ``cap_bytes`` of
    activations saved for backward (the CPU has no allocator to run out of)."""
    from stepkit.tuning import largest_batch_size

    step = (loops or LOOPS)[name](copy.deepcopy(base), device)

    def try_batch(batch: int) -> None:
        inputs = views_of(batch)
        if device.type == "cuda":
            step(inputs)
            torch.cuda.synchronize(device)
            return
        with SavedActivations() as saved:
            step(inputs)
        if saved.peak > cap_bytes:
            raise torch.cuda.OutOfMemoryError(f"{saved.peak} activation bytes, over the cap of {cap_bytes}")

    return largest_batch_size(try_batch, start=max(2, size["batch"] // 8), max_size=size["batch"] * 64)


def run_facts(device: torch.device) -> dict:
    """What every result JSON records about where it ran: device, CPU model, threads, torch, date."""
    from stepkit.rundir import environment

    return dict(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                cpu=environment()["cpu"], threads=torch.get_num_threads(),
                torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))


def run_loops(names, loops, base, inputs, size: dict, device: torch.device, args, folder: Path,
              prefix: str = "dino_step") -> tuple[list[dict], list[dict]]:
    """Build, time (and with ``args.profile`` profile) each named loop on a copy of ``base``."""
    rows, profiles = [], []
    for name in names:
        step = None
        try:
            step = loops[name](copy.deepcopy(base), device)
            rows.append(measure(name, step, inputs, size, device, args))
            if args.profile:
                profiles.append(profile(name, step, inputs, device, args.profile, folder, prefix=prefix))
        except Exception as e:  # one loop failing to build must not lose the others' numbers
            traceback.print_exc()
            rows.append(dict(loop=name, error=f"{type(e).__name__}: {e}"[:400]))
        finally:
            step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, profiles


def add_rates(rows: list[dict], flops: float, peak: float) -> dict | None:
    """TFLOP/s, MFU and speed-up against the first row, in place; returns the fastest other row."""
    base_rate = rows[0].get("images_per_s")
    for row in rows:
        if "error" in row:
            continue
        row["tflops"] = round(flops / (row["step_ms"] / 1e3) / 1e12, 3)
        row["mfu"] = round(row["tflops"] / peak, 4)
        row["speedup"] = round(row["images_per_s"] / base_rate, 3) if base_rate else None
    return max((r for r in rows[1:] if "error" not in r), key=lambda r: r["images_per_s"], default=None)


def print_rows(rows: list[dict], profiles: list[dict], device: torch.device) -> None:
    memory = "CUDA peak" if device.type == "cuda" else "saved for backward"
    print(f"{'loop':<22}{'step ms':>10}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{memory + ' MB':>22}"
          f"{'speed-up':>10}{'warm-up s':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['loop']:<22}failed: {r['error']}")
            continue
        print(f"{r['loop']:<22}{r['step_ms']:>10.1f}{r['images_per_s']:>10.1f}{r['tflops']:>10.2f}"
              f"{r['mfu']:>8.1%}{r['peak_mb']:>22.1f}{r['speedup']:>9.2f}x{r['warmup_s']:>11.1f}")
    for p in profiles:
        print(f"profile {p['loop']}: wall {p['wall_ms']} ms/step, device busy {p['device_busy_ms']} ms/step, "
              f"{p['launches_per_step']} launches/step -> {p['table']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-s16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loops", default="reference,stepkit",
                    help=f"comma-separated, first is the baseline; from {','.join(LOOPS)}")
    ap.add_argument("--compile", action="store_true", help="add the stepkit+compile loop")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="profile each loop over STEPS steps (torch.profiler); tables beside the JSON")
    ap.add_argument("--find-batch", action="store_true",
                    help="also search the largest batch that fits, with and without grad checkpointing")
    ap.add_argument("--memory-cap-mb", type=float, default=64.0,
                    help="--find-batch off CUDA: the activation bytes a step may save (CUDA: device memory)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.loops.split(",") if n.strip()]
    names += ["stepkit+compile"] if args.compile else []
    unknown = [n for n in names if n not in LOOPS]
    if unknown:
        ap.error(f"--loops: unknown {unknown}; allowed: {', '.join(LOOPS)}")
    device = torch.device(args.device)
    size = SIZES[args.size]
    out = args.out or Path(__file__).parent / "results" / f"dino_step_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    g = torch.Generator().manual_seed(0)
    shapes = [size["global_size"]] * 2 + [size["local_size"]] * size["local_crops"]
    views = [torch.randn(size["batch"], 3, s, s, generator=g).to(device) for s in shapes]
    torch.manual_seed(0)
    base = Dino(size).to(device)
    peak = matmul_peak_tflops(device)
    flops = count_flops(base, views, device)
    rows, profiles = run_loops(names, LOOPS, base, views, size, device, args, out.parent)
    best = add_rates(rows, flops, peak)
    largest = {}
    if args.find_batch:
        def views_of(batch: int):
            return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in shapes]

        cap = int(args.memory_cap_mb * 2**20)
        largest = {n: largest_batch(n, base, size, device, cap, views_of)
                   for n in ("stepkit", "stepkit+ckpt")}
        budget = ("device memory" if device.type == "cuda"
                  else f"{args.memory_cap_mb:g} MB of saved activations")
        print(f"largest batch that fits ({budget}): " + ", ".join(f"{n} {b}" for n, b in largest.items()))
    result = dict(
        benchmark="dino_step", size=args.size, **size, **run_facts(device), steps=args.steps,
        bf16_matmul_tflops=round(peak, 2), tflop_per_step=round(flops / 1e12, 4),
        rows=rows, profiles=profiles, targets=dict(speedup_min=2.3, mfu_min=0.22),
        best=best and best["loop"], largest_batch=largest,
    )
    result["meets_targets"] = bool(best and best["speedup"] >= 2.3 and best["mfu"] >= 0.22)
    print(f"DINO step, {args.size} (2x{size['global_size']} + {size['local_crops']}x{size['local_size']}, "
          f"batch {size['batch']}, out_dim {size['out_dim']}) on {result['device']}, "
          f"torch {torch.__version__}, {result['date']}; bf16 matmul {peak:.1f} TFLOP/s; "
          f"{flops / 1e12:.3f} TFLOP per step")
    print_rows(rows, profiles, device)
    print(f"targets (best stepkit loop >= 2.3x {names[0]} images/s, MFU >= 22%): "
          f"{'met' if result['meets_targets'] else 'NOT met'}")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

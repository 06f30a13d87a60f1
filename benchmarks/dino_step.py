"""One DINO training step: a loop in the shape of the original DINO code against the stepkit loop.

Both train the same ViT + DINO head on the same random multi-crop batch
(2 global + N local crops; random data, so only the step is timed):

- ``reference``: the original code's shape: attention written out
  (``softmax(q k^T / sqrt(d)) v``), fp16 autocast with a GradScaler, the loss
  as a double loop over (teacher view, student view) pairs, per-tensor
  gradient clipping that reads each norm to the host, a per-parameter EMA
  loop, plain ``torch.optim.AdamW``;
- ``stepkit``: the loop ``recipes/dino.py`` runs: SDPA attention, bf16
  autocast, fused AdamW, ``forward_loss`` / ``accumulate`` / ``clip``
  (multi-tensor) / ``apply_update`` / ``ema_update`` (multi-tensor lerp), no
  host reads; ``--compile`` compiles the student and teacher forward.

Reported per loop: step ms (median), images/s, TFLOP/s (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``), MFU against a bf16 matmul
measured in the same run, and peak memory (CUDA allocator; on the CPU, the
bytes autograd saved for backward).

    python benchmarks/dino_step.py --device cuda         # ViT-S/16, 2x224 + 8x96, batch 64, out_dim 65536
    python benchmarks/dino_step.py --device cuda --compile
    python benchmarks/dino_step.py --size tiny --steps 3       # smoke test (CPU, CI)

Prints a table; writes benchmarks/results/dino_step_<device>_<size>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
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


def reference_loop(student: Dino, device: torch.device):
    for block in student.backbone.blocks:
        block.attn.forward = manual_attention(block.attn)
    teacher = copy.deepcopy(student).requires_grad_(False)
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


def stepkit_loop(student: Dino, device: torch.device, compiled: bool):
    teacher = copy.deepcopy(student).requires_grad_(False)
    fused = device.type == "cuda"
    state = TrainState(model=student, target=teacher,
                       optimizer=torch.optim.AdamW(param_groups(student), lr=LR, fused=fused))
    run_student = torch.compile(student) if compiled else student
    run_teacher = torch.compile(teacher) if compiled else teacher
    center = torch.zeros(1, student.out_dim, device=device)

    def loss_fn(state, views):
        student_out = run_student(views)
        with torch.no_grad():
            teacher_out = run_teacher(views[:2])
        targets = teacher_softmax(teacher_out, center, TEACHER_TEMP)
        update_center(center, teacher_out, 0.9)
        return dino_loss(student_out, targets, student_temp=STUDENT_TEMP, n_student_views=len(views))

    def step(views):
        loss, _ = forward_loss(loss_fn, state, views, amp="bf16")
        accumulate(state, loss)
        cancel_last_layer_gradients(student.head, state.step, 0)
        clip(state, max_norm=CLIP)
        apply_update(state, lr=LR, wd=WD)
        ema_update(state.target, state.model, MOMENTUM)

    return step


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


def measure(name: str, step, views, size: dict, device: torch.device, args) -> dict:
    for _ in range(args.warmup):
        step(views)
    sync(device)
    with FlopCounterMode(display=False) as flops:
        step(views)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with SavedActivations() as saved:
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            step(views)
            sync(device)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else saved.peak
    return dict(loop=name, step_ms=round(seconds * 1e3, 2), images_per_s=round(size["batch"] / seconds, 1),
                tflop_per_step=round(flops.get_total_flops() / 1e12, 4),
                tflops=round(flops.get_total_flops() / seconds / 1e12, 3), peak_mb=round(peak / 2**20, 1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-s16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compile the stepkit loop's forward passes")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    size = SIZES[args.size]

    g = torch.Generator().manual_seed(0)
    shapes = [size["global_size"]] * 2 + [size["local_size"]] * size["local_crops"]
    views = [torch.randn(size["batch"], 3, s, s, generator=g).to(device) for s in shapes]
    torch.manual_seed(0)
    base = Dino(size).to(device)
    peak = matmul_peak_tflops(device)
    rows = [
        measure("reference", reference_loop(copy.deepcopy(base), device), views, size, device, args),
        measure("stepkit" + (" (compiled)" if args.compile else ""),
                stepkit_loop(copy.deepcopy(base), device, args.compile), views, size, device, args),
    ]
    for row in rows:
        row["mfu"] = round(row["tflops"] / peak, 4)
        row["speedup"] = round(row["images_per_s"] / rows[0]["images_per_s"], 3)
    result = dict(
        benchmark="dino_step", size=args.size, **size,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        steps=args.steps, bf16_matmul_tflops=round(peak, 2), rows=rows,
        targets=dict(speedup_min=2.3, mfu_min=0.22),
    )
    result["meets_targets"] = bool(rows[1]["speedup"] >= 2.3 and rows[1]["mfu"] >= 0.22)
    memory = "CUDA peak" if device.type == "cuda" else "saved for backward"
    print(f"DINO step, {args.size} ({2}x{size['global_size']} + {size['local_crops']}x{size['local_size']}, "
          f"batch {size['batch']}, out_dim {size['out_dim']}) on {result['device']}, "
          f"torch {torch.__version__}, "
          f"{result['date']}; bf16 matmul {peak:.1f} TFLOP/s")
    print(f"{'loop':<22}{'step ms':>10}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{memory + ' MB':>22}"
          f"{'speed-up':>10}")
    for r in rows:
        print(f"{r['loop']:<22}{r['step_ms']:>10.1f}{r['images_per_s']:>10.1f}{r['tflops']:>10.2f}"
              f"{r['mfu']:>8.1%}{r['peak_mb']:>22.1f}{r['speedup']:>9.2f}x")
    print(f"targets (stepkit >= 2.3x reference images/s, MFU >= 22%): "
          f"{'met' if result['meets_targets'] else 'NOT met'}")
    out = args.out or Path(__file__).parent / "results" / f"dino_step_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

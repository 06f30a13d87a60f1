"""One I-JEPA training step: a loop in the shape of the original I-JEPA code against the stepkit loop.

Both train the same ViT context encoder + narrow predictor, with an EMA
target encoder, on one random batch and one fixed draw of the paper's masks
(4 target blocks of scale 0.15-0.2, aspect 0.75-1.5, a 0.85-1.0 context,
``MultiBlock(sampler="ijepa")``):

- ``reference``: the original training script's shape: attention written
  out, the patch embedding as a strided convolution, fp16 autocast with a
  GradScaler, the predictor run once per target block, smooth-L1 on
  layer-normed targets, a per-parameter EMA loop, plain ``AdamW``;
- ``stepkit``: what ``recipes/ijepa.py`` runs: SDPA attention, the context
  encoder on the kept patches only (one batched call), the predictor on
  all target blocks in one batched call, bf16, fused AdamW,
  ``forward_loss`` / ``accumulate`` / ``clip`` / ``apply_update`` /
  ``ema_update``, no host reads;
- ``stepkit+compile`` and ``stepkit+cudagraphs``: the forward and the loss
  compiled (``mode="reduce-overhead"`` replays them as CUDA graphs).

Same columns as ``dino_step.py``:

    python benchmarks/ijepa_step.py --device cuda --loops reference,stepkit,stepkit+compile,stepkit+cudagraphs
    python benchmarks/ijepa_step.py --size tiny --steps 2      # smoke test (CPU, CI)

Prints a table; writes benchmarks/results/ijepa_step_<device>_<size>.json.
Targets (GPU): >= 2x the reference loop's images/s, MFU >= 25%.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from dino_step import (  # noqa: E402
    add_rates,
    conv_patches,
    manual_attention,
    matmul_peak_tflops,
    print_rows,
    run_facts,
    run_loops,
)

from stepkit import TrainState, accumulate, apply_update, clip, ema_update, forward_loss, param_groups  # noqa: E402
from stepkit.masking import MultiBlock, multi_block_masks  # noqa: E402
from stepkit.models import VisionTransformer  # noqa: E402
from stepkit.models.jepa import JEPAPredictor, gather_tokens, jepa_targets  # noqa: E402

SIZES = {
    "vit-s16": dict(vit="small", patch=16, image=224, batch=64, predictor_dim=384, predictor_depth=6,
                    predictor_heads=6),
    "tiny": dict(vit="toy", patch=4, image=32, batch=8, predictor_dim=32, predictor_depth=2,
                 predictor_heads=4),
}
MOMENTUM, LR, WD, CLIP = 0.996, 1e-3, 0.04, None  # I-JEPA does not clip gradients


class JEPA(nn.Module):
    def __init__(self, size: dict) -> None:
        super().__init__()
        self.encoder = VisionTransformer.preset(size["vit"], img_size=size["image"], patch_size=size["patch"],
                                                pos_embed="sincos")
        self.predictor = JEPAPredictor(self.encoder.grid**2, self.encoder.dim, size["predictor_dim"],
                                       size["predictor_depth"], size["predictor_heads"])

    def forward(self, images, context_idx, target_idx):
        context = self.encoder(images, keep=context_idx, all_tokens=True)[:, 1:]
        return self.predictor(context, context_idx, target_idx)


def batch_of(size: dict, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(size["batch"], 3, size["image"], size["image"], generator=g)
    grid = size["image"] // size["patch"]
    cfg = MultiBlock(targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                     context_scale=(0.85, 1.0), sampler="ijepa", min_keep=4)
    context_idx, target_idx = multi_block_masks(size["batch"], (grid, grid), cfg, g)
    return images.to(device), context_idx.to(device), target_idx.to(device)


def reference_loop(model: JEPA, device: torch.device):
    target = copy.deepcopy(model.encoder).requires_grad_(False)
    for net in (model.encoder, target, model.predictor):  # patched after the copy
        for block in net.blocks:
            block.attn.forward = manual_attention(block.attn)
    for net in (model.encoder, target):
        net.embed_patches = conv_patches(net)
    opt = torch.optim.AdamW(param_groups(model), lr=LR, weight_decay=WD)
    scaler = torch.amp.GradScaler(device.type)

    def step(batch):
        images, context_idx, target_idx = batch
        with torch.autocast(device.type, dtype=torch.float16):
            with torch.no_grad():
                h = F.layer_norm(target(images, all_tokens=True)[:, 1:], (target.dim,))
            context = model.encoder(images, keep=context_idx, all_tokens=True)[:, 1:]
            loss = 0.0
            for m in range(target_idx.shape[1]):  # the predictor once per target block
                pred = model.predictor(context, context_idx, target_idx[:, m:m + 1])
                loss = loss + F.smooth_l1_loss(pred[:, 0].float(), gather_tokens(h, target_idx[:, m]).float())
            loss = loss / target_idx.shape[1]
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():  # the original's EMA: one pair of kernels per parameter
            for q, k in zip(model.encoder.parameters(), target.parameters()):
                k.data.mul_(MOMENTUM).add_((1 - MOMENTUM) * q.detach().data)

    return step


def stepkit_loop(model: JEPA, device: torch.device, compiled: bool | str = False):
    target = copy.deepcopy(model.encoder).requires_grad_(False)
    fused = device.type == "cuda"
    state = TrainState(model=model, target=target,
                       optimizer=torch.optim.AdamW(param_groups(model), lr=LR, fused=fused))

    def forward(images, context_idx, target_idx):
        with torch.no_grad():
            targets = jepa_targets(target(images, all_tokens=True)[:, 1:], target_idx)
        pred = model(images, context_idx, target_idx)  # every target block in one batched call
        return F.smooth_l1_loss(pred.float(), targets.float())

    cudagraphs = compiled == "reduce-overhead"
    if compiled:
        forward = torch.compile(forward, mode=None if compiled is True else compiled, dynamic=False)

    def step(batch):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = forward_loss(lambda s, b: forward(*b), state, batch, amp="bf16")
        accumulate(state, loss)
        clip(state, max_norm=CLIP)
        apply_update(state, lr=LR, wd=WD)
        ema_update(state.target, model.encoder, MOMENTUM)

    return step


LOOPS = {
    "reference": lambda model, device: reference_loop(model, device),
    "stepkit": lambda model, device: stepkit_loop(model, device, compiled=False),
    "stepkit+compile": lambda model, device: stepkit_loop(model, device, compiled=True),
    "stepkit+cudagraphs": lambda model, device: stepkit_loop(model, device, compiled="reduce-overhead"),
}


def count_flops(base: JEPA, batch, device: torch.device) -> float:
    step = stepkit_loop(copy.deepcopy(base), device, compiled=False)
    step(batch)
    with FlopCounterMode(display=False) as flops:
        step(batch)
    return flops.get_total_flops()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-s16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loops", default="reference,stepkit",
                    help=f"comma-separated, first is the baseline; from {','.join(LOOPS)}")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.loops.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOOPS]
    if unknown:
        ap.error(f"--loops: unknown {unknown}; allowed: {', '.join(LOOPS)}")
    device = torch.device(args.device)
    size = SIZES[args.size]
    out = args.out or HERE / "results" / f"ijepa_step_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    batch = batch_of(size, device)
    torch.manual_seed(0)
    base = JEPA(size).to(device)
    peak = matmul_peak_tflops(device)
    flops = count_flops(base, batch, device)
    rows, profiles = run_loops(names, LOOPS, base, batch, size, device, args, out.parent, prefix="ijepa_step")
    best = add_rates(rows, flops, peak)
    result = dict(
        benchmark="ijepa_step", size=args.size, **size,
        context_patches=int(batch[1].shape[1]), target_blocks=list(batch[2].shape[1:]),
        **run_facts(device), steps=args.steps, bf16_matmul_tflops=round(peak, 2),
        tflop_per_step=round(flops / 1e12, 4),
        rows=rows, profiles=profiles, targets=dict(speedup_min=2.0, mfu_min=0.25), best=best and best["loop"],
    )
    result["meets_targets"] = bool(best and best["speedup"] >= 2.0 and best["mfu"] >= 0.25)
    print(f"I-JEPA step, {args.size} ({size['image']} px, batch {size['batch']}, context "
          f"{result['context_patches']} patches, targets {result['target_blocks']}) on {result['device']}, "
          f"torch {torch.__version__}, {result['date']}; bf16 matmul {peak:.1f} TFLOP/s; "
          f"{flops / 1e12:.3f} TFLOP per step")
    print_rows(rows, profiles, device)
    print(f"targets (best stepkit loop >= 2x {names[0]} images/s, MFU >= 25%): "
          f"{'met' if result['meets_targets'] else 'NOT met'}")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

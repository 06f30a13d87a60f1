"""On-device multi-crop augmentation: how many images per second it prepares, against what the step eats.

In one run: ``stepkit.augment.multi_crop`` on batches of decoded images
already on the device (random resized crops, flip, colour jitter,
grayscale, blur, solarisation; DINO's 2 global + N local views), and the
stepkit DINO step of ``benchmarks/dino_step.py`` at the same size. Headroom
= augmentation images/s / step images/s: above 1 the step never waits on
augmentation (augmenting serially before each step costs 1/headroom of it).

    python benchmarks/data.py --device cuda                 # 256 px images -> 2x224 + 8x96, ViT-S/16 step
    python benchmarks/data.py --size tiny --steps 3         # smoke test (CPU, CI)

Prints a table; writes benchmarks/results/data_<device>_<size>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dino_step import SIZES, Dino, stepkit_loop, sync  # noqa: E402

from stepkit.augment import MultiCrop, multi_crop, normalize  # noqa: E402

IMAGE_SIZE = {"vit-s16": 256, "tiny": 40}


def timed(fn, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-s16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    size = SIZES[args.size]
    crops = MultiCrop(global_size=size["global_size"], local_size=size["local_size"],
                      local_crops=size["local_crops"])
    g = torch.Generator().manual_seed(0)  # crop parameters are drawn on the host
    side = IMAGE_SIZE[args.size]
    images = torch.randint(0, 256, (size["batch"], 3, side, side), dtype=torch.uint8, device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def augment():
        return [normalize(v, mean, std) for v in multi_crop(images.float() / 255, crops, generator=g)]

    views = augment()
    torch.manual_seed(0)
    step = stepkit_loop(copy.deepcopy(Dino(size).to(device)), device, compiled=False)
    aug_s = timed(augment, device, args.steps, args.warmup)
    step_s = timed(lambda: step(views), device, args.steps, args.warmup)
    rows = [dict(stage=stage, ms=round(s * 1e3, 2), images_per_s=round(size["batch"] / s, 1))
            for stage, s in (("multi_crop (on device)", aug_s), ("DINO step (stepkit)", step_s))]
    headroom = step_s / aug_s
    result = dict(
        benchmark="data", size=args.size, image_size=side, crops=dict(global_size=crops.global_size,
        local_size=crops.local_size, local_crops=crops.local_crops), batch=size["batch"],
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(), torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        rows=rows, headroom=round(headroom, 2), meets_target=bool(headroom >= 1.0),
    )
    print(f"multi-crop augmentation vs the DINO step, {args.size} (batch {size['batch']} of {side} px "
          f"images -> "
          f"2x{crops.global_size} + {crops.local_crops}x{crops.local_size}) on {result['device']}, "
          f"torch {torch.__version__}, {result['date']}")
    print(f"{'stage':<26}{'ms':>10}{'images/s':>12}")
    for r in rows:
        print(f"{r['stage']:<26}{r['ms']:>10.1f}{r['images_per_s']:>12.1f}")
    print(f"headroom (augmentation rate / step rate): {headroom:.2f}x "
          f"({'the step never waits' if headroom >= 1 else 'augmentation is the bottleneck'})")
    out = args.out or Path(__file__).parent / "results" / f"data_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

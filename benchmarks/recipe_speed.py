"""The DINO recipe's own loop beside the benchmark's fastest loop, on the same device in one run.

``benchmarks/dino_step.py`` times a loop written for the benchmark; users run
``recipes/dino.py``. This runs the recipe itself (its data loader, on-device
multi-crop with prefetching, logging, checkpointing) on synthetic images
for ``--steps`` updates, reads its throughput from the recipe's own
``metrics.jsonl`` (the intervals after the warm-up), and times the
benchmark's loop at the same sizes:

    python benchmarks/recipe_speed.py --device cuda                    # ViT-S/16, CUDA graphs
    python benchmarks/recipe_speed.py --size tiny --steps 12           # smoke test (CPU, CI)

Prints a table; writes benchmarks/results/recipe_speed_<device>_<size>.json.
Target (GPU): the recipe >= 0.9x the benchmark loop's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import dino_step  # noqa: E402

RECIPE_FLAGS = {  # the recipe at the benchmark's sizes (dino_step.SIZES)
    "vit-s16": ["vit-s16", "--data.synthetic", "512", "--data.image-size", "224", "--batch-size", "64",
                "--compile", "reduce-overhead", "--amp", "bf16"],
    "tiny": ["--model.arch", "vit-toy", "--model.patch-size", "4", "--data.synthetic", "256",
             "--data.image-size", "32", "--crops.global-size", "32", "--crops.local-size", "16",
             "--crops.local-crops", "2", "--batch-size", "8", "--model.out-dim", "512",
             "--model.head-hidden", "128", "--model.bottleneck", "32", "--model.no-head-batch-norm"],
}


def recipe_images_per_s(size: str, steps: int, log_every: int, device: str, run_dir: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dino_recipe", HERE.parent / "recipes" / "dino.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    cfg = recipe.parse([*RECIPE_FLAGS[size], "--run-dir", str(run_dir), "--device", device,
                        "--train.steps", str(steps), "--optim.warmup-steps", "1",
                        "--log.every", str(log_every), "--log.no-console", "--ckpt.every", "0",
                        "--eval.no-knn"])
    summary = recipe.main(cfg)
    rates = [r["steps_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "steps_per_s" in r]
    settled = rates[1:] or rates  # the first interval holds the compile / warm-up
    batch = cfg.batch_size
    return dict(loop="recipes/dino.py", images_per_s=round(statistics.median(settled) * batch, 1),
                intervals=len(settled), whole_run_images_per_s=summary["images_per_s"],
                flags=" ".join(RECIPE_FLAGS[size]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(RECIPE_FLAGS), default="vit-s16")
    ap.add_argument("--steps", type=int, default=60, help="recipe updates (and benchmark-loop steps / 3)")
    ap.add_argument("--loop", default="stepkit+cudagraphs",
                    help=f"the benchmark loop to compare with; from {','.join(dino_step.LOOPS)}")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.loop not in dino_step.LOOPS:
        ap.error(f"--loop: unknown {args.loop!r}; allowed: {', '.join(dino_step.LOOPS)}")
    device = torch.device(args.device)
    loop = args.loop if device.type == "cuda" or "cudagraphs" not in args.loop else "stepkit"
    out = args.out or HERE / "results" / f"recipe_speed_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_images_per_s(args.size, args.steps, max(2, args.steps // 6), args.device,
                                     Path(tmp) / "run")
    bench = dino_step.main(["--device", args.device, "--size", args.size, "--loops", loop,
                            "--steps", str(max(3, args.steps // 3)), "--warmup", "3",
                            "--out", str(out.with_name(out.stem + "_loop.json"))])
    row = bench["rows"][0]
    ratio = round(recipe["images_per_s"] / row["images_per_s"], 3) if "images_per_s" in row else None
    result = dict(benchmark="recipe_speed", size=args.size, **dino_step.run_facts(torch.device(args.device)),
                  recipe=recipe, loop=row, ratio=ratio, target=0.9,
                  meets_target=bool(ratio is not None and ratio >= 0.9))
    print(f"\nDINO recipe vs benchmark loop, {args.size} on {result['device']}, torch {torch.__version__}")
    print(f"{'loop':<26}{'img/s':>10}")
    print(f"{'recipes/dino.py':<26}{recipe['images_per_s']:>10.1f}")
    print(f"{row['loop']:<26}{row.get('images_per_s', float('nan')):>10.1f}")
    print(f"recipe / loop: {ratio}x (target >= 0.9x on a GPU)")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

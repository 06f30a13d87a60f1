"""Continuing DINOv2 pretraining from a released backbone: naive against warm-up, on a shifted domain.

A released DINOv2 backbone comes without its DINO and iBOT heads; continuing
with fresh heads and every weight trainable lets the random heads' gradients
rewrite the backbone (dinov2#204: k-NN from 80 % to about 10 %). This
measures it on this machine, with images that ship offline:

1. "released": ``recipes/dinov2.py`` trains on the embedded digits written as
   image files (the original domain); its teacher's backbone, heads dropped,
   is the released backbone (``--init.from`` reads it out of the run).
2. Both continuations train on a shifted domain (the same digits, inverted
   and turned a quarter) from that backbone, for the same updates:
   naive (heads from scratch, everything at --optim.lr) and warm-up
   (``--continued.head-warmup-steps``: the backbone frozen while the heads
   learn, the teacher set to the student when it joins,
   ``--continued.backbone-lr`` 0.1 and layer decay 0.9).
3. Every kept checkpoint's teacher is probed (``stepkit.probe.evaluate_checkpoint``,
   k-NN as the recipe's) on both domains' held-out images.

    python benchmarks/continued_pretraining.py                      # about 10 minutes on 2 cores
    python benchmarks/continued_pretraining.py --steps 8 --continue-steps 8 --every 4   # smoke test

Prints a table; writes benchmarks/results/continued_pretraining.json.
Target: with warm-up the original domain's k-NN never falls more than 1 point below its start, while
the new domain's rises.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MODES = {
    "naive": [],
    "warm-up": ["--continued.head-warmup-steps", "{warmup}", "--continued.backbone-lr", "0.1",
                "--optim.layer-decay", "0.9"],
}


def write_domains(root: Path, seed: int) -> dict[str, dict[str, Path]]:
    """The embedded digits as PNG files, as they are ("original") and inverted, turned 90 degrees
    ("shifted"): ``<domain>/<split>/<digit>/<i>.png``."""
    from PIL import Image

    from stepkit.data import digits_canvas

    digits = digits_canvas(seed=seed, size=32)
    folders: dict[str, dict[str, Path]] = {}
    for domain in ("original", "shifted"):
        folders[domain] = {}
        for split in ("train", "test"):
            images, labels = digits[f"{split}_images"][:, 0].numpy(), digits[f"{split}_labels"].tolist()
            if domain == "shifted":
                images = np.rot90(1.0 - images, k=1, axes=(1, 2))
            folder = folders[domain][split] = root / domain / split
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                (folder / str(label)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.uint8(np.round(image * 255))).save(folder / str(label) / f"{i:04d}.png")
    return folders


def train(run_dir: Path, domain: dict[str, Path], steps: int, flags: list[str]) -> float:
    """``python recipes/dinov2.py`` on ``domain``'s training images; its wall time."""
    command = [sys.executable, str(ROOT / "recipes" / "dinov2.py"), "--run-dir", str(run_dir),
               "--log.no-console", "--data.root", str(domain["train"]), "--eval.train-root",
               str(domain["train"]), "--eval.val-root", str(domain["test"]), "--train.steps", str(steps),
               *flags]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def knn_on(run: Path, checkpoint: str, domain: dict[str, Path]) -> float:
    from stepkit.probe import evaluate_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # the probe's line on the folders it read
        return evaluate_checkpoint(run, "teacher", checkpoint=checkpoint, train_root=domain["train"],
                                   val_root=domain["test"])["knn_acc"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="updates of the released run")
    parser.add_argument("--continue-steps", type=int, default=300, help="updates of each continuation")
    parser.add_argument("--warmup", type=int, default=100, help="--continued.head-warmup-steps")
    parser.add_argument("--every", type=int, default=50, help="updates between probed checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "continued_pretraining.json")
    args = parser.parse_args(argv)

    from stepkit.probe import checkpoints_of

    work = Path(tempfile.mkdtemp(prefix="stepkit-continued-"))
    domains = write_domains(work / "images", args.seed)
    seed = ["--train.seed", str(args.seed)]
    train(work / "released", domains["original"], args.steps, seed)
    start = {d: knn_on(work / "released", "last", domains[d]) for d in domains}
    results = {"steps": args.steps, "continue_steps": args.continue_steps, "warmup": args.warmup,
               "seed": args.seed, "released": start, "modes": {}}
    for mode, flags in MODES.items():
        run = work / mode
        flags = [f.format(warmup=args.warmup) for f in flags]
        wall = train(run, domains["shifted"], args.continue_steps,
                     [*seed, "--init.from", str(work / "released"), "--ckpt.every", str(args.every),
                      "--ckpt.keep-last", "1000", *flags])
        curve = [{"checkpoint": p.name, **{d: knn_on(run, p.name, domains[d]) for d in domains}}
                 for p in checkpoints_of(run)[:-1]]  # every step_N (last is the final one again)
        low = min(c["original"] for c in curve)
        results["modes"][mode] = {
            "flags": flags, "wall_s": round(wall, 1), "curve": curve, "original_min": low,
            "original_end": curve[-1]["original"], "shifted_end": curve[-1]["shifted"],
            "meets_rule": low >= start["original"] - 0.01 and curve[-1]["shifted"] > start["shifted"]}

    print(f"released backbone ({args.steps} updates on the original digits): k-NN original "
          f"{start['original']:.3f}, shifted {start['shifted']:.3f}")
    print("| continuation | original: lowest / end | shifted: end | within 1 point, new domain up |")
    print("| --- | --- | --- | --- |")
    for mode, r in results["modes"].items():
        print(f"| {mode} | {r['original_min']:.3f} / {r['original_end']:.3f} | {r['shifted_end']:.3f} "
              f"| {'yes' if r['meets_rule'] else 'no'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")
    return results


if __name__ == "__main__":
    main()

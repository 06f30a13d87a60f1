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
3. Every kept checkpoint's teacher is probed on both domains: k-NN as the recipe's (k=20, cosine,
   weighted), 5-fold over all 1,797 images of a domain, so each image is held out once (one image is
   0.06 points; the digits' own test split of 359 made it 0.28).
4. All of it per seed; the table gives each seed and the mean.

    python benchmarks/continued_pretraining.py                      # seeds 0 1 2: about 45 minutes on 2 cores
    python benchmarks/continued_pretraining.py --seeds 0 --backbone-lr 0.3   # another backbone lr
    python benchmarks/continued_pretraining.py --seeds 0 --steps 8 --continue-steps 8 --every 4   # smoke

Prints a table; writes benchmarks/results/continued_pretraining.json.
Target: with warm-up the original domain's k-NN never falls more than 1 point below its start, while
the new domain's rises.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    "warm-up": ["--continued.head-warmup-steps", "{warmup}", "--continued.backbone-lr", "{backbone_lr}",
                "--optim.layer-decay", "0.9"],
}
FOLDS = 5


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
    """The teacher's k-NN accuracy over every image of ``domain`` (train and test folders), 5-fold: the
    images embedded once, each fold's fifth classified by the other four fifths."""
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    from stepkit.augment import normalize, to_unit
    from stepkit.data import EvalImages, labelled_folder
    from stepkit.evaluation import knn_accuracy, loader_features
    from stepkit.probe import load_part

    net, info = load_part(run, "teacher", checkpoint=checkpoint)
    facts = info["input"]
    sets = []
    for split in ("train", "test"):
        found = labelled_folder(domain[split], flag="domain")
        sets.append(EvalImages(found.paths, found.labels, size=int(facts["size"])))
    features, labels = loader_features(net, DataLoader(ConcatDataset(sets), batch_size=256),
                                       lambda x: normalize(to_unit(x), facts["mean"], facts["std"]))
    fold = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)) % FOLDS
    hits = 0.0
    for f in range(FOLDS):
        held = fold == f
        hits += knn_accuracy(features[~held], labels[~held], features[held], labels[held]) * int(held.sum())
    return hits / len(labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="updates of the released run")
    parser.add_argument("--continue-steps", type=int, default=300, help="updates of each continuation")
    parser.add_argument("--warmup", type=int, default=100, help="--continued.head-warmup-steps")
    parser.add_argument("--every", type=int, default=50, help="updates between probed checkpoints")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone-lr", type=float, default=0.1, help="warm-up's --continued.backbone-lr")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "continued_pretraining.json")
    args = parser.parse_args(argv)

    from stepkit.probe import checkpoints_of

    results: dict = {"steps": args.steps, "continue_steps": args.continue_steps, "warmup": args.warmup,
                     "backbone_lr": args.backbone_lr, "probe": f"k-NN, {FOLDS}-fold over every image",
                     "seeds": {}}
    for seed_value in args.seeds:
        work = Path(tempfile.mkdtemp(prefix="stepkit-continued-"))
        domains = write_domains(work / "images", seed_value)
        seed = ["--train.seed", str(seed_value)]
        train(work / "released", domains["original"], args.steps, seed)
        start = {d: knn_on(work / "released", "last", domains[d]) for d in domains}
        per_seed: dict = {"released": start, "modes": {}}
        for mode, flags in MODES.items():
            run = work / mode
            flags = [f.format(warmup=args.warmup, backbone_lr=args.backbone_lr) for f in flags]
            wall = train(run, domains["shifted"], args.continue_steps,
                         [*seed, "--init.from", str(work / "released"), "--ckpt.every", str(args.every),
                          "--ckpt.keep-last", "1000", *flags])
            curve = [{"checkpoint": p.name, **{d: knn_on(run, p.name, domains[d]) for d in domains}}
                     for p in checkpoints_of(run)[:-1]]  # every step_N (last is the final one again)
            low = min(c["original"] for c in curve)
            per_seed["modes"][mode] = {
                "flags": flags, "wall_s": round(wall, 1), "curve": curve, "original_min": low,
                "original_end": curve[-1]["original"], "shifted_end": curve[-1]["shifted"],
                "meets_rule": low >= start["original"] - 0.01 and curve[-1]["shifted"] > start["shifted"]}
        results["seeds"][seed_value] = per_seed
        shutil.rmtree(work, ignore_errors=True)  # the runs' checkpoints: hundreds of MB a seed
        print(f"seed {seed_value}: released backbone ({args.steps} updates on the original digits): k-NN "
              f"original {start['original']:.3f}, shifted {start['shifted']:.3f}", flush=True)

    print("| seed | continuation | original: start / lowest / end | shifted: start / end "
          "| within 1 point, new domain up |")
    print("| --- | --- | --- | --- | --- |")
    for seed_value, per_seed in results["seeds"].items():
        start = per_seed["released"]
        for mode, r in per_seed["modes"].items():
            print(f"| {seed_value} | {mode} | {start['original']:.3f} / {r['original_min']:.3f} / "
                  f"{r['original_end']:.3f} | {start['shifted']:.3f} / {r['shifted_end']:.3f} "
                  f"| {'yes' if r['meets_rule'] else 'no'} |")
    runs = list(results["seeds"].values())
    for mode in MODES:
        drops = [p["released"]["original"] - p["modes"][mode]["original_min"] for p in runs]
        gains = [p["modes"][mode]["shifted_end"] - p["released"]["shifted"] for p in runs]
        results[f"{mode}_mean"] = {"original_worst_drop": float(np.mean(drops)),
                                   "shifted_gain": float(np.mean(gains))}
        print(f"{mode}: original domain's worst drop {100 * np.mean(drops):.1f} points (mean over seeds), "
              f"shifted domain's gain {100 * np.mean(gains):+.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")
    return results


if __name__ == "__main__":
    main()

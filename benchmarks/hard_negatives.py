"""Do mined hard negatives help? The contrastive recipe on text pairs, without and with ``stepkit mine``'s.

    python benchmarks/hard_negatives.py                      # seeds 0 1 2, about 3 minutes on 2 cores
    python benchmarks/hard_negatives.py --seeds 0 --steps 50 # smoke

The pairs are questions about a thing's shape, colour and size and their answers (5 x 6 x 3 = 90
distinct answers; three phrasings of each question to train on, a fourth held out), so an answer differs
from its nearest others by one word: the case hard negatives are for. Per seed, one after the other:
run A trains the recipe's ``tiny`` text-text towers on the pairs; ``stepkit mine`` writes A's hard
negatives for the training pairs; run B trains from scratch with the same seed, steps and batch, plus
those negatives (``--data.negative-columns``). Both are scored on the held-out phrasing (recall@1 and
MRR@10, anchor -> answer, among all 90 answers). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPES = ("disc", "square", "triangle", "star", "ring")
COLOURS = ("red", "green", "blue", "yellow", "black", "white")
SIZES = ("small", "medium", "large")
ASKED = ("which {c} {s} thing is a {shape}?", "find the {s} {shape} that is {c}",
         "is there a {c} {shape} of {s} size?")
HELD_OUT = "the {shape} that is {s} and {c}: which one?"


def write_pairs(folder: Path) -> tuple[Path, Path]:
    rows = {"train": [], "val": []}
    for shape in SHAPES:
        for c in COLOURS:
            for s in SIZES:
                answer = f"the {s} {shape} painted {c}"
                rows["train"] += [{"anchor": q.format(c=c, s=s, shape=shape), "positive": answer}
                                  for q in ASKED]
                rows["val"].append({"anchor": HELD_OUT.format(c=c, s=s, shape=shape), "positive": answer})
    paths = []
    for split, split_rows in rows.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in split_rows))
        paths.append(path)
    return paths[0], paths[1]


def train(run_dir: Path, pairs: Path, val: Path, seed: int, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "recipes/contrastive.py", "tiny", "--run-dir", str(run_dir), "--data.pairs",
           str(pairs), "--data.val-pairs", str(val), "--data.kind", "text-text", "--train.seed", str(seed),
           "--train.steps", str(steps), "--optim.warmup-steps", str(max(1, steps // 10)), "--log.no-console",
           *extra]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seconds": round(time.perf_counter() - started, 1), **{k: summary[k] for k in (
        "recall_at_1_a2p", "mrr_at_10_a2p", "recall_at_1_a2p_before")}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "hard_negatives.json")
    args = parser.parse_args(argv)
    result: dict = {"steps": args.steps, "negatives": args.negatives, "rows": []}
    columns = [f"negative_{j + 1}" for j in range(args.negatives)]
    print("| seed | recall@1 without / with mined negatives | MRR@10 without / with | before training |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        pairs, val = write_pairs(folder)
        for seed in args.seeds:
            plain = train(folder / f"plain{seed}", pairs, val, seed, args.steps, [])
            mined = folder / f"mined{seed}.jsonl"
            mine = [sys.executable, "-m", "stepkit", "mine", str(folder / f"plain{seed}"), "--pairs",
                    str(pairs), "--out", str(mined), "--negatives", str(args.negatives)]
            done = subprocess.run(mine, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            hard = train(folder / f"hard{seed}", mined, val, seed, args.steps,
                         ["--data.negative-columns", *columns])
            result["rows"].append({"seed": seed, "without": plain, "with": hard})
            print(f"| {seed} | {plain['recall_at_1_a2p']:.3f} / {hard['recall_at_1_a2p']:.3f} "
                  f"| {plain['mrr_at_10_a2p']:.3f} / {hard['mrr_at_10_a2p']:.3f} "
                  f"| {plain['recall_at_1_a2p_before']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

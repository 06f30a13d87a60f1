"""The online probe (``--eval.online``): what it costs a step, and how close it ends to the end-of-run probes.

    python benchmarks/online_probe.py                              # DINO and I-JEPA defaults, seeds 0 1 2
    python benchmarks/online_probe.py --seeds --cost-steps 400 --cost-repeats 2   # the cost alone
    python benchmarks/online_probe.py --seeds 0 --steps 100 --cost-steps 40 --cost-repeats 1   # smoke

Cost: each recipe's default runs ``--cost-steps`` updates with the probe and with ``--eval.no-online``,
alternated ``--cost-repeats`` times, one after the other; the cost is the median ratio of their training
loops' seconds (``wall_s``) minus one. Tracking: each recipe's default run (``--steps``: its own length when
not given) per seed; its ``online_acc`` (the online head on the held-out images at the end) beside the
end-of-run linear probe on the same network's same features (I-JEPA: ``linear_acc_last_layer``, the
target's last layer pooled; DINO: ``stepkit eval RUN --linear``'s ``linear_acc`` on the teacher) and the
k-NN accuracy. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = ("dino", "ijepa")


def train(recipe: str, run_dir: Path, seed: int, steps: int | None, *extra: str) -> dict:
    cmd = [sys.executable, f"recipes/{recipe}.py", "--run-dir", str(run_dir), "--train.seed", str(seed),
           "--log.no-console", *(["--train.steps", str(steps)] if steps else []), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def end_of_run_linear(recipe: str, run_dir: Path, summary: dict) -> float:
    if recipe == "ijepa":
        return summary["linear_acc_last_layer"]
    cmd = [sys.executable, "-m", "stepkit", "eval", str(run_dir), "--linear"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((run_dir / "eval" / "last.json").read_text())["linear_acc"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="tracking runs' length (the recipe's)")
    parser.add_argument("--cost-steps", type=int, default=150)
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "online_probe.json")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the tracking runs in this folder (finished ones there are reused)")
    args = parser.parse_args(argv)
    result: dict = {"cost": {}, "tracking": []}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        kept = args.keep or folder
        print("| recipe | loop s with / without the probe (median) | cost |")
        print("| --- | --- | --- |")
        for recipe in RECIPES:
            ratios, pairs = [], []
            for repeat in range(args.cost_repeats):
                common = ("--eval.no-knn",) if recipe == "dino" else ("--eval.no-linear",)
                on = train(recipe, folder / f"{recipe}-on{repeat}", 0, args.cost_steps, *common)["wall_s"]
                off = train(recipe, folder / f"{recipe}-off{repeat}", 0, args.cost_steps, *common,
                            "--eval.no-online")["wall_s"]
                ratios.append(on / off)
                pairs.append((on, off))
            cost = statistics.median(ratios) - 1
            result["cost"][recipe] = {"steps": args.cost_steps, "seconds_with_without": pairs, "cost": cost}
            mid = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]
            print(f"| {recipe} | {mid[0]:.1f} / {mid[1]:.1f} | {100 * cost:+.1f} % |", flush=True)
        print()
        print("| recipe | seed | online probe (held-out) | end-of-run linear probe | k-NN | alpha |")
        print("| --- | --- | --- | --- | --- | --- |")
        for recipe in RECIPES:
            for seed in args.seeds:
                run_dir = kept / f"{recipe}-{seed}"
                done = run_dir / "summary.json"  # a finished run kept before (--keep): read, not retrained
                summary = (json.loads(done.read_text()) if done.exists()
                           else train(recipe, run_dir, seed, args.steps))
                row = {"recipe": recipe, "seed": seed, "steps": summary["steps"],
                       "online_acc": summary["online_acc"], "online_alpha": summary["online_alpha"],
                       "knn_acc": summary["knn_acc"],
                       "linear_acc": end_of_run_linear(recipe, run_dir, summary)}
                result["tracking"].append(row)
                print(f"| {recipe} | {seed} | {row['online_acc']:.3f} | {row['linear_acc']:.3f} "
                      f"| {row['knn_acc']:.3f} | {row['online_alpha']:g} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

"""Does an attentive probe read I-JEPA's features better than a linear one? ``stepkit eval --attentive``.

    python benchmarks/attentive_probe.py                       # I-JEPA's default run, seeds 0 1 2 (~15 min)
    python benchmarks/attentive_probe.py --runs runs/ijepa-0 runs/ijepa-1   # finished runs instead
    python benchmarks/attentive_probe.py --seeds 0 --steps 60  # smoke

Per seed: the recipe's default run (``python recipes/ijepa.py``), then ``stepkit eval RUN --attentive``
on its last checkpoint: the linear probe on the target's last layer pooled (``linear_acc_last_layer``),
the better of that and the last layers' (``linear_acc``), the attentive probe on every token of the last
layer (``attentive_acc``), and k-NN, all on the same held-out digits. Prints a table, writes JSON.
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
KEYS = ("linear_acc_last_layer", "linear_acc", "attentive_acc", "knn_acc")


def evaluate(run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "stepkit", "eval", str(run_dir), "--attentive"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    result = json.loads((run_dir / "eval" / "last.json").read_text())
    return {k: result[k] for k in KEYS}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="the runs' length (the recipe's)")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="finished I-JEPA runs to probe")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "attentive_probe.json")
    args = parser.parse_args(argv)
    rows = []
    print("| run | linear (last layer) | linear (best) | attentive | k-NN |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        runs = list(args.runs)
        for seed in [] if runs else args.seeds:
            run_dir = Path(work) / f"ijepa-{seed}"
            cmd = [sys.executable, "recipes/ijepa.py", "--run-dir", str(run_dir), "--train.seed", str(seed),
                   "--log.no-console", *(["--train.steps", str(args.steps)] if args.steps else [])]
            if subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed")
            runs.append(run_dir)
        for run_dir in runs:
            row = {"run": run_dir.name, **evaluate(run_dir)}
            rows.append(row)
            print(f"| {row['run']} | " + " | ".join(f"{row[k]:.3f}" for k in KEYS) + " |", flush=True)
    gains = [r["attentive_acc"] - r["linear_acc_last_layer"] for r in rows]
    result = {"rows": rows, "attentive_minus_linear_last_layer": {"mean": statistics.mean(gains),
                                                                   "min": min(gains), "max": max(gains)}}
    print(f"attentive - linear (last layer): mean {statistics.mean(gains):+.3f}, "
          f"from {min(gains):+.3f} to {max(gains):+.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

"""Re-run every measured table of the docs (each recipe's default command on seeds 0, 1, 2) and print it.

    python benchmarks/tables.py                            # every table: about 45 minutes on 2 cores
    python benchmarks/tables.py --only dino --seeds 0      # one table, one seed
    python benchmarks/tables.py --only autoencoder --steps 2 --seeds 0   # smoke test (CI)
    python benchmarks/tables.py --page docs/measurements.md   # the docs' page of measurements

Each run is the README's command as a new user types it (a fresh run
directory, the recipe's defaults, ``--train.seed`` and, where a recipe ties
its data to it, ``--data.seed``), one after the other: two torch jobs at once
on a small machine slow each other many times over. Each table is printed in
the docs' format under a line naming the machine it came from: the CPU
model and its kernel-selecting features, oneDNN's version, torch's vector
kernels and threads (``stepkit.rundir.environment``; the same command gives
other numbers on a CPU that differs in any of them). Writes
``benchmarks/results/tables.json``: every run's command, summary and wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Table:
    """One docs table: the recipe and preset it runs, and how each row reads a run's summary."""

    name: str
    recipe: str
    preset: str | None
    header: str
    row: str  # a format string over the summary's keys, plus seed and wall
    data_seed: bool = False  # the recipe's embedded data follows --train.seed (--data.seed too)
    flags: tuple[str, ...] = ()  # after the preset


JEPA_IMAGES = (  # ijepa and hjepa: the same columns
    "| seed | `linear_acc` (last layer / last 4) | context encoder | untrained | raw pixels "
    "| `knn_acc` (trained / untrained / pixels) | whole command |",
    "| {seed} | **{linear_acc:.3f}** ({linear_acc_last_layer:.3f} / {linear_acc_last_layers:.3f}) "
    "| {linear_acc_context_encoder:.3f} | {linear_acc_random_init:.3f} | {linear_acc_pixels:.3f} "
    "| {knn_acc:.3f} / {knn_acc_random_init:.3f} / {knn_acc_pixels:.3f} | {wall} |")
DISTILLATION = (  # dino and dinov2
    "| seed | knn_acc (teacher) | student | untrained | raw pixels | whole command |",
    "| {seed} | {knn_acc:.3f} | {knn_acc_student:.3f} | {knn_acc_random_init:.3f} "
    "| {knn_acc_pixels:.3f} | {wall} |")
RETRIEVAL = (  # both contrastive presets
    "| seed | recall@1 i→t / t→i | recall@5 i→t / t→i | before training, recall@1 | chance, recall@1 "
    "| whole command |",
    "| {seed} | {recall_at_1_i2t:.3f} / {recall_at_1_t2i:.3f} "
    "| {recall_at_5_i2t:.3f} / {recall_at_5_t2i:.3f} "
    "| {recall_at_1_i2t_before:.3f} / {recall_at_1_t2i_before:.3f} | {recall_at_1_chance:.3f} | {wall} |")
MATRYOSHKA = (  # recall at each width the matryoshka preset trains
    "| seed | recall@1 i→t at 128 / 16 / 8 / 4 dims | recall@1 t→i at 128 / 16 / 8 / 4 | whole command |",
    "| {seed} | {recall_at_1_i2t:.3f} / {recall_at_1_i2t_d16:.3f} / {recall_at_1_i2t_d8:.3f} "
    "/ {recall_at_1_i2t_d4:.3f} | {recall_at_1_t2i:.3f} / {recall_at_1_t2i_d16:.3f} "
    "/ {recall_at_1_t2i_d8:.3f} / {recall_at_1_t2i_d4:.3f} | {wall} |")

TABLES = [
    Table("dino", "dino", None, *DISTILLATION),
    Table("dinov2", "dinov2", None, *DISTILLATION),
    Table("ijepa", "ijepa", None, *JEPA_IMAGES),
    Table("hjepa", "ijepa", "hjepa", *JEPA_IMAGES),
    Table("timeseries", "jepa_sequences", "timeseries",
          "| seed | `linear_acc` (last layer / last 4) | context encoder | untrained | raw input "
          "| `knn_acc` (trained / untrained / raw) | whole command |",
          "| {seed} | **{linear_acc:.3f}** ({linear_acc_last_layer:.3f} / {linear_acc_last_layers:.3f}) "
          "| {linear_acc_context_encoder:.3f} | {linear_acc_random_init:.3f} | {linear_acc_raw:.3f} "
          "| {knn_acc:.3f} / {knn_acc_random_init:.3f} / {knn_acc_raw:.3f} | {wall} |"),
    Table("text", "jepa_sequences", "text",
          "| seed | `linear_acc` (last layer / last 4) | context encoder | untrained | bag of words "
          "| `knn_acc` (trained / untrained / bag of words) | whole command |",
          "| {seed} | **{linear_acc:.3f}** ({linear_acc_last_layer:.3f} / {linear_acc_last_layers:.3f}) "
          "| {linear_acc_context_encoder:.3f} | {linear_acc_random_init:.3f} | {linear_acc_bow:.3f} "
          "| {knn_acc:.3f} / {knn_acc_random_init:.3f} / {knn_acc_bow:.3f} | {wall} |"),
    Table("contrastive", "contrastive", None, *RETRIEVAL),
    Table("contrastive-tiny", "contrastive", "tiny", *RETRIEVAL),
    Table("contrastive-siglip", "contrastive", "siglip", *RETRIEVAL),
    Table("contrastive-matryoshka", "contrastive", "matryoshka", *MATRYOSHKA),
    # the same run with the narrower widths' weights at 0: tiny's training, read at each width
    Table("contrastive-matryoshka-off", "contrastive", "matryoshka", *MATRYOSHKA,
          flags=("--loss.matryoshka-weights", "1", "0", "0", "0")),
    Table("autoencoder", "autoencoder", None,
          "| `--data.seed` = `--train.seed` | voxel_corr (model) | ridge, alpha per voxel | ridge, one alpha "
          "| noise ceiling | stopped / best step | whole command |",
          "| {seed} | {voxel_corr:.3f} | {voxel_corr_ridge:.3f} | {voxel_corr_ridge_shared_alpha:.3f} "
          "| {voxel_corr_ceiling:.3f} | {steps} / {best_step} | {wall} |", data_seed=True),
]


def machine_line() -> str:
    """The machine a table came from, as its docs heading line says it."""
    sys.path.insert(0, str(ROOT))
    from stepkit.rundir import environment

    env = environment()
    flags = ", ".join(env["cpu_flags"]) or "none of stepkit.rundir.KERNEL_FLAGS"
    return (f"{env['cpu']} ({flags}), oneDNN {env['onednn']}, torch {env['torch']} "
            f"({env['cpu_capability']} kernels, {env['threads']} threads), numpy {env['numpy']}, "
            f"{time.strftime('%Y-%m-%d')}")


def run_one(table: Table, seed: int, steps: int | None, work: Path) -> dict:
    run_dir = work / f"{table.name}_seed{seed}"
    cmd = [sys.executable, f"recipes/{table.recipe}.py", *([table.preset] if table.preset else []),
           *table.flags, "--run-dir", str(run_dir), "--train.seed", str(seed), "--log.no-console"]
    if table.data_seed:
        cmd += ["--data.seed", str(seed)]
    if steps is not None:
        cmd += ["--train.steps", str(steps), "--optim.warmup-steps", "1"]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"table": table.name, "seed": seed, "command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
            "summary": summary}


def row(table: Table, run: dict) -> str:
    minutes, seconds = divmod(round(run["wall_s"]), 60)
    wall = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    return table.row.format(seed=run["seed"], wall=wall, **run["summary"])



PAGE_HEAD = """# Measurements

The recipes' measured tables are on this page, and this page comes from one command:

    python benchmarks/tables.py --page docs/measurements.md

It runs each recipe's default command (and the presets below) as a new user types it, on seeds 0, 1
and 2, one after the other, and writes each table under the machine and the date it was measured
on (the same command gives other numbers on a CPU that differs in its kernels: see
[Reproducing a run](guides/reproduce.md)). `--only NAME` re-runs one table and keeps the others.
"""


def section(table: Table, machine: str, rows: list[str]) -> str:
    """One table of the measurements page: its command, the machine and date, the rows."""
    command = " ".join(["python", f"recipes/{table.recipe}.py", *([table.preset] if table.preset else []),
                        *table.flags, "--train.seed", "S"])
    if table.data_seed:
        command += " --data.seed S"
    rule = "|" + " --- |" * (table.header.count(" | ") + 1)
    return (f"## {table.name}\n\n`{command}` (S = the seed), measured on {machine}:\n\n"
            f"{table.header}\n{rule}\n" + "\n".join(rows) + "\n")


def write_page(path: Path, sections: dict[str, str]) -> None:
    """Write the page, keeping the sections of tables that were not re-run, in TABLES' order."""
    kept: dict[str, str] = {}
    if path.exists():
        for part in path.read_text().split("\n## ")[1:]:
            kept[part.split("\n", 1)[0].strip()] = "## " + part.rstrip() + "\n"
    kept.update(sections)
    body = "\n".join(kept[t.name] for t in TABLES if t.name in kept)
    path.write_text(PAGE_HEAD + "\n" + body)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[t.name for t in TABLES],
                        choices=[t.name for t in TABLES], help="the tables to re-run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="shorter runs, for a smoke test only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tables.json")
    parser.add_argument("--page", type=Path, default=None,
                        help="write the tables that ran into this Markdown page (docs/measurements.md)")
    args = parser.parse_args(argv)
    machine = machine_line()
    result: dict = {"machine": machine, "steps": args.steps, "runs": []}
    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as work:
        for table in [t for t in TABLES if t.name in args.only]:
            rule = "|" + " --- |" * (table.header.count(" | ") + 1)
            print(f"\n{table.name} — {machine}\n\n{table.header}\n{rule}", flush=True)
            rows = []
            for seed in args.seeds:
                run = run_one(table, seed, args.steps, Path(work))
                result["runs"].append(run)
                rows.append(row(table, run))
                print(rows[-1], flush=True)
            sections[table.name] = section(table, machine, rows)
            if args.page is not None:  # after each table: a run stopped midway keeps what it measured
                write_page(args.page, sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

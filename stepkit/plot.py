"""``python -m stepkit.plot RUN_DIR``: PNG curves of a run's metrics, one file per metric.

Writes ``RUN_DIR/plots/<metric>.png`` (x: optimizer step) from
``metrics.jsonl``. Needs matplotlib: ``pip install "stepkit[plot]"``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from stepkit.log import metric_history, read_history


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write one PNG per metric of ``run_dir``'s history; return their paths.

    Raises:
        ImportError: naming the ``plot`` extra when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('stepkit.plot needs matplotlib: pip install "stepkit[plot]"') from None
    records = read_history(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k for r in records for k in r if k != "step"})
    written = []
    for name in names:
        steps, values = metric_history(records, name)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set(xlabel="step", ylabel=name, title=f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m stepkit.plot RUN_DIR [--out DIR]``: ``plot_run`` from the command line.
    """
    parser = argparse.ArgumentParser(prog="python -m stepkit.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {len(paths)} plots to {paths[0].parent if paths else args.out}")


if __name__ == "__main__":
    main()

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

__all__ = ["plot_run", "main"]


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write one PNG per metric of ``run_dir``'s history; return their paths.

    Args:
        run_dir: A run directory (its ``metrics.jsonl``) or the file itself.
        out_dir: Where the PNGs go; default ``run_dir/plots``.

    Returns:
        The files written, one per metric (``/`` in a name becomes ``_``).

    Raises:
        ImportError: naming the ``plot`` extra when matplotlib is missing.
        FileNotFoundError: when there is no metrics file.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr/head": 0.1}\\n'
        ...                                        '{"step": 2, "loss": 1.0, "lr/head": 0.1}\\n')
        >>> [p.name for p in plot_run(run)]
        ['loss.png', 'lr_head.png']
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('stepkit.plot needs matplotlib: pip install "stepkit[plot]"') from None
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

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Raises:
        SystemExit: with one line, for a folder without metrics or no matplotlib.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\\n')
        >>> main([str(run), "--out", str(run / "curves")])  # doctest: +ELLIPSIS
        wrote 1 plots to .../curves
    """
    parser = argparse.ArgumentParser(prog="python -m stepkit.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {len(paths)} plots to {paths[0].parent if paths else args.out}")


if __name__ == "__main__":
    main()

"""``stepkit plot RUN`` (or ``python -m stepkit.plot RUN``): a run's curves, as pictures.

``plot_page`` writes ``RUN/plots/curves.png`` (every metric of ``metrics.jsonl`` in one grid: losses,
then probes, then collapse metrics, then schedules and the rest; x: optimizer step) and
``RUN/plots/curves.html`` (the same panels as inline SVG with the run's ``summary.json`` numbers, one file
that opens anywhere); ``plot_run`` writes one PNG per metric. Needs matplotlib:
``pip install "stepkit[plot]"``.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from stepkit.log import metric_history, read_history

__all__ = ["plot_run", "plot_page", "metric_groups", "pca_2d", "embedding_map", "main"]

_PROBES = ("online_", "knn_", "linear_", "recall_", "mrr_", "ndcg_")
_LOSS_TERMS = ("dino", "ibot", "koleo", "clip", "siglip")
_COLLAPSE = ("std", "rank", "entropy", "collapse", "norm_mean")
_SCHEDULES = ("lr", "wd", "momentum", "teacher_temp")
_GROUPS = (  # (title, does a metric name belong here), in the page's order
    ("losses", lambda n: not n.startswith(_PROBES) and (n in ("loss", *_LOSS_TERMS) or n.endswith("_loss"))),
    ("probes", lambda n: n.startswith(_PROBES)),
    ("collapse", lambda n: any(w in n for w in _COLLAPSE)),
    ("schedules", lambda n: n.split("/")[0] in _SCHEDULES or n.startswith("lr_")),
)


def metric_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """The metrics of a run sorted into panels' groups: losses, probes, collapse, schedules, other (each
    name in the first group that takes it; empty groups left out).

    Examples:
        >>> names = ["lr", "loss", "online_train_acc", "online_loss", "feat_std", "grad_norm", "dino"]
        >>> groups = metric_groups(names)
        >>> groups[:2]
        [('losses', ['dino', 'loss']), ('probes', ['online_loss', 'online_train_acc'])]
        >>> groups[2:]
        [('collapse', ['feat_std']), ('schedules', ['lr']), ('other', ['grad_norm'])]
    """
    groups: dict[str, list[str]] = {title: [] for title, _ in _GROUPS}
    groups["other"] = []
    for name in sorted(names):
        title = next((t for t, takes in _GROUPS if takes(name)), "other")
        groups[title].append(name)
    return [(title, found) for title, found in groups.items() if found]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('stepkit.plot needs matplotlib: pip install "stepkit[plot]"') from None
    return plt


def _numeric_names(records: list[dict[str, Any]]) -> list[str]:
    """Metrics with a number in some record (bools and text, such as a collapse warning, left out)."""
    return sorted({k for r in records for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})


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
    plt = _pyplot()
    records = read_history(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = _numeric_names(records)
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


def _panel(ax: Any, records: list[dict[str, Any]], name: str) -> None:
    steps, values = metric_history(records, name)
    ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_page(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write a run's curves as one PNG grid and one HTML page; return ``(png, html)``.

    Args:
        run_dir: A run directory (its ``metrics.jsonl``; ``summary.json`` when there).
        out_dir: Where the files go; default ``run_dir/plots``.

    Returns:
        ``curves.png`` (a panel per metric logged more than once, grouped as ``metric_groups`` sorts
        them) and ``curves.html`` (each group a section of inline SVG panels, the summary's numbers in a
        table: the end-of-run probes, logged once, are there).

    Raises:
        ImportError: naming the ``plot`` extra when matplotlib is missing.
        FileNotFoundError: when there is no metrics file.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\\n'
        ...                                        '{"step": 2, "loss": 1.0, "lr": 0.2}\\n')
        >>> png, page = plot_page(run)
        >>> png.name, page.name, "<svg" in page.read_text() and "loss" in page.read_text()
        ('curves.png', 'curves.html', True)
    """
    from stepkit._atomic import atomic_write_bytes

    plt = _pyplot()
    run = Path(run_dir)
    records = read_history(run)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    numeric = _numeric_names(records)
    curves = [n for n in numeric if len(metric_history(records, n)[0]) > 1]  # once: the summary's table
    groups = metric_groups(curves or numeric)
    names = [n for _, members in groups for n in members]
    cols = min(4, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names):
        _panel(ax, records, name)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.resolve().name}: {len(names)} metrics over {records[-1].get('step', 0)} steps"
                 if records else f"{run.resolve().name}: no metrics yet")
    fig.tight_layout()
    png = out / "curves.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buffer.getvalue())
    sections = []
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, selectable
        for title, members in groups:
            panels = []
            for name in members:
                fig, ax = plt.subplots(figsize=(3.6, 2.5), dpi=100)
                _panel(ax, records, name)
                fig.tight_layout()
                svg = io.StringIO()
                fig.savefig(svg, format="svg")
                plt.close(fig)
                panels.append(svg.getvalue()[svg.getvalue().index("<svg"):])
            sections.append(f"<h2>{html.escape(title)}</h2>\n<div class=grid>{''.join(panels)}</div>")
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    numbers = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool))
    page = (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(run.resolve().name)}"
            "</title><style>body{font-family:sans-serif;margin:2em}.grid{display:flex;flex-wrap:wrap}"
            "td{padding:0 1em 0 0}</style></head><body>\n"
            f"<h1>{html.escape(str(run))}</h1>\n" + "\n".join(sections)
            + (f"\n<h2>summary</h2>\n<table>{numbers}</table>" if numbers else "") + "\n</body></html>\n")
    target = out / "curves.html"
    atomic_write_bytes(target, page.encode("utf-8"))
    return png, target


def pca_2d(features: Any) -> Any:
    """The first two principal components of ``features`` (N, D): the centred rows projected on the
    two leading right singular vectors, each signed so its largest loading is positive (float64).

    Examples:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 1.0], [4.0, 1.0, 1.0]])
        >>> pca_2d(x)[:, 0].round(decimals=3).tolist()  # mostly the first column, centred
        [-2.02, -0.082, 2.103]
    """
    import torch

    x = torch.as_tensor(features, dtype=torch.float64)
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:2]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    coords = x @ (axes * signs).T
    return coords if coords.shape[1] == 2 else torch.nn.functional.pad(coords, (0, 2 - coords.shape[1]))


def embedding_map(features: Any, labels: Any, path: str | os.PathLike, *, title: str = "",
                  names: dict[int, str] | None = None) -> Path:
    """Write a 2-D map of ``features`` coloured by ``labels`` to ``path`` (PNG): PCA, and beside it UMAP
    when ``umap-learn`` is installed, both of the L2-normalised features (the k-NN probe's cosine).

    Args:
        features: ``(N, D)`` embeddings (e.g. of the held-out images).
        labels: ``(N,)`` integer labels (classes, or which side of a pair).
        path: The PNG to write (replaced whole).
        title: The figure's title.
        names: A label's name in the legend (default: the label itself).

    Returns:
        ``path``.

    Examples:
        >>> import tempfile, pathlib, torch
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "map.png"
        >>> embedding_map(torch.randn(30, 5), torch.arange(30) % 3, out).read_bytes()[:4]
        b'\\x89PNG'
    """
    import torch

    from stepkit._atomic import atomic_write_bytes

    plt = _pyplot()
    labels = torch.as_tensor(labels).long()
    features = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float64), dim=1)
    maps = [("PCA", pca_2d(features))]
    try:
        import umap  # type: ignore[import-not-found]  # the optional umap-learn

        coords = umap.UMAP(random_state=0).fit_transform(features.float().numpy())
        maps.append(("UMAP", torch.as_tensor(coords)))
    except ImportError:
        pass
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis")
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 5), dpi=100, squeeze=False)
    for ax, (method, coords) in zip(axes[0], maps):
        for i, label in enumerate(classes):
            at = labels == label
            colour = cmap(i if len(classes) <= 20 else i / max(1, len(classes) - 1))
            ax.scatter(coords[at, 0].numpy(), coords[at, 1].numpy(), s=8, color=colour,
                       label=(names or {}).get(label, str(label)))
        ax.set_title(f"{method} of {len(labels)} embeddings", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0][-1].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    """``stepkit plot RUN [--out DIR]`` (also ``python -m stepkit.plot``): ``plot_page`` and ``plot_run``
    from the command line.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Raises:
        SystemExit: with one line, for a folder without metrics or no matplotlib.

    Examples:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\\n')
        >>> main([str(run), "--out", str(run / "curves")])  # doctest: +ELLIPSIS
        wrote .../curves/curves.png, .../curves/curves.html and 1 plots, one a metric
    """
    parser = argparse.ArgumentParser(prog="stepkit plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        png, page = plot_page(args.run_dir, args.out)
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ImportError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {png}, {page} and {len(paths)} plots, one a metric")


if __name__ == "__main__":
    main()

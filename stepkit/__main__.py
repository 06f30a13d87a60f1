"""``stepkit``: list the recipes that ship with the package, copy one out to edit, or run one.

    stepkit ls                              # every recipe, its presets, one line each
    stepkit cp dino ./my_dino.py            # a copy to edit (refuses to overwrite without --force)
    stepkit cp --config dino ./dino.yaml    # its preset as a commented YAML file for --config
    stepkit run dino [PRESET] [--flags]     # the shipped recipe, as python recipes/dino.py would run
    stepkit export runs/dino                # the parts a run can export
    stepkit export runs/dino --part teacher --out teacher.safetensors   # --format timm|hf|...
    stepkit eval runs/dino [--all] [--train-root L --val-root V] [--linear] [--plot]   # probe checkpoints
    stepkit eval runs/ijepa --attentive     # an attentive probe on the target's tokens, beside the linear
    stepkit mine runs/qa --pairs qa.jsonl --out qa_negatives.jsonl   # hard negatives for a pairs file
    stepkit plot runs/dino                  # its curves: plots/curves.png and curves.html
    torchrun --nproc_per_node=2 -m stepkit run dino --run-dir runs/d

The recipes are the repository's ``recipes/`` folder, installed as
``stepkit.recipes`` (one source, nothing copied at build time). Listing reads
the files without importing them, so it answers before torch would load.
"""

from __future__ import annotations

import argparse
import ast
import runpy
import shutil
import sys
from pathlib import Path

__all__ = ["recipe_dir", "recipe_names", "recipe_path", "describe", "list_recipes", "copy_recipe",
           "load_recipe", "write_config", "run_recipe", "main"]


def recipe_dir() -> Path:
    """The folder of the installed recipes (``stepkit.recipes``).

    Examples:
        >>> (recipe_dir() / "dino.py").is_file()
        True
    """
    import stepkit.recipes

    return Path(stepkit.recipes.__file__).parent


def recipe_names() -> list[str]:
    """The installed recipes' names.

    Examples:
        >>> "ijepa" in recipe_names()
        True
    """
    return sorted(p.stem for p in recipe_dir().glob("*.py") if not p.name.startswith("_"))


def recipe_path(name: str) -> Path:
    """The installed recipe ``name`` (``dino`` or ``dino.py``); an unknown name: a ValueError listing them.

    Examples:
        >>> recipe_path("dino.py").name
        'dino.py'
    """
    stem = name.removesuffix(".py")
    path = recipe_dir() / f"{stem}.py"
    if stem.startswith("_") or not path.is_file():
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())}")
    return path


def describe(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """A recipe's first docstring line and its presets ``(name, description)``, read without importing it.

    Examples:
        >>> summary, presets = describe(recipe_path("jepa_sequences"))
        >>> "timeseries" in [name for name, _ in presets]
        True
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    presets: list[tuple[str, str]] = []
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        named = any(getattr(t, "id", None) == "PRESETS" for t in node.targets)
        if not named or not isinstance(node.value, ast.Dict):
            continue
        for key, value in zip(node.value.keys, node.value.values):
            first = value.elts[0] if isinstance(value, ast.Tuple) and value.elts else None
            if isinstance(key, ast.Constant):
                presets.append((str(key.value), str(first.value) if isinstance(first, ast.Constant) else ""))
    return (doc[0] if doc else ""), presets


def list_recipes() -> str:
    """What ``stepkit ls`` prints: each recipe with its first docstring line, then its presets.

    Examples:
        >>> print(list_recipes())  # doctest: +ELLIPSIS
        autoencoder: ...
    """
    lines = []
    for name in recipe_names():
        summary, presets = describe(recipe_dir() / f"{name}.py")
        lines.append(f"{name}: {summary}")
        width = max((len(p) for p, _ in presets), default=0)
        lines += [f"    {p.ljust(width)}  {text}" for p, text in presets]
    lines.append("copy one: stepkit cp NAME DEST; run one: stepkit run NAME [PRESET] [--flags]")
    return "\n".join(lines)


def copy_recipe(name: str, dest: str | Path, *, force: bool = False) -> Path:
    """Copy recipe ``name`` to ``dest`` (a file, or a folder to put ``<name>.py`` in); never over a file
    unless ``force``.

    Examples:
        >>> import tempfile, pathlib
        >>> copy_recipe("dino", pathlib.Path(tempfile.mkdtemp())).name
        'dino.py'
    """
    source = recipe_path(name)
    target = _destination(dest, source.name, force)
    if not target.parent.is_dir():
        raise ValueError(f"{target.parent} is not a folder; create it first")
    shutil.copyfile(source, target)
    return target


def _destination(dest: str | Path, name: str, force: bool) -> Path:
    """``dest``, or ``dest/name`` when it is a folder; an existing file only with ``force``."""
    target = Path(dest)
    if target.is_dir():
        target = target / name
    if target.exists() and not force:
        raise ValueError(f"{target} exists; pass --force to overwrite it")
    return target


def load_recipe(path: Path):
    """Import a recipe file as a module (``Config``, ``PRESETS``, ``main``, ...).

    Examples:
        >>> "timeseries" in load_recipe(recipe_path("jepa_sequences")).PRESETS
        True
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stepkit_recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


def write_config(name: str, dest: str | Path, *, preset: str | None = None, force: bool = False) -> Path:
    """A recipe's preset (default: its first) as a commented YAML file for ``--config``.

    Examples:
        >>> import tempfile, pathlib
        >>> path = write_config("jepa_sequences", pathlib.Path(tempfile.mkdtemp()) / "t.yaml", preset="text")
        >>> "kind: text" in path.read_text()
        True
    """
    from stepkit.config import config_yaml

    module = load_recipe(recipe_path(name))
    presets = getattr(module, "PRESETS", None) or {"default": ("", module.Config())}
    chosen = preset or next(iter(presets))
    if chosen not in presets:
        raise ValueError(f"unknown preset {chosen!r} of {name}; presets: {', '.join(presets)}")
    target = _destination(dest, f"{name}_{chosen}.yaml", force)
    header = (f"{name} recipe, preset {chosen}: {presets[chosen][0]}\n"
              f"run it: stepkit run {name} --config {target.name} --run-dir runs/{name} (later flags win)")
    target.write_text(config_yaml(presets[chosen][1], header), encoding="utf-8")
    return target


def run_recipe(path: Path, args: list[str]) -> None:
    """Run a recipe file as its own script (``__main__``), with ``args`` as its command line.

    ``sys.argv`` is the recipe's while it runs and restored after.

    Args:
        path: The recipe script.
        args: Its command line (preset, flags).

    Raises:
        SystemExit: with the recipe's exit code, when it exits.

    Examples:
        >>> import pathlib, tempfile
        >>> script = pathlib.Path(tempfile.mkdtemp()) / "hello.py"
        >>> _ = script.write_text("import sys; print('hello', sys.argv[1:], __name__)")
        >>> run_recipe(script, ["tiny", "--train.steps", "2"])
        hello ['tiny', '--train.steps', '2'] __main__
    """
    saved, sys.argv = sys.argv, [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved


def _export_command(args: argparse.Namespace) -> int:
    """``stepkit export``: list a run's parts, or write one; errors in one line, exit 2."""
    from stepkit.checkpoint import CheckpointError
    from stepkit.weights import checkpoint_parts, export, find_checkpoint

    try:
        if not args.part:
            path = find_checkpoint(args.run, args.checkpoint)
            parts = checkpoint_parts(path)
            print(f"{path} holds these parts (stepkit export {args.run} --part NAME --out PATH):")
            for name, part in parts.items():
                print(f"  {name}: {part.get('about', '')} ({part['arch']['class']})")
            return 0
        if not args.out:
            raise ValueError("--out is required: the file (safetensors) or folder to write")
        written = export(args.run, args.part, args.out, format=args.format, checkpoint=args.checkpoint,
                         force=args.force)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} ({args.format}, part {args.part}); load it with "
          f"stepkit.weights.load_exported({str(written)!r})" if args.format in ("safetensors", "timm")
          else f"wrote {written} ({args.format}, part {args.part})")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    """``stepkit eval``: probe one checkpoint or every one; a result file each; errors in one line."""
    from stepkit import dist
    from stepkit.checkpoint import CheckpointError
    from stepkit.probe import checkpoints_of, evaluate_checkpoint, result_path, write_result
    from stepkit.weights import checkpoint_parts, find_checkpoint

    dist.init_from_env("cuda" if args.device == "cuda" else "cpu")  # torchrun: batches dealt out to ranks
    try:
        targets = checkpoints_of(args.run) if args.all else [find_checkpoint(args.run, args.checkpoint)]
        probed = [name for name, p in checkpoint_parts(targets[-1]).items() if p.get("probe")]
        part = args.part or (probed[0] if probed else "")
        if not part:
            raise ValueError(f"{targets[-1]}: no part records a probe; name one with --part")
        rows = []
        for path in targets:
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            drawn = result_path(run_dir, path, "_map.png") if args.plot and dist.is_main() else None
            result = evaluate_checkpoint(path, part, train_root=args.train_root, val_root=args.val_root,
                                         knn=not args.no_knn, linear=args.linear, batch_size=args.batch_size,
                                         device=args.device, map_to=drawn, attentive=args.attentive)
            if dist.is_main():
                result["file"] = str(write_result(run_dir, result))
            rows.append(result)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        main_process = dist.is_main()
        dist.shutdown()
    if not main_process:
        return 0
    headline = ("recall_at_1_", "mrr_at_10_", "ndcg_at_10_")  # a two-tower run's, each way, full width
    keys = [k for k in rows[0] if k.endswith("_acc") or k.startswith(headline) and k.count("_") == 3
            or k in ("voxel_corr", "voxel_corr_median")]  # the autoencoder's test block
    print(f"{'checkpoint':24} {'step':>8} " + " ".join(f"{k:>12}" for k in keys))
    for row in rows:
        print(f"{Path(row['checkpoint']).name:24} {row['step']:>8} "
              + " ".join(f"{row.get(k, float('nan')):{max(12, len(k))}.4f}" for k in keys))
    maps = ", maps beside them (*_map.png)" if args.plot else ""
    print(f"results in {Path(rows[-1]['file']).parent}{maps}")
    return 0


def _mine_command(args: argparse.Namespace) -> int:
    """``stepkit mine``: hard negatives for a two-tower run's pairs; errors in one line, nothing written on
    one."""
    from stepkit.checkpoint import CheckpointError
    from stepkit.mine import mine_run

    try:
        if Path(args.out).exists() and not args.force:
            raise ValueError(f"--out={args.out!r} exists: pass --force to replace it")
        done = mine_run(args.run, args.pairs, args.out, negatives=args.negatives,
                        rank_range=tuple(args.range), margin=args.margin, checkpoint=args.checkpoint,
                        anchor_column=args.anchor_column, positive_column=args.positive_column,
                        image_column=args.image_column, text_column=args.text_column, device=args.device)
    except (ValueError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = {"text-text": {"kind": "text-text", "anchor-column": args.anchor_column,
                           "positive-column": args.positive_column},
             "image-text": {"image-column": args.image_column, "text-column": args.text_column}}[done["kind"]]
    defaults = {"anchor-column": "anchor", "positive-column": "positive", "image-column": "filepath",
                "text-column": "title"}
    said = "".join(f" --data.{k} {v}" for k, v in flags.items() if defaults.get(k) != v)
    columns = " ".join(f"negative_{j + 1}" for j in range(args.negatives))
    print(f"wrote {args.out}: {done['rows']} pairs with {args.negatives} hard negatives each"
          + (f" ({done['dropped']} left out: fewer candidates)" if done["dropped"] else "")
          + f"; train on them with --data.pairs {args.out}{said} --data.negative-columns {columns}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``stepkit ls | cp | run`` (also ``python -m stepkit``); returns the exit code.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Examples:
        >>> main(["ls"])  # doctest: +ELLIPSIS
        autoencoder: ...
        0
    """
    parser = argparse.ArgumentParser(prog="stepkit", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:6]))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list the recipes and their presets")
    cp = commands.add_parser("cp", help="copy a recipe out to edit it")
    cp.add_argument("recipe")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cp.add_argument("--config", action="store_true",
                    help="write the recipe's preset as a commented YAML file for --config instead")
    cp.add_argument("--preset", help="with --config: which preset (default: the recipe's first)")
    run = commands.add_parser("run", help="run a recipe: stepkit run NAME [PRESET] [--flags]", add_help=False)
    run.add_argument("recipe")
    run.add_argument("args", nargs=argparse.REMAINDER)
    export = commands.add_parser("export", help="a part of a run as plain weights (safetensors, timm, hf, "
                                                "sentence-transformers); without --part: list the parts")
    export.add_argument("run", help="a run directory, a checkpoint .pt file or a .dcp folder")
    export.add_argument("--part", help="which part (listed when omitted)")
    export.add_argument("--out", help="the file (safetensors) or folder (timm, hf, sentence-transformers)")
    export.add_argument("--format", default="safetensors",
                        help="safetensors (default), timm, hf or sentence-transformers")
    export.add_argument("--checkpoint", default="last", help="last (default), best or step_N")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    probe = commands.add_parser("eval", help="the probes of a run's checkpoint (or --all of them), "
                                             "on its own labelled data or --train-root/--val-root")
    probe.add_argument("run", help="a run directory (or a checkpoint file)")
    probe.add_argument("--checkpoint", default="last", help="last (default), best or step_N")
    probe.add_argument("--all", action="store_true", help="every checkpoint the run keeps, as a table")
    probe.add_argument("--part", default="", help="the part to probe (default: the one the recipe evaluates)")
    probe.add_argument("--train-root", help="labelled images (one folder per class) the probes fit on")
    probe.add_argument("--val-root", help="held-out labelled images, the same classes")
    probe.add_argument("--no-knn", action="store_true", help="skip the k-NN probe")
    probe.add_argument("--linear", action="store_true", default=None, help="add the linear probe")
    probe.add_argument("--batch-size", type=int, help="images per forward (default: the run's)")
    probe.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    probe.add_argument("--attentive", action="store_true",
                       help="add an attentive probe on the last layer's tokens (I-JEPA, jepa_sequences)")
    probe.add_argument("--plot", action="store_true",
                       help="also a 2-D map (PCA; UMAP with umap-learn) of the held-out embeddings: "
                            "RUN/eval/NAME_map.png")
    mine = commands.add_parser("mine", help="hard negatives for a pairs file, mined with a contrastive run's "
                                            "towers (sentence-transformers' mine_hard_negatives)")
    mine.add_argument("run", help="a run of the contrastive recipe (text-text, or image-text on your images)")
    mine.add_argument("--pairs", required=True, help="the pairs file (.jsonl, .csv, .tsv, .parquet): text "
                                                     "pairs for a text-text run, images, captions otherwise")
    mine.add_argument("--out", required=True,
                      help="the pairs with negative_1 ... columns (.jsonl, .csv, .tsv)")
    mine.add_argument("--negatives", type=int, default=3, help="negatives a pair (default 3)")
    mine.add_argument("--range", type=int, nargs=2, default=(0, 50), metavar=("MIN", "MAX"),
                      help="candidate ranks picked from, positives not counted (default 0 50)")
    mine.add_argument("--margin", type=float, default=None,
                      help="a negative is at most the positive's similarity minus this (default: no test)")
    mine.add_argument("--anchor-column", default="anchor")
    mine.add_argument("--positive-column", default="positive")
    mine.add_argument("--image-column", default="filepath", help="an image-text run's image paths (default "
                                                                   "filepath)")
    mine.add_argument("--text-column", default="title", help="an image-text run's captions (default title)")
    mine.add_argument("--checkpoint", default="last", help="last (default), best or step_N")
    mine.add_argument("--force", action="store_true", help="replace --out if it exists")
    mine.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    plot = commands.add_parser("plot",
                               help="a run's curves as one PNG and one HTML page, and a PNG a metric")
    plot.add_argument("run", help="a run directory holding metrics.jsonl")
    plot.add_argument("--out", help="where to write (default RUN/plots)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "plot":
        from stepkit.plot import main as plot_main

        try:
            plot_main([args.run, *(["--out", args.out] if args.out else [])])
        except SystemExit as err:  # its one line
            print(err, file=sys.stderr)
            return 2
        return 0
    if args.command == "mine":
        return _mine_command(args)
    if args.command == "export":
        return _export_command(args)
    if args.command == "eval":
        return _eval_command(args)
    try:
        if args.command == "ls":
            print(list_recipes())
        elif args.command == "cp" and args.config:
            target = write_config(args.recipe, args.dest, preset=args.preset, force=args.force)
            print(f"wrote {target}; run it with: stepkit run {args.recipe} --config {target}")
        elif args.command == "cp":
            target = copy_recipe(args.recipe, args.dest, force=args.force)
            print(f"copied {args.recipe} to {target}; run it with: python {target} --help")
        else:
            path = recipe_path(args.recipe)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "run":
        run_recipe(path, args.args)  # the recipe prints its own errors (run_main) and exits with its code
    return 0


if __name__ == "__main__":
    sys.exit(main())

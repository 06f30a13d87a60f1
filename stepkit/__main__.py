"""``stepkit``: list the recipes that ship with the package, copy one out to edit, or run one.

    stepkit ls                              # every recipe, its presets, one line each
    stepkit cp dino ./my_dino.py            # a copy to edit (refuses to overwrite without --force)
    stepkit cp --config dino ./dino.yaml    # its preset as a commented YAML file for --config
    stepkit run dino [PRESET] [--flags]     # the shipped recipe, as python recipes/dino.py would run
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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
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

"""Grid and random search over any recipe's flags, each trial in its own run directory.

    python -m stepkit.sweep recipes/dino.py --grid optim.lr=1e-4,5e-4 --random train.seed=0:100 \\
        --trials 8 --metric knn_acc --mode max --sweep-dir runs/sweep -- --train.steps 300

``--grid KEY=V1,V2,...`` lists values; ``--random KEY=LOW:HIGH`` draws
uniformly (integers when both ends are integers, ``HIGH`` excluded), and
``KEY=log:LOW:HIGH`` log-uniformly. Keys are the recipe's flags without the
dashes (``optim.lr``, ``optim.warmup_steps``). RECIPE is a path or a recipe's
name (``dino``: ``recipes/dino.py`` of this checkout). Trial ``i`` takes grid point
``i mod G`` (G = number of grid points) and fresh random draws; ``--trials``
defaults to G. Each trial runs ``python RECIPE [PRESET] --run-dir
SWEEP_DIR/trial_NNN --key value ... [args after --]``; its summary.json
gives the metric. The table, sorted best first, is printed and written to
``SWEEP_DIR/results.json``. ``--wandb-config FILE`` writes the same search
as a wandb sweep configuration instead of running it; its command runs
``python -m stepkit.sweep trial RECIPE SWEEP_DIR ...``, which gives each
wandb trial its own run directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EXIT_DIVERGED = 65  # stepkit.faults.EXIT_DIVERGED, without importing torch into the launcher

__all__ = ["RandomSpec", "parse_grid", "parse_random", "plan_trials", "flags", "flag_name", "recipe_path",
           "run_trial", "sweep", "print_table", "wandb_config", "trial_main", "main"]


@dataclass
class RandomSpec:
    """A random search dimension: ``low..high`` drawn as an integer, uniformly, or log-uniformly.

    Examples:
        >>> import random
        >>> 1 <= RandomSpec(1, 4, "int").draw(random.Random(0)) <= 4
        True
    """
    low: float
    high: float
    kind: str  # "int", "uniform" or "log"

    def draw(self, rng: random.Random) -> float | int:
        if self.kind == "int":
            return rng.randrange(int(self.low), int(self.high))
        if self.kind == "log":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def wandb(self) -> dict[str, Any]:
        if self.kind == "int":
            return {"distribution": "int_uniform", "min": int(self.low), "max": int(self.high) - 1}
        if self.kind == "log":
            return {"distribution": "log_uniform_values", "min": self.low, "max": self.high}
        return {"distribution": "uniform", "min": self.low, "max": self.high}


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2`` -> ``(KEY, [V1, V2])``.

    Examples:
        >>> parse_grid("optim.lr=1e-3,3e-3")
        ('optim.lr', ['1e-3', '3e-3'])
    """
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"--grid {spec!r} is not allowed: expected KEY=V1,V2,...")
    return key, values.split(",")


def parse_random(spec: str) -> tuple[str, RandomSpec]:
    """``KEY=LOW:HIGH`` (integers or floats) or ``KEY=log:LOW:HIGH``.

    Examples:
        >>> key, spec = parse_random("optim.lr=log:1e-4:1e-2")
        >>> key, spec.kind
        ('optim.lr', 'log')
    """
    key, sep, rest = spec.partition("=")
    parts = rest.split(":")
    log = parts[0] == "log"
    parts = parts[1:] if log else parts
    try:
        if not sep or not key or len(parts) != 2:
            raise ValueError
        low, high = (float(p) for p in parts)
    except ValueError:
        expected = "KEY=LOW:HIGH or KEY=log:LOW:HIGH"
        raise ValueError(f"--random {spec!r} is not allowed: expected {expected}") from None
    if not low < high or (log and low <= 0):
        raise ValueError(f"--random {spec!r} is not allowed: expected LOW < HIGH (and LOW > 0 for log)")
    is_int = not log and all(p.lstrip("-").isdigit() for p in parts)
    return key, RandomSpec(low, high, "log" if log else "int" if is_int else "uniform")


def plan_trials(
    grid: dict[str, list[str]], randoms: dict[str, RandomSpec], trials: int | None, seed: int = 0
) -> list[dict[str, Any]]:
    """Each trial's parameters: grid point ``i mod G`` plus this trial's random draws.

    Examples:
        >>> plan_trials({"optim.lr": ["1", "2"]}, {}, trials=None)
        [{'optim.lr': '1'}, {'optim.lr': '2'}]
    """
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] or [{}]
    count = len(points) if trials is None else trials
    if count < 1:
        raise ValueError(f"--trials {count} is not allowed: expected at least 1")
    rng = random.Random(seed)
    return [{**points[i % len(points)], **{k: s.draw(rng) for k, s in randoms.items()}} for i in range(count)]


def flags(params: dict[str, Any]) -> list[str]:
    """``{"optim.lr": 1e-3}`` -> ``["--optim.lr", "0.001"]`` (tyro's dashes for underscores).

    Examples:
        >>> flags({"optim.warmup_steps": 10})
        ['--optim.warmup-steps', '10']
    """
    out = []
    for key, value in params.items():
        out += [flag_name(key), str(value)]
    return out


def flag_name(key: str) -> str:
    """``optim.warmup_steps`` -> ``--optim.warmup-steps``: tyro spells flags with dashes.

    Examples:
        >>> flag_name("optim.warmup_steps")
        '--optim.warmup-steps'
    """
    return "--" + key.replace("_", "-")


def recipe_path(recipe: str | Path) -> Path:
    """A recipe script from its path, or from its name (``dino`` -> the installed ``stepkit.recipes``'
    ``dino.py``, the repository's ``recipes/dino.py`` in a checkout).

    Examples:
        >>> recipe_path("dino").name
        'dino.py'
    """
    from stepkit.__main__ import recipe_dir, recipe_names

    path = Path(recipe)
    if path.is_file():
        return path
    named = recipe_dir() / f"{recipe}.py"
    if path.suffix != ".py" and named.is_file():
        return named
    names = recipe_names()
    raise ValueError(f"recipe={str(recipe)!r} is not allowed: no such file"
                     + (f"; recipe names: {', '.join(names)}" if names else ""))


def run_trial(recipe: Path, run_dir: Path, preset: list[str], args: list[str], log: Path) -> int:
    """Run one trial: the recipe in a subprocess with its flags, output to ``log``; return its exit code.

    The command is ``python RECIPE [PRESET] --run-dir RUN_DIR ARGS...``; it
    is the log's first line.

    Args:
        recipe: The recipe script.
        run_dir: The trial's run directory (passed as ``--run-dir``).
        preset: ``[]`` or ``[preset_name]``.
        args: The trial's flags, then any others.
        log: The file that takes the trial's stdout and stderr.

    Returns:
        The subprocess's exit code.

    Examples:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> recipe = folder / "echo.py"
        >>> _ = recipe.write_text("import sys; print(sys.argv[3:])")
        >>> run_trial(recipe, folder / "run", [], ["--optim.lr", "0.1"], folder / "trial.log")
        0
        >>> (folder / "trial.log").read_text().splitlines()[1]
        "['--optim.lr', '0.1']"
    """
    command = [sys.executable, str(recipe), *preset, "--run-dir", str(run_dir), *args]
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode


def sweep(
    recipe: Path,
    sweep_dir: Path,
    trials: list[dict[str, Any]],
    *,
    metric: str,
    mode: str,
    preset: str | None = None,
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run every trial in turn; return the results sorted best first (failed ones last).

    Trial ``i`` runs in ``sweep_dir/trial_<i>`` (``run_trial``); its
    ``summary.json`` gives ``metric``. The ranked results are also written
    to ``sweep_dir/results.json``.

    Args:
        recipe: The recipe script.
        sweep_dir: Where the trials' run directories and logs go.
        trials: Each trial's ``{key: value}`` (``plan_trials``).
        metric: The ``summary.json`` key that ranks the trials.
        mode: ``"min"`` or ``"max"``: which end of ``metric`` is best.
        preset: The recipe's preset every trial starts from.
        extra: Flags every trial gets after its own.

    Returns:
        ``[{"trial", "params", metric, "returncode", "status", "wall_s", "run_dir"}, ...]``, best first.

    Raises:
        ValueError: for a missing recipe, an unknown mode, or a trial folder that already exists.

    Examples:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> recipe = folder / "toy.py"  # a stand-in recipe: its loss is smallest at lr 0.3
        >>> _ = recipe.write_text(
        ...     "import json, pathlib, sys\\n"
        ...     "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\\n"
        ...     "run = pathlib.Path(args['--run-dir']); run.mkdir()\\n"
        ...     "loss = (float(args['--optim.lr']) - 0.3) ** 2\\n"
        ...     "(run / 'summary.json').write_text(json.dumps({'loss': loss}))\\n")
        >>> ranked = sweep(recipe, folder / "sweep", [{"optim.lr": 0.1}, {"optim.lr": 0.3}],
        ...                metric="loss", mode="min")  # doctest: +ELLIPSIS
        trial 0: {'optim.lr': 0.1} -> loss=0.0399... (ok)
        trial 1: {'optim.lr': 0.3} -> loss=0.0 (ok)
        >>> [r["params"] for r in ranked]
        [{'optim.lr': 0.3}, {'optim.lr': 0.1}]
    """
    if not recipe.is_file():
        raise ValueError(f"recipe={str(recipe)!r} is not allowed: no such file")
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not allowed: expected 'max' or 'min'")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for i, params in enumerate(trials):
        run_dir = sweep_dir / f"trial_{i:03d}"
        if run_dir.exists():
            raise ValueError(f"{run_dir} already exists: choose another --sweep-dir, nothing was overwritten")
        started = time.perf_counter()
        code = run_trial(recipe, run_dir, [preset] if preset else [], [*flags(params), *extra],
                         sweep_dir / f"trial_{i:03d}.log")
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        value = summary.get(metric)
        results.append({
            "trial": i, "params": params, metric: value, "returncode": code,
            "status": "diverged" if code == _EXIT_DIVERGED else "failed" if code != 0
                      else "ok" if value is not None else f"no {metric} in summary",
            "wall_s": round(time.perf_counter() - started, 1), "run_dir": str(run_dir),
        })
        print(f"trial {i}: {params} -> {metric}={value} ({results[-1]['status']})", flush=True)
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(results, key=lambda r: (r["status"] != "ok", sign * float(r[metric] or 0)))
    (sweep_dir / "results.json").write_text(json.dumps(
        {"recipe": str(recipe), "metric": metric, "mode": mode, "results": ranked}, indent=2) + "\n")
    return ranked


def print_table(results: list[dict[str, Any]], metric: str) -> None:
    """Print the results, best first, as a table (rich).

    Args:
        results: What ``sweep`` returned.
        metric: The column to show.

    Examples:
        >>> print_table([{"trial": 1, "params": {"optim.lr": 0.3}, "loss": 0.0, "status": "ok",
        ...               "wall_s": 1.5}], "loss")  # doctest: +ELLIPSIS
        sweep results, best loss first
        ...
        │ 1    │ 1     │ optim.lr=0.3 │ 0    │ ok     │ 1.5    │
        ...
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep results, best {metric} first")
    for column in ("rank", "trial", "params", metric, "status", "wall s"):
        table.add_column(column)
    for rank, r in enumerate(results, 1):
        value = r[metric]
        table.add_row(str(rank), str(r["trial"]), " ".join(f"{k}={v}" for k, v in r["params"].items()),
                      "-" if value is None else f"{value:.4g}", r["status"], str(r["wall_s"]))
    Console(width=140).print(table)


def wandb_config(
    recipe: Path, sweep_dir: Path, grid: dict[str, list[str]], randoms: dict[str, RandomSpec], *,
    metric: str, mode: str, preset: str | None, extra: list[str],
) -> dict[str, Any]:
    """The same search as a wandb sweep configuration (grid alone: method grid; else random).

    Examples:
        >>> config = wandb_config(Path("recipes/dino.py"), Path("sweeps/s"), {"optim.lr": ["1e-3"]}, {},
        ...                       metric="knn_acc", mode="max", preset=None, extra=[])
        >>> config["method"], config["metric"]
        ('grid', {'name': 'knn_acc', 'goal': 'maximize'})
    """
    parameters: dict[str, Any] = {k: {"values": [_number(v) for v in vs]} for k, vs in grid.items()}
    parameters.update({k: s.wandb() for k, s in randoms.items()})
    return {
        "program": str(recipe),
        "method": "random" if randoms else "grid",
        "metric": {"name": metric, "goal": "maximize" if mode == "max" else "minimize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "-m", "stepkit.sweep", "trial", "${program}", str(sweep_dir),
                    *([preset] if preset else []), *extra, "${args}"],
    }


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def trial_main(argv: list[str]) -> int:
    """``trial RECIPE SWEEP_DIR [recipe args]``: one trial in a new run directory (for wandb agents).

    A wandb agent passes ``--key=value`` with the config's underscores;
    the name gets tyro's dashes (``--optim.warmup-steps=10``). The run
    directory is ``SWEEP_DIR/trial_<time>_<random>``.

    Args:
        argv: ``[RECIPE, SWEEP_DIR, (PRESET), flags...]``.

    Returns:
        The recipe's exit code.

    Raises:
        SystemExit: with the usage line, for fewer than two arguments.

    Examples:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> recipe = folder / "makes_its_run_dir.py"  # a stand-in recipe
        >>> _ = recipe.write_text("import pathlib, sys\\n"
        ...                       "pathlib.Path(sys.argv[sys.argv.index('--run-dir') + 1]).mkdir()\\n")
        >>> trial_main([str(recipe), str(folder / "wandb"), "--optim.warmup_steps=3"])
        0
        >>> [p.name.startswith("trial_") for p in (folder / "wandb").iterdir()]
        [True]
    """
    if len(argv) < 2:
        raise SystemExit("usage: python -m stepkit.sweep trial RECIPE SWEEP_DIR [recipe args...]")
    recipe, sweep_dir, args = recipe_path(argv[0]), Path(argv[1]), argv[2:]
    preset = [args.pop(0)] if args and not args[0].startswith("-") else []
    # wandb passes --key=value; tyro wants dashes in the flag names
    args = [_dashes(a) for a in args]
    run_dir = sweep_dir / f"trial_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(recipe), *preset, "--run-dir", str(run_dir), *args]
    return subprocess.run(command).returncode


def _dashes(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return flag_name(name) + sep + value


def main(argv: list[str] | None = None) -> None:
    """``python -m stepkit.sweep``: a grid or random search over a recipe's flags (``--help`` lists them).

    Args:
        argv: The arguments (default ``sys.argv[1:]``); ``trial ...`` runs one trial (``trial_main``).

    Raises:
        SystemExit: with one line (``error: ...``) for a bad search, recipe or sweep folder.

    Examples:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sweep.json"  # a wandb sweep instead of running one
        >>> main(["dino", "--grid", "optim.lr=1e-3,3e-3", "--wandb-config", str(path)])  # doctest: +ELLIPSIS
        wrote .../sweep.json; start it with: wandb sweep .../sweep.json
        >>> json.loads(path.read_text())["parameters"]
        {'optim.lr': {'values': [0.001, 0.003]}}
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "trial":
        raise SystemExit(trial_main(argv[1:]))
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m stepkit.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("recipe", help="the recipe: a script (recipes/dino.py) or a name (dino)")
    parser.add_argument("--preset", default=None, help="the recipe's preset to start from")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values to try")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=LOW:HIGH",
                        help="a range to draw from (log:LOW:HIGH for log-uniform)")
    parser.add_argument("--trials", type=int, default=None, help="number of trials (default: grid size)")
    parser.add_argument("--metric", default="loss", help="summary.json key that ranks trials")
    parser.add_argument("--mode", choices=("max", "min"), default="min")
    parser.add_argument("--sweep-dir", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    parser.add_argument("--wandb-config", type=Path, default=None,
                        help="write a wandb sweep configuration (JSON) here instead of running")
    args = parser.parse_args(argv)
    try:
        args.recipe = recipe_path(args.recipe)
        grid = dict(parse_grid(g) for g in args.grid)
        randoms = dict(parse_random(r) for r in args.random)
        if not grid and not randoms:
            raise ValueError("nothing to search: give at least one --grid or --random")
        if args.wandb_config is not None:
            config = wandb_config(args.recipe, args.sweep_dir, grid, randoms, metric=args.metric,
                                  mode=args.mode, preset=args.preset, extra=extra)
            args.wandb_config.write_text(json.dumps(config, indent=2) + "\n")
            print(f"wrote {args.wandb_config}; start it with: wandb sweep {args.wandb_config}")
            return
        trials = plan_trials(grid, randoms, args.trials, args.seed)
        results = sweep(args.recipe, args.sweep_dir, trials, metric=args.metric, mode=args.mode,
                        preset=args.preset, extra=extra)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print_table(results, args.metric)
    print(f"results in {args.sweep_dir / 'results.json'}")


if __name__ == "__main__":
    main()

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stepkit.sweep import flags, parse_grid, parse_random, plan_trials, wandb_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train.steps",
    "3",
    "--optim.warmup-steps",
    "1",
    "--batch-size",
    "8",
    "--crops.local-crops",
    "1",
    "--model.out-dim",
    "16",
    "--model.head-hidden",
    "16",
    "--log.no-console",
]


@pytest.mark.slow
def test_grid_sweep_on_the_tiny_dino_preset_writes_its_runs_and_a_sorted_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepkit.sweep",
            str(ROOT / "recipes" / "dino.py"),
            "--preset",
            "tiny-cpu",
            "--grid",
            "optim.lr=1e-3,3e-3",
            "--grid",
            "train.seed=0,1",
            "--trials",  # the first two of the four grid points: (1e-3, 0), (1e-3, 1)
            "2",
            "--metric",
            "knn_acc",
            "--mode",
            "max",
            "--sweep-dir",
            str(tmp_path / "sweep"),
            "--",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert runs == ["trial_000", "trial_001"]
    assert all((tmp_path / "sweep" / r / "summary.json").exists() for r in runs)
    table = json.loads((tmp_path / "sweep" / "results.json").read_text())["results"]
    values = [r["knn_acc"] for r in table]
    assert values == sorted(values, reverse=True) and all(r["status"] == "ok" for r in table)
    points = {(r["params"]["optim.lr"], r["params"]["train.seed"]) for r in table}
    assert points == {("1e-3", "0"), ("1e-3", "1")}
    config = json.loads((tmp_path / "sweep" / "trial_001" / "config.json").read_text())
    assert config["optim"]["lr"] == 1e-3 and config["train"]["seed"] == 1 and config["train"]["steps"] == 3
    assert "best knn_acc first" in result.stdout


def test_grid_and_random_specs():
    assert parse_grid("optim.lr=1e-4,5e-4") == ("optim.lr", ["1e-4", "5e-4"])
    key, seed = parse_random("train.seed=0:100")
    assert key == "train.seed" and seed.kind == "int"
    assert parse_random("optim.lr=log:1e-5:1e-2")[1].kind == "log"
    assert parse_random("loss.koleo_weight=0.0:0.5")[1].kind == "uniform"
    for bad in ("optim.lr", "optim.lr=1:2:3", "optim.lr=2:1", "optim.lr=log:0:1"):
        with pytest.raises(ValueError, match="is not allowed"):
            parse_grid(bad) if ":" not in bad and "=" not in bad else parse_random(bad)


def test_plan_cycles_the_grid_and_draws_randoms_reproducibly():
    grid = {"optim.lr": ["1", "2"]}
    randoms = dict([parse_random("train.seed=0:100"), parse_random("optim.wd=log:1e-4:1e-1")])
    plan = plan_trials(grid, randoms, trials=5, seed=3)
    assert [p["optim.lr"] for p in plan] == ["1", "2", "1", "2", "1"]
    assert all(0 <= p["train.seed"] < 100 and 1e-4 <= p["optim.wd"] <= 1e-1 for p in plan)
    assert plan == plan_trials(grid, randoms, trials=5, seed=3)
    assert len(plan_trials({"a": ["1", "2"], "b": ["x", "y", "z"]}, {}, None)) == 6
    rng = random.Random(0)
    assert all(0 <= randoms["train.seed"].draw(rng) < 100 for _ in range(200))


def test_flags_use_tyros_dashes():
    assert flags({"optim.warmup_steps": 5, "optim.lr": 0.001}) == [
        "--optim.warmup-steps",
        "5",
        "--optim.lr",
        "0.001",
    ]


def test_wandb_sweep_configuration():
    config = wandb_config(
        Path("recipes/dino.py"),
        Path("runs/sweep"),
        {"optim.lr": ["1e-4", "5e-4"]},
        dict([parse_random("train.seed=0:100")]),
        metric="knn_acc",
        mode="max",
        preset="tiny-cpu",
        extra=["--train.steps", "300"],
    )
    assert config["method"] == "random" and config["metric"] == {"name": "knn_acc", "goal": "maximize"}
    assert config["parameters"] == {
        "optim.lr": {"values": [1e-4, 5e-4]},
        "train.seed": {"distribution": "int_uniform", "min": 0, "max": 99},
    }
    assert config["command"][-1] == "${args}" and "trial" in config["command"]


@pytest.mark.slow
def test_the_trial_entry_gives_each_wandb_trial_its_own_run_dir(tmp_path):
    # a stand-in recipe for the second trial (the suite's time): it writes its run directory
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text("import pathlib, sys\n"
                        "run = pathlib.Path(sys.argv[sys.argv.index('--run-dir') + 1]); run.mkdir()\n"
                        "(run / 'summary.json').write_text('{}')\n")
    for recipe in (ROOT / "recipes" / "dino.py", stand_in):
        result = subprocess.run(
            [sys.executable, "-m", "stepkit.sweep", "trial", str(recipe), str(tmp_path / "sweep"), *TINY,
             "--optim.lr=0.002"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "sweep").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)
    dino = next(r for r in runs if (r / "config.json").exists())
    assert json.loads((dino / "config.json").read_text())["optim"]["lr"] == 0.002


@pytest.mark.slow
def test_sweep_cli_errors(tmp_path):
    def run(*args):
        command = [sys.executable, "-m", "stepkit.sweep", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)

    result = run(str(ROOT / "recipes" / "dino.py"), "--sweep-dir", str(tmp_path / "s"))
    assert result.returncode != 0 and "nothing to search" in result.stderr
    result = run("recipes/none.py", "--grid", "optim.lr=1", "--sweep-dir", str(tmp_path / "s"))
    assert result.returncode != 0 and "recipe='recipes/none.py' is not allowed: no such file" in result.stderr


def test_a_recipe_is_found_by_its_name():
    from stepkit.sweep import recipe_path

    assert recipe_path("dino") == ROOT / "recipes" / "dino.py"
    assert recipe_path(ROOT / "recipes" / "ijepa.py") == ROOT / "recipes" / "ijepa.py"
    with pytest.raises(ValueError, match=r"recipe='dinoo' is not allowed: no such file; recipe names: .*"):
        recipe_path("dinoo")

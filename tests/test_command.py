"""The ``stepkit`` command: ls, cp, run; and the recipes as an installed (not editable) package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepkit.__main__ import describe, main, recipe_dir

ROOT = Path(__file__).resolve().parents[1]


def test_ls_lists_every_recipe_with_its_presets(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("autoencoder", "contrastive", "dino", "ijepa", "jepa_sequences"):
        assert f"\n{name}: " in f"\n{out}"
    assert "    hjepa " in out and "    vit-h14 " in out and "    tiny " in out and "    text " in out
    summary, presets = describe(recipe_dir() / "dino.py")
    assert summary.startswith("DINO: ") and [p for p, _ in presets] == ["tiny-cpu", "vit-s16"]


def test_cp_copies_and_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "my_dino.py"
    assert main(["cp", "dino", str(target)]) == 0
    assert target.read_bytes() == (ROOT / "recipes" / "dino.py").read_bytes()
    target.write_text("# my edits")
    assert main(["cp", "dino", str(target)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and target.read_text() == "# my edits"
    assert main(["cp", "dino", str(target), "--force"]) == 0 and target.stat().st_size > 1000
    assert main(["cp", "ijepa", str(tmp_path)]) == 0 and (tmp_path / "ijepa.py").is_file()  # into a folder
    assert main(["cp", "dnio", str(tmp_path / "x.py")]) == 2
    assert ("unknown recipe 'dnio'; recipes: autoencoder, contrastive, dino, dinov2, ijepa, jepa_sequences"
            in capsys.readouterr().err)


def test_the_installed_recipes_are_the_repositorys_files():
    assert recipe_dir().resolve() == (ROOT / "recipes").resolve()  # one source, no copies (editable install)


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """A regular (not editable) install of this checkout into a folder of its own."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    for name in ("pyproject.toml", "README.md"):  # a clean tree: no stale build/ from an earlier build
        shutil.copy(ROOT / name, source / name)
    for name in ("stepkit", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


@pytest.mark.slow
def test_a_new_user_copies_and_runs_recipes_from_an_empty_folder(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}

    def run(*args, timeout=300):
        out = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    shipped = sorted(p.name for p in (installed / "stepkit" / "recipes").glob("*.py"))
    assert shipped == sorted(p.name for p in (ROOT / "recipes").glob("*.py"))  # the repository's, no more
    where = run(sys.executable, "-c", "import stepkit.recipes; print(stepkit.recipes.__file__)")
    assert where.startswith(str(installed))  # the installed package, not this checkout
    assert "ijepa:" in run(str(installed / "bin" / "stepkit"), "ls")
    run(sys.executable, "-m", "stepkit", "cp", "dino", "my_dino.py")
    run(sys.executable, "my_dino.py", "--train.steps", "6", "--run-dir", "r", "--log.no-console",
        "--eval.no-knn")
    assert (work / "r" / "summary.json").is_file()
    run(sys.executable, "-m", "stepkit", "run", "contrastive", "tiny", "--train.steps", "6",
        "--optim.warmup-steps", "2", "--run-dir", "r2", "--log.no-console")
    assert (work / "r2" / "summary.json").is_file()
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "stepkit", "run", "dino",
        "--train.steps", "4", "--run-dir", "r3", "--log.no-console", "--eval.no-knn", "--batch-size", "16")
    assert '"ranks": 2' in (work / "r3" / "summary.json").read_text()


@pytest.mark.slow
def test_run_with_an_unknown_recipe_is_one_line():
    out = subprocess.run([sys.executable, "-m", "stepkit", "run", "dnio"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown recipe 'dnio'")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "preset"), [("dino", None), ("ijepa", "hjepa"), ("contrastive", "tiny")])
def test_cp_config_writes_a_commented_yaml_that_reads_back_to_the_preset(tmp_path, capsys, name, preset):
    from conftest import load_recipe

    target = tmp_path / "c.yaml"
    assert main(["cp", "--config", name, str(target), *(["--preset", preset] if preset else [])]) == 0
    text = target.read_text()
    assert text.startswith(f"# {name} recipe, preset ") and "  # " in text  # the fields' --help as comments
    recipe = load_recipe(name)
    parse = recipe.parse  # every recipe has one
    from_file = parse(["--config", str(target)])
    assert from_file == parse([preset] if preset else [])
    assert main(["cp", "--config", name, str(target)]) == 2 and "exists" in capsys.readouterr().err
    assert main(["cp", "--config", name, str(tmp_path / "d.yaml"), "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err

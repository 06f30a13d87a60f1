"""stepkit.rundir: what a run directory records (config, its changes, provenance) and the resume guard."""

import json
import os
import subprocess

import torch

from stepkit.config import TrainConfig
from stepkit.rundir import PROVENANCE_FILE, config_changes, record_provenance, start_run


def lines(run):
    return [json.loads(s) for s in (run / PROVENANCE_FILE).read_text().splitlines()]


def test_a_start_records_the_recipe_its_copy_the_version_and_the_threads(tmp_path):
    recipe = tmp_path / "mine.py"
    recipe.write_text("print('a loop')\n")
    run = tmp_path / "run"
    start_run(run, TrainConfig(steps=5), resume=False)
    line = record_provenance(run, recipe, resumed=False)
    import hashlib

    assert line["recipe"] == str(recipe.resolve())
    assert line["recipe_sha256"] == hashlib.sha256(b"print('a loop')\n").hexdigest()
    assert (run / "recipe.py").read_text() == "print('a loop')\n" and line["recipe_copy"] == "recipe.py"
    assert line["threads"] == torch.get_num_threads() and line["torch"] == torch.__version__
    assert line["stepkit"] and line["git"] is None  # tmp_path is in no repository
    assert lines(run) == [line]


def test_a_resume_under_an_edited_recipe_and_other_threads_says_so_and_keeps_both(tmp_path, capsys):
    recipe, run = tmp_path / "mine.py", tmp_path / "run"
    recipe.write_text("v = 1\n")
    start_run(run, TrainConfig(steps=5), resume=False)
    first = record_provenance(run, recipe, resumed=False)
    recipe.write_text("v = 2\n")
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        second = record_provenance(run, recipe, resumed=True)
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert f"torch threads {before} -> {before + 1} since the last start" in out
    assert f"--threads {before} to keep it exact" in out
    copy = f"recipe-{second['recipe_sha256'][:12]}.py"
    assert "the recipe differs from the last start's" in out and copy in out
    assert (run / "recipe.py").read_text() == "v = 1\n" and (run / copy).read_text() == "v = 2\n"
    assert [line["resumed"] for line in lines(run)] == [False, True] and first["recipe_copy"] == "recipe.py"


def test_a_resume_under_the_same_recipe_and_threads_prints_nothing(tmp_path, capsys):
    recipe, run = tmp_path / "mine.py", tmp_path / "run"
    recipe.write_text("v = 1\n")
    start_run(run, TrainConfig(steps=5), resume=False)
    record_provenance(run, recipe, resumed=False)
    capsys.readouterr()
    assert record_provenance(run, recipe, resumed=True)["recipe_copy"] == "recipe.py"
    assert capsys.readouterr().out == ""
    files = sorted(p.name for p in run.iterdir())
    assert files == ["checkpoints", "config.json", "provenance.jsonl", "recipe.py"]


def test_the_git_commit_of_the_recipes_repository_and_whether_it_was_edited(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (repo / "mine.py").write_text("v = 1\n")
    for args in (["init", "-q"], ["add", "mine.py"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    run = tmp_path / "run"
    start_run(run, TrainConfig(steps=5), resume=False)
    assert record_provenance(run, repo / "mine.py", resumed=False)["git"] == {"commit": commit,
                                                                                "recipe_edited": False}
    (repo / "mine.py").write_text("v = 2\n")
    assert record_provenance(run, repo / "mine.py", resumed=True)["git"]["recipe_edited"] is True


def test_a_relative_path_saved_by_an_older_stepkit_equals_its_absolute_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "photos")
    assert config_changes({"data.root": "photos"}, {"data.root": absolute}) == {}
    assert config_changes({"data.root": "photos"}, {"data.root": "/elsewhere/photos"}) == {
        "data.root": ("photos", "/elsewhere/photos")}

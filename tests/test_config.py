"""--config FILE: YAML or JSON fields after the preset and before the flags."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import load_recipe

from stepkit.cli import cli


@dataclass
class Opt:
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    clip: float | None = 1.0


@dataclass
class Cfg:
    steps: int = 10
    compile: bool = False
    root: Path | None = None
    opt: Opt = field(default_factory=Opt)


PRESETS = {"small": ("a small run", Cfg()), "long": ("a long run", Cfg(steps=1000))}


def test_yaml_fields_apply_after_the_preset_and_before_the_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("opt:\n  lr: 0.3\n  betas: [0.8, 0.95]\n  clip: null\ncompile: true\nroot: /data\n"
                    "opt.lr: 0.25  # a dotted key works too\n")
    cfg = cli(Cfg, PRESETS, ["long", "--config", str(path)])
    expected = Opt(lr=0.25, betas=(0.8, 0.95), clip=None)
    assert cfg == Cfg(steps=1000, compile=True, root=Path("/data"), opt=expected)
    cfg = cli(Cfg, PRESETS, ["long", f"--config={path}", "--opt.lr", "0.5", "--no-compile"])
    assert (cfg.opt.lr, cfg.compile, cfg.steps) == (0.5, False, 1000)  # the flags win
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert cli(Cfg, PRESETS, ["--config", str(empty)]) == Cfg()


def test_json_config_and_false_booleans(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 7, "compile": False, "opt": {"clip": 2.5}}))
    cfg = cli(Cfg, PRESETS, ["--config", str(path), "--compile"])
    assert cfg == Cfg(steps=7, compile=True, opt=Opt(clip=2.5))


@pytest.mark.parametrize(("text", "message"), [
    ("opt:\n  lrr: 0.1\n", r"unknown key 'opt.lrr'; did you mean 'opt.lr'\?"),
    ("stpes: 3\n", r"unknown key 'stpes'; did you mean 'steps'\?"),
    ("opt: [1, 2\n", r"not valid YAML"),
    ("- 1\n- 2\n", r"expected a mapping of fields"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        cli(Cfg, PRESETS, ["--config", str(path)])
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_missing_value(tmp_path):
    with pytest.raises(ValueError, match=r"--config .*nope.yaml: cannot read it"):
        cli(Cfg, PRESETS, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="--config needs a file"):
        cli(Cfg, PRESETS, ["--config"])


def test_a_wrong_type_is_refused_naming_the_flag(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("opt:\n  lr: fast\n")
    with pytest.raises(SystemExit):
        cli(Cfg, PRESETS, ["--config", str(path)])
    assert "--opt.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_a_runs_config_json_recreates_the_run(tmp_path):
    recipe = load_recipe("ijepa")
    flags = ["--device", "cpu", "--log.no-console", "--train.steps", "3", "--batch-size", "16",
             "--eval.no-linear", "--levels.depths", "4", "5", "--levels.weights", "0.5", "1",
             "--mask.targets", "3"]
    first = recipe.main(recipe.parse(["hjepa", "--run-dir", str(tmp_path / "a"), *flags]))
    again = recipe.main(recipe.parse(["--config", str(tmp_path / "a" / "config.json"),
                                      "--run-dir", str(tmp_path / "b")]))
    saved = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("a", "b")]
    assert saved[0].pop("run_dir") != saved[1].pop("run_dir")
    assert saved[0] == saved[1]  # every other field, from the file alone
    assert again["params_digest"] == first["params_digest"]

"""stepkit.cli: presets and flags parsed into a checked config, data paths absolute, errors in one line."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepkit.cli import cli


def test_cli_presets_pick_defaults_that_flags_override():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1.0
        steps: int = 10

    presets = {"small": ("a small run", Cfg()), "long": ("a long run", Cfg(steps=1000))}
    assert cli(Cfg, presets, []) == Cfg()
    assert cli(Cfg, presets, ["long", "--lr", "0.5"]) == Cfg(lr=0.5, steps=1000)
    assert presets["long"][1] == Cfg(steps=1000)  # the preset itself is untouched


def test_an_unknown_preset_is_named_with_the_list():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1.0

    presets = {"small": ("a small run", Cfg()), "long": ("a long run", Cfg(lr=2.0))}
    with pytest.raises(ValueError, match=r"unknown preset 'lnog'; presets: small, long"):
        cli(Cfg, presets, ["lnog", "--lr", "0.5"])


@pytest.mark.slow
def test_a_closed_output_pipe_ends_quietly():
    code = ("from stepkit.cli import run_main\n"
            "def main(cfg):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "run_main(main, lambda: None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr == ""


@dataclasses.dataclass
class Data:
    root: Path | None = None
    shards: str | None = None


@dataclasses.dataclass
class WithData:
    run_dir: Path = Path("runs/x")
    data: Data = dataclasses.field(default_factory=Data)


def test_the_parsed_config_names_existing_data_by_absolute_path(tmp_path, monkeypatch):
    """config.json then names the files wherever stepkit eval or a resume runs (it failed from another
    folder with a relative eval.train_root)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "st").mkdir()
    cfg = cli(WithData, None, ["--data.root", "photos", "--data.shards", "st/{0..3}.tar"])
    assert cfg.data.root == tmp_path / "photos" and cfg.data.shards == f"{tmp_path}/st/{{0..3}}.tar"
    assert cfg.run_dir == Path("runs/x")  # the run's own folder stays as typed
    missing = cli(WithData, None, ["--data.root", "gone"])
    assert missing.data.root == Path("gone")  # its error names what was typed
    assert os.path.isabs(cli(WithData, None, ["--data.root", str(tmp_path / "photos")]).data.root)

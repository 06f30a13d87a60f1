"""Resume guards the run: the saved config, a checkpoint that exists, a way on from a broken one."""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from stepkit import TrainState, ema_copy
from stepkit.checkpoint import CheckpointError, resume, save_last, save_periodic
from stepkit.config import RunArgs, TrainConfig, may_change_on_resume
from stepkit.rundir import HISTORY_FILE, record_resume, saved_config, start_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits.py")


@dataclass
class Log:
    every: int = may_change_on_resume(10)  # declared where it is defined, as a recipe does
    level: int = 1


@dataclass
class Cfg(RunArgs):
    hidden: int = 8
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=20))
    log: Log = field(default_factory=Log)


def make_state(hidden=8):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, hidden)
    return TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()), target=ema_copy(model))


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as a fresh run leaves it: config.json and a last.pt."""
    ckpt = start_run(tmp_path / "run", Cfg(), resume=False)
    save_last(ckpt, make_state())
    return tmp_path / "run"


def test_a_changed_field_that_shapes_the_run_is_refused_field_by_field(run_dir):
    before = (run_dir / "config.json").read_bytes()
    given = Cfg(hidden=16, train=TrainConfig(steps=20, seed=3))
    with pytest.raises(ValueError) as err:
        start_run(run_dir, given, resume=True)
    message = str(err.value)
    assert "hidden: 8 → 16" in message and "train.seed: 0 → 3" in message and "--resume-allow" in message
    assert "train.steps" not in message and "\n" not in message
    assert (run_dir / "config.json").read_bytes() == before
    assert not (run_dir / HISTORY_FILE).exists()


def test_a_change_that_may_happen_is_printed_and_recorded_after_the_load(run_dir, capsys):
    before = (run_dir / "config.json").read_bytes()
    given = Cfg(log=Log(every=5))
    ckpt = start_run(run_dir, given, resume=True)
    assert "log.every: 10 → 5" in capsys.readouterr().out
    assert not (run_dir / HISTORY_FILE).exists()  # nothing written before the checkpoint loads
    assert resume(ckpt, make_state())
    assert record_resume(run_dir, given, step=0) == {"log.every": (10, 5)}
    (line,) = (run_dir / HISTORY_FILE).read_text().splitlines()
    assert json.loads(line)["changes"] == {"log.every": [10, 5]}
    assert (run_dir / "config.json").read_bytes() == before


def test_only_what_the_config_declares_may_change_and_a_class_may_declare_all_its_fields(run_dir):
    from typing import ClassVar

    with pytest.raises(ValueError, match="log.level: 1 → 2"):  # a sibling of a free field is not free
        start_run(run_dir, Cfg(log=Log(level=2)), resume=True)

    @dataclass
    class FreeLog:
        MAY_CHANGE_ON_RESUME: ClassVar[bool] = True
        every: int = 10
        level: int = 1

    @dataclass
    class Cfg2(Cfg):
        log: FreeLog = field(default_factory=FreeLog)  # type: ignore[assignment]

    start_run(run_dir, Cfg2(log=FreeLog(every=3, level=2)), resume=True)


def test_resume_allow_extends_a_run_on_purpose_and_the_history_carries_it(run_dir):
    before = (run_dir / "config.json").read_bytes()
    longer = Cfg(train=TrainConfig(steps=40))
    with pytest.raises(ValueError, match="train.steps: 20 → 40"):
        start_run(run_dir, longer, resume=True)
    start_run(run_dir, longer, resume=True, allow=["train.steps"])
    record_resume(run_dir, longer, step=20)
    assert saved_config(run_dir)["train.steps"] == 40
    start_run(run_dir, longer, resume=True)  # the run is now a 40-step run: no flag needed again
    assert record_resume(run_dir, longer, step=30) == {}
    with pytest.raises(ValueError, match="train.steps: 40 → 20"):
        start_run(run_dir, Cfg(), resume=True)
    start_run(run_dir, Cfg(hidden=4), resume=True, allow=["hidden", "train"])  # a prefix allows its fields
    assert (run_dir / "config.json").read_bytes() == before
    assert len((run_dir / HISTORY_FILE).read_text().splitlines()) == 1


def test_resume_allow_names_real_fields(run_dir):
    expected = r"resume_allow='train.step' is not allowed.*did you mean train.steps"
    with pytest.raises(ValueError, match=expected):
        start_run(run_dir, Cfg(), resume=True, allow=["train.step"])


def test_resume_without_a_checkpoint_is_refused_unless_asked_to_start(tmp_path):
    with pytest.raises(ValueError, match=r"run_dir='.*typo'.*no checkpoint.*--resume-or-start"):
        start_run(tmp_path / "typo", Cfg(), resume=True)
    assert not (tmp_path / "typo").exists()
    ckpt = start_run(tmp_path / "typo", Cfg(), resume=True, or_start=True)
    assert (tmp_path / "typo" / "config.json").exists() and ckpt.is_dir()
    with pytest.raises(ValueError, match="resume_from='.*nope.pt' is not allowed"):
        start_run(tmp_path / "typo", Cfg(), resume=True, resume_from=tmp_path / "nope.pt")


def test_resume_or_start_alone_resumes_a_run_and_starts_one_killed_before_its_first_save(run_dir, tmp_path):
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(ValueError, match="train.steps: 20 → 30"):  # it resumes: the config is checked
        start_run(run_dir, Cfg(train=TrainConfig(steps=30)), resume=False, or_start=True)
    start_run(run_dir, Cfg(), resume=False, or_start=True)
    assert (run_dir / "config.json").read_bytes() == before
    assert RunArgs(run_dir=run_dir, resume_or_start=True).resuming
    killed = tmp_path / "killed"  # its first attempt logged, then died before saving anything
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert not RunArgs(run_dir=killed, resume_or_start=True).resuming
    start_run(killed, Cfg(), resume=False, or_start=True)  # a fresh run there, not "already holds a run"
    assert (killed / "config.json").exists()


def test_resume_takes_the_run_directory_too(run_dir):
    state = make_state()
    assert resume(run_dir, state)
    assert not resume(run_dir / "elsewhere", state)


def test_an_unreadable_last_names_the_newest_readable_checkpoint(tmp_path):
    state = make_state()
    for step in (10, 20, 30):
        state.step = step
        save_periodic(tmp_path, state, keep_last=3)
    save_last(tmp_path, state)
    (tmp_path / "step_00000030.pt").write_bytes(b"PK\x03\x04 broken too")
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as err:
        resume(tmp_path, make_state())
    assert "last.pt: truncated or corrupt" in str(err.value)
    assert "step_00000020.pt (step 20)" in str(err.value) and "--resume-from" in str(err.value)
    other = make_state()
    assert resume(tmp_path, other, checkpoint=tmp_path / "step_00000020.pt") and other.step == 20


# --- the same through a real CLI ------------------------------------------------------------------


def digits(*args, check=True):
    out = subprocess.run([sys.executable, DIGITS, "--log.no-console", *args],
                         capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.mark.slow
def test_cli_resume_guards_config_and_resumes_from_a_periodic_checkpoint(tmp_path):
    common = ["--train.steps", "60", "--ckpt.every", "20", "--ckpt.keep-last", "3", "--eval-every", "20"]
    straight = tmp_path / "straight"
    digits("--run-dir", str(straight), *common)
    expected = json.loads((straight / "summary.json").read_text())["params_digest"]
    config = (straight / "config.json").read_bytes()

    changed = digits("--run-dir", str(straight), *common, "--resume", "--hidden", "64", check=False)
    assert changed.returncode == 1 and "hidden: 128 → 64" in changed.stderr
    assert "Traceback" not in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    assert (straight / "config.json").read_bytes() == config

    ckpt = straight / "checkpoints"
    (ckpt / "last.pt").unlink()  # a hard link of step_60: replace it, as a torn copy would
    (ckpt / "last.pt").write_bytes(b"PK\x03\x04 torn")
    broken = digits("--run-dir", str(straight), *common, "--resume", check=False)
    assert broken.returncode == 1 and "step_00000060.pt" in broken.stderr and "--resume-from" in broken.stderr
    assert "Traceback" not in broken.stderr
    from_40 = digits("--run-dir", str(straight), *common, "--resume-from", str(ckpt / "step_00000040.pt"),
                     "--log.every", "5")
    assert "resumed from" in from_40.stdout and "log.every: 25 → 5" in from_40.stdout
    assert json.loads((straight / "summary.json").read_text())["params_digest"] == expected
    assert (straight / "config.json").read_bytes() == config
    history = [json.loads(line) for line in (straight / HISTORY_FILE).read_text().splitlines()]
    assert [h["changes"] for h in history] == [{"log.every": [25, 5]}]


# --- every recipe, the same guard -------------------------------------------------------------------

RECIPES = {  # a field that shapes each recipe's run, and a value other than its default
    "dino": ("--model.out-dim", "64", "model.out_dim: 128 → 64"),
    "ijepa": ("--mask.targets", "2", "mask.targets: 4 → 2"),
    "jepa_sequences": ("--mask.span", "8", "mask.span: 16 → 8"),
    "autoencoder": ("--data.window", "4", "data.window: 6 → 4"),
    "contrastive": ("--batch-size", "32", "batch_size: 64 → 32"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_refuses_a_resume_with_another_config(name, tmp_path):
    from conftest import load_recipe

    from stepkit.config import to_jsonable

    recipe = load_recipe(name)
    run_dir = tmp_path / "run"
    parse = recipe.parse  # every recipe has one
    saved = parse(["--run-dir", str(run_dir)])
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_jsonable(saved), indent=2))
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"never read: the config check comes first")
    before = (run_dir / "config.json").read_bytes()
    flag, value, expected = RECIPES[name]
    with pytest.raises(ValueError, match="cannot resume with another config") as err:
        recipe.main(parse(["--run-dir", str(run_dir), "--resume", flag, value]))
    assert expected in str(err.value)
    assert (run_dir / "config.json").read_bytes() == before
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "config.json", "last.pt"]


def test_a_field_added_or_removed_since_the_run_started_is_listed_not_refused(run_dir, capsys):
    saved = json.loads((run_dir / "config.json").read_text())
    saved["old_knob"] = 3  # a field this version no longer has
    del saved["hidden"]  # one it added since
    (run_dir / "config.json").write_text(json.dumps(saved))
    start_run(run_dir, Cfg(), resume=True)
    printed = capsys.readouterr().out
    assert 'hidden: "<absent>" → 8' in printed and 'old_knob: 3 → "<absent>"' in printed


FREE_ON_RESUME = {
    "dino": ["--data.prefetch", "off", "--eval.no-knn", "--alarm.patience", "3", "--data.workers", "1",
             "--device", "cpu", "--compile", "default", "--log.every", "3", "--dist.strategy", "fsdp"],
    "ijepa": ["--eval.no-linear", "--alarm.patience", "3", "--mask-image-every", "0", "--ckpt.every", "7"],
    "jepa_sequences": ["--eval.no-linear", "--alarm.min-std", "0.01", "--log.every", "5"],
    "contrastive": ["--device", "cpu", "--log.every", "3", "--tune.max-batch", "64"],
    "autoencoder": ["--ckpt.every", "7", "--log.no-console"],
}


@pytest.mark.parametrize("name", sorted(FREE_ON_RESUME))
def test_every_recipe_lets_a_resume_change_what_its_config_declares_free(name, tmp_path, capsys):
    from conftest import load_recipe

    from stepkit.config import to_jsonable
    from stepkit.run import open_run

    recipe = load_recipe(name)
    run_dir = tmp_path / "run"
    saved = recipe.parse(["--run-dir", str(run_dir)])
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_jsonable(saved), indent=2))
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not read by the config check")
    assert open_run(recipe.parse(["--run-dir", str(run_dir), "--resume", *FREE_ON_RESUME[name]]))
    assert "changed on purpose or allowed" in capsys.readouterr().out

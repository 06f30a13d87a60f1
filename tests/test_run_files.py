"""Files a run reads back, edited or corrupted: one line naming the file, nothing deleted, no traceback."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from stepkit import TrainState
from stepkit.checkpoint import CheckpointError, resume, save_last, save_sharded
from stepkit.checkpoint.errors import FORMAT
from stepkit.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--train.steps", "4", "--ckpt.every", "2", "--eval-every", "2", "--log.no-console"]


class digits:
    """The digits example: a loop of one's own, built from stepkit's pieces."""

    def __init__(self) -> None:
        from stepkit.__main__ import load_recipe

        self.module = load_recipe(ROOT / "examples" / "digits.py")
        self.main = self.module.main

    def parse(self, argv):
        from stepkit.cli import cli

        return cli(self.module.Config, argv=argv)


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A run of the digits example: config.json, a config_history.jsonl, last.pt, best.json."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    example = digits()
    example.main(example.parse(["--run-dir", str(run_dir), *STEPS]))
    example.main(example.parse(["--run-dir", str(run_dir), *STEPS, "--train.steps", "6", "--resume",
                                "--resume-allow", "train.steps"]))
    assert (run_dir / "config_history.jsonl").exists() and (run_dir / "checkpoints" / "best.json").exists()
    return run_dir


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def resumed_error(run_dir: Path, capsys) -> str:
    """Continue the run to step 8 (an evaluation and saves on the way) and return its one error line."""
    example = digits()
    cfg = example.parse(["--run-dir", str(run_dir), *STEPS, "--train.steps", "8", "--resume",
                         "--resume-allow", "train.steps"])
    before = listing(run_dir)
    with pytest.raises(SystemExit) as ended:
        run_main(example.main, lambda: cfg)
    assert listing(run_dir) == before  # nothing deleted, nothing written
    message = str(ended.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_a_garbage_line_in_config_history_is_named_with_its_number(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    with open(run_dir / "config_history.jsonl", "a") as history:
        history.write('{"step": 6, "changes": {"train.steps": [6\n')
    assert resumed_error(run_dir, capsys).startswith(f"error: {run_dir / 'config_history.jsonl'}, line 2: ")


def test_a_garbage_best_index_is_named(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    (run_dir / "checkpoints" / "best.json").write_text('[{"file": "best_00000004.pt", "step": "four"}]')
    message = resumed_error(run_dir, capsys)
    assert message.startswith(f"error: {run_dir / 'checkpoints' / 'best.json'}: refused")


def test_a_last_checkpoint_linked_out_of_the_run_is_refused(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere.pt"
    (run_dir / "checkpoints" / "last.pt").rename(elsewhere)
    os.symlink(elsewhere, run_dir / "checkpoints" / "last.pt")
    message = resumed_error(run_dir, capsys)
    assert message.startswith(f"error: {run_dir / 'checkpoints' / 'last.pt'}: refused: a symbolic link to "
                              f"{elsewhere}, outside the run directory") and "--resume-from" in message


def test_a_link_within_the_run_and_a_linked_checkpoints_folder_are_fine(tmp_path):
    state = a_state(step=3)
    scratch = tmp_path / "scratch"  # checkpoints kept on another disk, linked into the run
    save_last(scratch, state)
    (tmp_path / "run").mkdir()
    os.symlink(scratch, tmp_path / "run" / "checkpoints")
    assert resume(tmp_path / "run" / "checkpoints", a_state()) is True
    (scratch / "last.pt").rename(scratch / "step_00000003.pt")
    os.symlink("step_00000003.pt", scratch / "last.pt")
    fresh = a_state()
    assert resume(tmp_path / "run" / "checkpoints", fresh) and fresh.step == 3


def a_state(step: int = 0) -> TrainState:
    model = torch.nn.Linear(2, 1)
    return TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), step=step)


@pytest.fixture
def sharded(tmp_path):
    folder = save_sharded(tmp_path / "last.dcp", a_state(step=5))
    return folder


def refused(folder: Path, name: str) -> str:
    before = listing(folder.parent)
    with pytest.raises(CheckpointError) as err:
        resume(folder.parent, a_state())
    assert listing(folder.parent) == before
    message = str(err.value)
    assert message.startswith(f"{folder / name}: ") and "\n" not in message
    return message


@pytest.mark.parametrize(("edit", "says"), [
    (lambda info: info.update(step="5"), "refused: step is '5', expected a whole number >= 0"),
    (lambda info: info.update(step=-1), "refused: step is -1"),
    (lambda info: info.pop("world_size"), "refused: world_size is missing"),
    (lambda info: info.update(meta=[]), "refused: meta is [], expected an object"),
    (lambda info: info.update(sharded=1), "refused: sharded is 1, expected true"),
])
def test_an_edited_state_json_is_refused_naming_the_field(sharded, edit, says):
    info = json.loads((sharded / "state.json").read_text())
    edit(info)
    (sharded / "state.json").write_text(json.dumps(info))
    assert says in refused(sharded, "state.json")


@pytest.mark.parametrize(("content", "says"), [
    (b"half", "truncated or corrupt file"),
    ({"format": FORMAT, "rng": "garbage"}, "refused: this rank's RNG part is not one stepkit saves"),
    ({"format": FORMAT}, "refused: this rank's RNG part is not one stepkit saves (KeyError"),
])
def test_an_edited_rank_rng_file_is_refused(sharded, content, says):
    path = sharded / "rng_rank0.pt"
    if content == b"half":  # a torn copy of the genuine file
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save(content, path)
    assert says in refused(sharded, "rng_rank0.pt")


def test_a_single_file_whose_rank_parts_were_edited_is_refused(tmp_path):
    state = a_state(step=2)
    torch.save({"format": FORMAT, "state": state.state_dict(), "meta": {}, "rank_parts": {"1": "x"}},
               tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: refused: its rank_parts is a dict, not a list"):
        resume(tmp_path, a_state())


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_and_the_run_goes_on(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "ab") as metrics:
        metrics.write(b'{"step": 7, "loss": 0.5')  # what kill -9 mid-write leaves
    example = digits()
    example.main(example.parse(["--run-dir", str(run_dir), *STEPS, "--train.steps", "8", "--resume",
                                "--resume-allow", "train.steps"]))
    assert "metrics.jsonl, line " in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 8


def test_a_garbage_metrics_line_before_the_last_is_named(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    example = digits()
    cfg = example.parse(["--run-dir", str(run_dir), *STEPS, "--train.steps", "8", "--resume",
                         "--resume-allow", "train.steps"])
    before = (run_dir / "metrics.jsonl").read_bytes(), listing(run_dir / "checkpoints")
    with pytest.raises(SystemExit) as ended:
        run_main(example.main, lambda: cfg)
    message = str(ended.value.code)
    assert message.startswith(f"error: {run_dir / 'metrics.jsonl'}, line 2: not a metrics record")
    assert ((run_dir / "metrics.jsonl").read_bytes(), listing(run_dir / "checkpoints")) == before

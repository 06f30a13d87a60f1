"""Runs whose updates turn non-finite: counted, named, and stopped with exit code 65."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_recipe

from stepkit import TrainState
from stepkit.checkpoint import checkpoint_step, load_checkpoint
from stepkit.cli import run_main
from stepkit.faults import EXIT_DIVERGED, EXIT_SAVE_FAILED, EXIT_STOPPED, NonFiniteWatch
from stepkit.monitor import collapse_metrics


def a_state() -> TrainState:
    model = torch.nn.Linear(2, 1)
    return TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))


def drive(watch: NonFiniteWatch, state: TrainState, losses, **more) -> None:
    for value in losses:
        state.step += 1
        state.skipped_steps += not math.isfinite(value)  # what apply_update counts
        watch.update(state, {"loss": torch.tensor(value), **{k: v(state.step) for k, v in more.items()}})


def test_exit_codes_differ_from_success_errors_and_each_other():
    assert len({0, 1, 130, EXIT_DIVERGED, EXIT_SAVE_FAILED, EXIT_STOPPED}) == 6


def test_the_count_is_of_skipped_updates_in_a_row():
    state, nan = a_state(), float("nan")
    watch = NonFiniteWatch(max_skipped=3, state=state)
    drive(watch, state, [1.0, nan, nan, 2.0, nan, nan])
    assert watch.in_a_row() == 2 and not watch.storm()  # 4 skipped, but a finite update between
    drive(watch, state, [nan])
    assert watch.in_a_row() == 3 and watch.storm()
    drive(watch, state, [0.5])
    assert watch.in_a_row() == 0 and not watch.storm()
    assert watch.summary(state) == {"skipped_steps": 5, "first_nonfinite": {"step": 2, "terms": ["loss"]}}


def test_the_first_nonfinite_term_is_named_with_its_step():
    state = a_state()
    watch = NonFiniteWatch(max_skipped=0, state=state)
    grad_norm = {"grad_norm": lambda step: torch.tensor(float("inf") if step >= 3 else 1.0),
                 "lr": lambda step: 0.1 if step < 5 else float("nan")}
    drive(watch, state, [1.0, 1.0, 1.0, float("nan"), float("nan")], **grad_norm)
    assert watch.first_nonfinite() == (3, ["grad_norm"])  # before the loss, which followed at step 4
    assert not watch.storm()  # max_skipped 0 never stops


def test_a_resumed_run_counts_from_its_own_start():
    state = a_state()
    state.skipped_steps += 7  # skipped before the checkpoint
    watch = NonFiniteWatch(max_skipped=2, state=state)
    drive(watch, state, [1.0])
    assert watch.in_a_row() == 0 and watch.first_nonfinite() is None


def test_collapse_metrics_of_nonfinite_features_are_nan_not_an_error():
    features = torch.randn(8, 4)
    features[3, 1] = float("nan")
    assert all(math.isnan(v) for v in collapse_metrics(features).values())
    assert all(math.isfinite(v) for v in collapse_metrics(torch.randn(8, 4)).values())


@pytest.mark.slow
def test_a_diverging_dino_run_stops_with_65_naming_the_term_and_the_checkpoint(tmp_path, capsys):
    dino = load_recipe("dino")
    run_dir = tmp_path / "run"
    cfg = dino.parse(["--run-dir", str(run_dir), "--device", "cpu", "--log.no-console", "--batch-size", "16",
                      "--crops.local-crops", "2", "--model.out-dim", "64", "--optim.warmup-steps", "0",
                      "--optim.lr", "1e30", "--train.steps", "200", "--train.max-skipped", "5",
                      "--log.every", "2", "--ckpt.every", "1", "--ckpt.keep-last", "20"])
    with pytest.raises(SystemExit) as stopped:
        run_main(dino.main, lambda: cfg)
    assert stopped.value.code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_in_a_row"] >= 5
    first = summary["first_nonfinite"]
    assert "loss" in first["terms"] and first["step"] <= summary["steps"] - summary["skipped_in_a_row"] + 1
    began = summary["steps"] - summary["skipped_in_a_row"] + 1
    back_to = run_dir / "checkpoints" / f"step_{began - 1:08d}.pt"
    assert summary["resume_from"] == str(back_to) and checkpoint_step(back_to) == began - 1
    assert f"--resume-from {back_to}" in err and f"step {summary['steps']}:" in err
    assert f"went non-finite first, at step {first['step']}" in err
    load_checkpoint(back_to)  # whole
    alarms = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(a.get("first_nonfinite") for a in alarms) and any(a.get("diverged_at") for a in alarms)


def test_the_sweep_launcher_knows_the_diverged_code():
    from stepkit import sweep

    assert sweep._EXIT_DIVERGED == EXIT_DIVERGED


def test_a_failed_write_raises_save_failed_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import errno

    from stepkit import _atomic
    from stepkit.checkpoint import SaveFailed, save_last, save_sharded

    state = a_state()
    state.step = 3
    last = save_last(tmp_path, state)
    sharded = save_sharded(tmp_path / "last.dcp", state)
    before = last.read_bytes(), {p.name: p.read_bytes() for p in sharded.iterdir()}

    def disk_full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_atomic, "_atomic", disk_full)
    state.step = 4
    with pytest.raises(SaveFailed) as failed:
        save_last(tmp_path, state)
    message = str(failed.value)
    assert message.startswith(f"{tmp_path}: could not save last.pt (No space left on device); it needs ")
    assert " MB is free there" in message and "continue with --resume" in message
    with pytest.raises(SaveFailed, match=r"could not save last.dcp \(No space left on device\)"):
        save_sharded(tmp_path / "last.dcp", state)  # DCP wrote its shards; the RNG part failed
    assert (last.read_bytes(), {p.name: p.read_bytes() for p in sharded.iterdir()}) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.dcp", "last.pt"]  # no partial one left
    assert checkpoint_step(last) == checkpoint_step(sharded) == 3


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_74_and_the_last_checkpoint_whole(tmp_path):
    """A real failing write: the process may write files of at most 1 MB (RLIMIT_FSIZE), a checkpoint
    needs about 40 MB (the online probe's sums are 17 of them); the log and the config stay small enough."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    flags = ["--run-dir", str(run_dir), "--device", "cpu", "--log.no-console", "--batch-size", "16",
             "--crops.local-crops", "2", "--model.out-dim", "64", "--optim.warmup-steps", "1",
             "--ckpt.every", "2", "--eval.no-knn"]
    dino = load_recipe("dino")
    dino.main(dino.parse([*flags, "--train.steps", "2"]))
    last = run_dir / "checkpoints" / "last.pt"
    saved = last.read_bytes()

    def one_megabyte_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    out = subprocess.run([sys.executable, str(root / "recipes" / "dino.py"), *flags, "--train.steps", "4",
                          "--resume", "--resume-allow", "train.steps"], capture_output=True, text=True,
                         timeout=300, preexec_fn=one_megabyte_files)
    assert out.returncode == EXIT_SAVE_FAILED, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert f"error: {run_dir / 'checkpoints'}: could not save last.pt (File too large)" in out.stderr
    needs = round(len(saved) / 2**20)  # the checkpoint of step 2 (the online probe's sums included)
    assert any(f"it needs about {n} MB" in out.stderr for n in (needs - 1, needs, needs + 1)), needs
    assert last.read_bytes() == saved and not list(last.parent.glob(".*.tmp"))


def kill_mid_save(cmd, ckpt_dir, partial_glob, victim) -> int:
    """Start ``cmd`` (its own session), wait until it has saved twice and a third save is on disk half
    written (``partial_glob`` matches), SIGKILL ``victim(pid)``, then the whole group; the last step
    saved whole before the kill."""
    import os
    import signal
    import subprocess
    import time

    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    saved = 0
    try:
        while saved < 2:
            line = child.stdout.readline()
            assert line, "the save loop ended"
            saved = int(line.split()[1])
        deadline = time.monotonic() + 60
        while not list(ckpt_dir.glob(partial_glob)):
            assert time.monotonic() < deadline, f"no {partial_glob} ever appeared"
            time.sleep(0.001)
        os.kill(victim(child.pid), signal.SIGKILL)  # while the save is being written
        time.sleep(0.5)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
    steps = [int(line.split()[1]) for line in rest.splitlines() if line.startswith("saved")]
    return max([saved, *steps])


def loaded_step(ckpt_dir) -> int:
    from stepkit.checkpoint import resume

    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(6)))
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert resume(ckpt_dir, state)
    assert all(bool((p == state.step).all()) for p in model.parameters())  # that save's weights, whole
    return state.step


@pytest.mark.slow
def test_a_process_killed_while_writing_its_checkpoint_leaves_the_previous_one(tmp_path, capsys):
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "save_loop.py"
    last_whole = kill_mid_save([sys.executable, str(script), str(tmp_path)], tmp_path, ".last.pt.*.tmp",
                               victim=lambda pid: pid)
    assert list(tmp_path.glob(".last.pt.*.tmp"))  # the half-written file it left
    assert loaded_step(tmp_path) == last_whole
    assert "removed, the partial write of a save that was interrupted" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the ranks through /proc")
def test_a_rank_killed_while_writing_a_sharded_checkpoint_leaves_the_previous_one(tmp_path, capsys):

    from test_torchrun import TORCHRUN, rank_pid

    script = Path(__file__).parent / "scripts" / "save_loop.py"
    last_whole = kill_mid_save([*TORCHRUN, str(script), str(tmp_path), "--fsdp"], tmp_path, "last.dcp.tmp",
                               victim=lambda pid: rank_pid(pid, 1))
    assert (tmp_path / "last.dcp.tmp").exists()
    assert loaded_step(tmp_path) == last_whole  # an FSDP2 checkpoint loads into one process
    assert "last.dcp.tmp: removed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.dcp"]


def test_a_sharded_save_killed_between_its_two_renames_is_restored(tmp_path, capsys):
    from stepkit.checkpoint import has_checkpoint, resume, save_sharded

    state = a_state()
    state.step = 6
    save_sharded(tmp_path / "last.dcp", state)
    (tmp_path / "last.dcp").rename(tmp_path / "last.dcp.old")  # the old one moved aside, the new not in
    (tmp_path / "last.dcp.tmp").mkdir()
    assert not has_checkpoint(tmp_path)
    state = a_state()
    assert resume(tmp_path, state) and state.step == 6
    out = capsys.readouterr().out
    assert "last.dcp: restored from last.dcp.old" in out and "last.dcp.tmp: removed" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.dcp"]


def test_a_log_write_on_a_full_disk_is_one_line_and_74(capsys):
    import errno

    def main(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/a/metrics.jsonl")

    with pytest.raises(SystemExit) as ended:
        run_main(main, lambda: None)
    assert ended.value.code == EXIT_SAVE_FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: runs/a/metrics.jsonl: No space left on device; the checkpoints already")
    assert err.count("\n") == 1

"""Preemption: a signal mid-run saves the checkpoint, exits 75, and the resumed run is bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_once

from stepkit.checkpoint import load_checkpoint
from stepkit.signals import EXIT_STOPPED, StopSignals

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [sys.executable, str(ROOT / "examples" / "digits.py"), "--log.no-console"]
COMMON = ["--train.steps", "1500", "--ckpt.every", "100", "--eval-every", "500", "--log.every", "100"]


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def digest(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["params_digest"]


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    def build(folder: Path) -> None:
        subprocess.run([*DIGITS, "--run-dir", str(folder / "run"), *COMMON], check=True, capture_output=True,
                       timeout=300)

    return digest(run_once(tmp_path_factory, "signals-straight", build) / "run")


# one handler serves the three signals: the resumed run is compared for one of them (the suite's time)
@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "resume"),
                         [("SIGTERM", True), ("SIGUSR1", False), ("SIGINT", False)])
def test_a_signal_saves_exits_75_and_the_resumed_run_is_bit_identical(signal_name, resume, straight,
                                                                       tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen([*DIGITS, "--run-dir", str(run_dir), *COMMON],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "checkpoints" / "step_00000200.pt")
    child.send_signal(getattr(signal, signal_name))
    out, err = child.communicate(timeout=60)
    assert child.returncode == EXIT_STOPPED == 75, err
    assert "Traceback" not in err
    assert f"stopped by {signal_name} at step" in err and "--resume" in err
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["step"]
    assert 200 <= stopped_at < 1500 and f"at step {stopped_at} " in err
    assert not (run_dir / "summary.json").exists()
    if not resume:
        return
    resumed = subprocess.run([*DIGITS, "--run-dir", str(run_dir), *COMMON, "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}" in resumed.stdout
    assert digest(run_dir) == straight


SLOW_LOOP = """
import sys, time, torch
from stepkit import TrainState
from stepkit.checkpoint import save_last
from stepkit.cli import run_main
from stepkit.signals import StopSignals

def main(ckpt_dir):
    model = torch.nn.Linear(2, 2)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with StopSignals() as signals:
        while True:
            state.step += 1
            save_last(ckpt_dir, state)
            print("step", state.step, flush=True)
            time.sleep(0.05 if signals._received is None else 30)  # an update that takes long
            if signals.requested():
                break
    save_last(ckpt_dir, state)

run_main(main, lambda: sys.argv[1])
"""


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", SLOW_LOOP, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while child.stdout.readline().strip() != "step 3":
        pass
    child.send_signal(signal.SIGINT)
    while "SIGINT received" not in child.stderr.readline():  # the first is handled: the update goes on
        pass
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=20)  # well before the 30 s update would end
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted: stopped at once" in err
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] >= 3  # the last good one, whole
    assert not list(tmp_path.glob(".*.tmp"))


def test_opted_out_installs_nothing_and_a_world_of_one_needs_no_group():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(enabled=False) as stop:
        assert signal.getsignal(signal.SIGTERM) is before
        assert not stop.requested()
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat changes nothing
        assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_limits_how_often_the_flag_is_read():
    with StopSignals(every=3) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert [stop.requested() for _ in range(3)] == [False, False, True]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the DataLoader workers through /proc")
def test_sigterm_to_the_process_group_with_dataloader_workers_saves_and_exits_75(tmp_path):
    """What SLURM, scancel and ``timeout`` send: the signal reaches the DataLoader workers too."""
    sys.path.insert(0, str(ROOT / "tests"))
    from imagefiles import write_folder

    write_folder(tmp_path / "photos", 6, labelled=False, seed=0)
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "dino.py"), "--data.root", str(tmp_path / "photos"),
         "--data.workers", "2", "--run-dir", str(run_dir), "--device", "cpu", "--log.no-console",
         "--batch-size", "4", "--crops.global-size", "32", "--crops.local-size", "16",
         "--crops.local-crops", "2", "--model.out-dim", "32", "--model.head-hidden", "32",
         "--train.steps", "100000", "--ckpt.every", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(run_dir / "checkpoints" / "step_00000002.pt")
    assert len(children(child.pid)) >= 2, "the run has no DataLoader worker processes"
    os.killpg(child.pid, signal.SIGTERM)  # the recipe, its workers: the whole group
    _, err = child.communicate(timeout=120)
    assert child.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["step"]
    assert stopped_at >= 2 and f"stopped by SIGTERM at step {stopped_at} " in err

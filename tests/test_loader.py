"""stepkit.loader: a data error or a stalled loader ends the run promptly, workers reaped, on every source.

The recipe tests run real processes (their own session, so a worker left behind is found) under a
harness timeout: before this module, each of them hung after its error line until killed.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from imagefiles import write_folder, write_pairs, write_shards, write_tiny_text_model

from stepkit.checkpoint import load_checkpoint
from stepkit.data import ResumableSampler, WatchedLoader, end_loader_workers, find_images, seeded_loader
from stepkit.faults import DataError, DataStalled

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "scripts" / "recipe_with_faults.py"
BOUND_S = 120  # the harness's limit; a run that hangs after its error line is killed here and fails


class Samples(torch.utils.data.Dataset):
    """Eight samples; ``bad`` raises ``error`` when read, ``hang`` sleeps for an hour."""

    def __init__(self, bad: int = -1, error: type = ValueError, hang: int = -1) -> None:
        self.bad, self.error, self.hang = bad, error, hang

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.hang:
            time.sleep(3600)
        if i == self.bad:
            raise self.error(f"sample_{i}.jpg: not a readable image")
        return torch.tensor([i])


def alive(pids: list[int]) -> list[int]:
    def running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited, its parent not yet told
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"

    return [p for p in pids if running(p)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("error", [ValueError, OSError])
def test_a_sample_that_cannot_be_read_is_a_data_error_with_its_own_line_and_the_workers_end(workers, error):
    batches = iter(seeded_loader(Samples(bad=5, error=error), seed=0, workers=workers, batch_size=2))
    assert next(batches).tolist() == [[0], [1]]
    with pytest.raises(DataError) as caught:
        for _ in range(3):
            next(batches)
    assert str(caught.value) == "sample_5.jpg: not a readable image"  # no worker traceback in it
    assert alive([w.pid for w in getattr(batches._inner, "_workers", [])]) == []


def test_an_error_that_is_no_data_error_passes_unchanged():
    class Bug(Samples):
        def __getitem__(self, i):
            raise TypeError("a bug in the dataset")

    with pytest.raises(TypeError, match="a bug in the dataset"):
        next(iter(seeded_loader(Bug(), seed=0, batch_size=2)))


def test_the_main_process_stalled_without_workers_names_the_line_it_was_at():
    loader = WatchedLoader(Samples(hang=2), batch_size=2, timeout=0.5)
    batches = iter(loader)
    next(batches)
    started = time.monotonic()
    with pytest.raises(DataStalled) as caught:
        next(batches)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith("no batch for 0.5 s (--data.timeout): the main process (no DataLoader workers)")
    assert f"{__file__}:" in message and "(__getitem__)" in message


def test_a_stalled_worker_is_named_with_its_pid_and_line_and_every_worker_ends():
    batches = iter(seeded_loader(Samples(hang=4), seed=0, workers=2, batch_size=2, timeout=3))
    assert [next(batches).tolist() for _ in range(2)] == [[[0], [1]], [[2], [3]]]
    workers = batches._inner._workers
    with pytest.raises(DataStalled) as caught:
        next(batches)
    stuck = workers[0]  # batch 2 (samples 4 and 5) is worker 0's: batches go to the workers in turn
    message = str(caught.value)
    assert f"waited for worker 0 (pid {stuck.pid}, at {__file__}:" in message, message
    assert "(__getitem__)" in message and "worker 1" not in message
    assert alive([w.pid for w in workers]) == []
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL  # the alarm is put back as it was


def test_a_timeout_of_zero_waits_and_a_negative_one_is_refused():
    assert list(WatchedLoader(Samples(), batch_size=4, timeout=0))[1].tolist() == [[4], [5], [6], [7]]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"data.timeout=.* is not allowed: expected seconds >= 0"):
            WatchedLoader(Samples(), timeout=bad)


def test_end_loader_workers_ends_every_live_iterator():
    first = iter(seeded_loader(Samples(), seed=0, workers=1, batch_size=2))
    second = iter(seeded_loader(Samples(), seed=1, workers=1, batch_size=2))
    next(first), next(second)
    pids = [w.pid for it in (first, second) for w in it._inner._workers]
    assert alive(pids) == pids
    end_loader_workers()
    assert alive(pids) == []


def test_an_iterator_collected_in_a_reference_cycle_ends_its_workers_at_once():
    # the cycle's queue finalizers run before the iterator's own: torch's polite shutdown then took
    # 20 s and left workers that ignore SIGTERM alive, holding the process's exit forever
    import gc

    class Holder:
        pass

    holder = Holder()
    holder.itself, holder.batches = holder, iter(seeded_loader(Samples(), seed=0, workers=2, batch_size=2))
    next(holder.batches)
    pids = [w.pid for w in holder.batches._inner._workers]
    del holder
    started = time.monotonic()
    gc.collect()
    assert alive(pids) == [] and time.monotonic() - started < 4  # torch's own shutdown waits >= 10 s


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "sys.exit(3)"])
def test_a_process_that_leaves_with_workers_mid_epoch_exits_at_once(how, tmp_path):
    # seeded_loader's workers ignore SIGTERM: multiprocessing's exit hook alone would wait for them forever
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from stepkit.data import seeded_loader
        batches = iter(seeded_loader(torch.arange(1000), seed=0, workers=2, batch_size=2))
        next(batches)
        print(" ".join(str(w.pid) for w in batches._inner._workers), flush=True)
        {'raise RuntimeError("left mid-epoch")' if how == 'raise' else how}
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=BOUND_S,
                          start_new_session=True)
    assert done.returncode == (1 if how == "raise" else 3), done.stderr
    assert alive([int(p) for p in done.stdout.split()]) == []


# --- the recipes, as a user runs them ---------------------------------------------------------------


def recipe(name: str, *args: str, faults: tuple[str, ...] = ()) -> list[str]:
    """``python recipes/NAME.py ARGS``, through the driver that adds ``faults`` (recipe_with_faults.py)."""
    return [str(FAULTS), *faults, str(ROOT / "recipes" / f"{name}.py"), *args]


def run_recipe(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python COMMAND`` in a session of its own; a worker it leaves behind is found there afterwards."""
    command = [sys.executable, *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=tmp_path)
    try:
        out, err = process.communicate(timeout=BOUND_S)
    finally:
        left = [int(p) for p in subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True,
                                               text=True).stdout.split()]
        if process.poll() is None or left:
            os.killpg(process.pid, signal.SIGKILL)
    assert left == [], f"processes left behind: {left}"
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def assert_stopped_on(done: subprocess.CompletedProcess, run_dir: Path, *fragments: str) -> None:
    """Exit 1, an ``error:`` line naming the file last, no traceback, no temporary file, checkpoints whole."""
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), done.stderr
    assert "Traceback" not in done.stderr
    assert [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")] == []
    if (run_dir / "checkpoints" / "last.pt").exists():
        load_checkpoint(run_dir / "checkpoints" / "last.pt")


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


SMALL = ["--run-dir", "run", "--train.steps", "40", "--ckpt.every", "1", "--batch-size", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_dino_on_a_cut_off_shard_ends_with_its_line(workers, tmp_path):
    pattern = write_shards(tmp_path / "shards", 4, 12, captions=False)
    cut_in_half(tmp_path / "shards" / "0002.tar")
    done = run_recipe(recipe("dino", "--data.shards", pattern, "--data.workers", str(workers),
                             *SMALL), tmp_path)
    assert_stopped_on(done, tmp_path / "run", "0002.tar: cut off or not a tar shard",
                      "--data.skip-unreadable")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_ijepa_meets_a_bad_image_of_a_large_folder_mid_run_and_keeps_its_checkpoint(workers, tmp_path):
    write_folder(tmp_path / "photos", 10, labelled=False)
    files = find_images(tmp_path / "photos")
    order = ResumableSampler(len(files), seed=0).epoch_order(0)
    bad = files[order[3 * 4]]  # the first image of the 4th batch of 4: three updates are saved before it
    cut_in_half(bad)
    done = run_recipe(recipe("ijepa", "--data.root", "photos", "--data.workers", str(workers),
                             *SMALL, faults=("--check-up-to", "4")), tmp_path)
    assert_stopped_on(done, tmp_path / "run", f"{bad.name}: not a readable image", "--data.root")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_contrastive_meets_a_bad_image_of_a_pairs_file_mid_run(workers, tmp_path):
    pairs = write_pairs(tmp_path / "pairs", 10)
    bad = tmp_path / "pairs" / "images" / "bar_4.jpg"
    cut_in_half(bad)
    done = run_recipe(recipe("contrastive", "tiny", "--data.pairs", str(pairs), "--data.workers",
                             str(workers), *SMALL, faults=("--check-up-to", "4")), tmp_path)
    assert_stopped_on(done, tmp_path / "run", "bar_4.jpg", "not a readable image")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_contrastive_on_a_cut_off_pair_shard_ends_with_its_line(workers, tmp_path):
    pattern = write_shards(tmp_path / "train", 4, 12)
    val = write_shards(tmp_path / "val", 1, 8, seed=1)
    cut_in_half(tmp_path / "train" / "0001.tar")
    done = run_recipe(recipe("contrastive", "--data.shards", pattern, "--data.val-shards", val,
                             "--model.text", write_tiny_text_model(tmp_path / "text-model"),
                             "--data.workers", str(workers), *SMALL), tmp_path)
    assert_stopped_on(done, tmp_path / "run", "0001.tar: cut off or not a tar shard")


@pytest.mark.slow
def test_a_shard_whose_read_hangs_ends_the_run_after_data_timeout(tmp_path):
    # without workers, the main process's place is named instead (the unit test above)
    pattern = write_shards(tmp_path / "shards", 4, 12, captions=False)
    done = run_recipe(recipe("dino", "--data.shards", pattern, "--data.workers", "2", "--data.timeout", "3",
                             *SMALL, faults=("--hang", "0002.tar")), tmp_path)
    assert_stopped_on(done, tmp_path / "run", "no batch for 3 s (--data.timeout)",
                      "the DataLoader waited for worker ", f"{FAULTS}:", "(hang_on)")


@pytest.mark.slow
def test_under_torchrun_a_data_error_ends_every_rank_and_no_restart_runs_into_it_again(tmp_path):
    pattern = write_shards(tmp_path / "shards", 4, 12, captions=False)
    cut_in_half(tmp_path / "shards" / "0002.tar")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts", "1"]
    done = run_recipe([*torchrun, *recipe("dino", "--data.shards", pattern, "--data.workers", "2",
                                          "--resume-or-start", "--eval.no-online", *SMALL)], tmp_path)
    assert done.returncode == 1
    cut = "0002.tar: cut off or not a tar shard"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    first_group, restarts = errors[:2], errors[2:]
    # the rank that read it says so; the other, whose collective lost it, says why it stopped too
    assert any(line.startswith("error: ") and line.split("error: ", 1)[1].startswith(str(tmp_path / "shards"))
               and cut in line for line in first_group), done.stderr
    assert any("stopped on a data error: " in line and cut in line and line.endswith("stopped with it)")
               for line in first_group), done.stderr
    # the restart: both ranks refuse at once, naming the error (not training up to it again)
    assert len(restarts) == 2 and all(line.startswith("error: not started again after torchrun's restart: ")
                                      and cut in line for line in restarts), done.stderr
    assert done.stderr.count("Traceback (most recent call last)") == 1  # torchrun's own, at its end

"""The recipes under torchrun: 2 gloo processes on the CPU, DDP and FSDP2, sharded checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_once

from stepkit.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DINO = ["recipes/dino.py", "--batch-size", "16", "--crops.local-crops", "2", "--optim.warmup-steps", "2",
        "--log.no-console", "--ckpt.every", "4", "--ckpt.keep-last", "6", "--train.steps", "12",
        "--optim.lr-per-batch", "32"]  # DINO's rule: the lr is given for 32 images per update
NO_KNN = ["--eval.no-knn"]  # the runs compared by params_digest alone (the evaluation draws no RNG)


def run(cmd, timeout=240):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def rewind_to_step_4(ckpt: Path) -> None:
    """What a crash after the step-4 save leaves: last = the step-4 checkpoint."""
    for name in ("last.pt", "last.dcp"):
        path = ckpt / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for periodic in ckpt.glob("step_00000004*"):
        target = ckpt / periodic.name.replace("step_00000004", "last")
        (shutil.copytree if periodic.is_dir() else shutil.copy)(periodic, target)


def strategy_flags(strategy: str) -> list[str]:
    """DDP in fp32; FSDP2 in fp16, whose first updates overflow on these digits: the GradScaler backs
    off and skips them, so a resume that lost the scaler's state (the old sharded format) would drift.
    fp16 on a CPU is slow (about 5x fp32 here): 6 updates of 8 images a rank instead of 12 of 16 (the saves of
    step 4 and 6, a resume between)."""
    fp16 = ["--amp", "fp16", "--train.steps", "6", "--batch-size", "8"] if strategy == "fsdp" else []
    return ["--dist.strategy", strategy, *fp16]


@pytest.fixture(scope="session", params=["ddp", "fsdp"])
def whole(request, tmp_path_factory):
    """An uninterrupted 2-rank DINO run: (strategy, its run directory), made once per session."""
    def build(folder: Path) -> None:
        out = run([*TORCHRUN, *DINO, "--run-dir", str(folder / "whole"), *strategy_flags(request.param)])
        rule = ("32 images per update / 32 = 0.003" if request.param == "ddp"  # 2 ranks x 16
                else "16 images per update / 32 = 0.0015")
        assert f"lr 0.003 x {rule} (--optim.lr-per-batch)" in out.stdout

    return request.param, run_once(tmp_path_factory, f"dino-{request.param}", build) / "whole"


@pytest.mark.slow
def test_dino_two_ranks_resume_bit_exact(whole, tmp_path):
    strategy, whole_dir = whole
    result = summary(whole_dir)
    assert result["ranks"] == 2 and result["steps"] == (12 if strategy == "ddp" else 6)
    assert result["online_identical"] is True  # the online probe's head, the same on every rank
    if strategy == "ddp":
        assert result["replicas_identical"] is True
        parts = load_checkpoint(whole_dir / "checkpoints" / "last.pt")["rank_parts"]  # every rank's RNG
        assert [sorted(p) for p in parts] == [["rank_extras", "rng"]] * 2
    else:
        assert {p.name for p in (whole_dir / "checkpoints" / "last.dcp").iterdir()} >= {
            "state.json", ".metadata", "rng_rank0.pt", "rng_rank1.pt"}
        assert result["skipped_steps"] >= 1  # fp16 overflowed: the loss scale moved
    run_dir = tmp_path / "run"
    shutil.copytree(whole_dir, run_dir)
    (run_dir / "summary.json").unlink()
    rewind_to_step_4(run_dir / "checkpoints")
    if strategy == "ddp":  # a changed config is refused on every rank (the same check under FSDP2)
        config = (run_dir / "config.json").read_bytes()
        changed = subprocess.run([*TORCHRUN, *DINO, "--run-dir", str(run_dir), *strategy_flags(strategy),
                                  "--resume", "--train.seed", "1"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=240)
        assert changed.returncode != 0 and changed.stderr.count("train.seed: 0 → 1") == 2
        assert (run_dir / "config.json").read_bytes() == config
    run([*TORCHRUN, *DINO, "--run-dir", str(run_dir), *strategy_flags(strategy), "--resume", *NO_KNN])
    # every rank's RNG and data resumed, and under FSDP2 the GradScaler's loss scale and growth tracker
    assert summary(run_dir)["params_digest"] == result["params_digest"]
    assert summary(run_dir)["skipped_steps"] == result["skipped_steps"]


def rank_pid(parent: int, rank: int | None, timeout: float = 60) -> int:
    """The pid of torchrun's child with ``RANK=rank`` (any rank for None; read from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                parent_pid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            wanted = f"RANK={rank}".encode() if rank is not None else b"RANK="
            if parent_pid == parent and any(v.startswith(wanted) for v in env):
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under {parent}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("whole", ["ddp"], indirect=True)  # the stop is the same code under FSDP2
def test_two_ranks_stop_at_the_same_update_when_one_is_signalled(whole, tmp_path):
    strategy, whole_dir = whole
    flags = [*DINO, *strategy_flags(strategy), "--run-dir", str(tmp_path / "run"), *NO_KNN]
    launcher = subprocess.Popen([*TORCHRUN, *flags], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    suffix = ".dcp" if strategy == "fsdp" else ".pt"
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / f"step_00000004{suffix}").exists():
        assert time.monotonic() < deadline and launcher.poll() is None, "the run never saved step 4"
        time.sleep(0.01)
    os.kill(rank_pid(launcher.pid, 1), signal.SIGTERM)  # one rank only, as a node-local signal would
    _, err = launcher.communicate(timeout=120)
    assert err.count("exitcode  : 75") == 2, err[-3000:]  # both ranks stopped cleanly, none hung
    assert "stopped by a signal on another rank at step" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    run([*TORCHRUN, *flags, "--resume"])
    assert summary(tmp_path / "run")["params_digest"] == summary(whole_dir)["params_digest"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("whole", ["ddp"], indirect=True)  # FSDP2: test_dino_two_ranks_resume_bit_exact
def test_a_rank_killed_under_max_restarts_is_restarted_and_resumes_bit_exact(whole, tmp_path):
    """torchrun --max-restarts restarts the group; --resume-or-start continues from the last checkpoint."""
    strategy, whole_dir = whole
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([*TORCHRUN, "--max-restarts", "1", *DINO, *strategy_flags(strategy), *NO_KNN,
                                 "--run-dir", str(run_dir), "--resume-or-start"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step_4(run_dir, strategy, launcher)
    os.kill(rank_pid(launcher.pid, 1), signal.SIGKILL)
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    assert "exitcode  : -9" not in err and "resumed from" in out  # restarted, not failed
    assert summary(run_dir)["params_digest"] == summary(whole_dir)["params_digest"]


def wait_for_step_4(run_dir: Path, strategy: str, *launchers) -> None:
    saved = run_dir / "checkpoints" / f"step_00000004{'.dcp' if strategy == 'fsdp' else '.pt'}"
    deadline = time.monotonic() + 120
    while not saved.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in launchers), "no step-4 save"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("whole", ["ddp"], indirect=True)
def test_two_torchrun_agents_as_two_machines_restart_a_killed_rank(whole, tmp_path):
    """The multi-node command of the docs: two agents meet by c10d rendezvous on localhost, one
    process each; one's worker is killed, both agents restart their workers, and the run resumes."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
             "--rdzv-id", "two-machines", *DINO, *NO_KNN, "--run-dir", str(run_dir), "--resume-or-start"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as --standalone sets for 2 processes: the same sums
    agents = [subprocess.Popen(agent, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    wait_for_step_4(run_dir, "ddp", *agents)
    os.kill(rank_pid(agents[1].pid, None), signal.SIGKILL)  # the second machine's worker
    ends = [a.communicate(timeout=240) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [e[1][-2000:] for e in ends]
    assert summary(run_dir)["params_digest"] == summary(whole[1])["params_digest"]


@pytest.mark.slow
@pytest.mark.parametrize("whole", ["fsdp"], indirect=True)
def test_fsdp_checkpoint_continues_in_one_process(whole, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(whole[1], run_dir)
    out = run([sys.executable, *DINO, *NO_KNN, "--run-dir", str(run_dir), "--resume", "--train.steps", "10",
               "--amp", "fp16", "--batch-size", "8", "--resume-allow", "train.steps"])
    assert summary(run_dir)["steps"] == 10 and summary(run_dir)["ranks"] == 1
    assert "lr 0.003 x 8 images per update / 32 = 0.00075" in out.stdout  # the rule, on the new world


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_contrastive_two_ranks_with_gradcache(strategy, tmp_path):
    # DDP with SigLIP's ring and Matryoshka widths: the bias, outside DDP, averaged by the recipe
    siglip = ["--loss.kind", "siglip", "--loss.matryoshka-dims", "128", "32"] if strategy == "ddp" else []
    run([*TORCHRUN, "recipes/contrastive.py", "tiny", "--run-dir", str(tmp_path / "run"),
         "--train.steps", "4", "--optim.warmup-steps", "1", "--batch-size", "16", "--gradcache.chunk", "8",
         "--log.no-console", "--dist.strategy", strategy, *siglip])
    result = summary(tmp_path / "run")
    assert result["ranks"] == 2 and result["steps"] == 4
    assert result.get("replicas_identical", True) is True
    assert ("logit_bias" in result) == ("recall_at_1_i2t_d32" in result) == (strategy == "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_autoencoder_two_ranks_reloads_its_best_checkpoint(strategy, tmp_path):
    run([*TORCHRUN, "recipes/autoencoder.py", "--run-dir", str(tmp_path / "run"), "--train.steps", "24",
         "--optim.warmup-steps", "2", "--batch-size", "64", "--data.time-points", "600", "--log.no-console",
         "--dist.strategy", strategy])
    result = summary(tmp_path / "run")
    assert result["steps"] == 24 and result["best_step"] <= 24 and "voxel_corr" in result
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    suffix = ".dcp" if strategy == "fsdp" else ".pt"
    assert (tmp_path / "run" / "checkpoints" / best[0]["file"]).with_suffix(suffix).exists()


# hjepa covers tiny-cpu's CNN (and adds the heads); the ViT's FSDP2 hooks are the risky part of vit-toy.
# Both JEPA recipes wrap the same way (dist.parallelize over stepkit.jepa.jepa_shard_units): the sequences
# run one kind per strategy
# (text under DDP: timeseries' module structure; timeseries' CNN under FSDP2: hjepa's).
@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "preset", "strategy"), [
    ("ijepa", "hjepa", "ddp"), ("ijepa", "hjepa", "fsdp"), ("ijepa", "vit-toy", "fsdp"),
    ("jepa_sequences", "timeseries", "ddp"), ("jepa_sequences", "text", "fsdp"),
])
def test_jepa_two_ranks(recipe, strategy, preset, tmp_path):
    # Under DDP every level's head must get a gradient on every rank (an unused one would hang the
    # all-reduce); under FSDP2 the target encoder's intermediate layers come through forward.
    small = {"timeseries": ["--data.name", "GunPoint", "--data.window", "64", "--data.stride", "32"],
             "text": ["--data.per-topic", "40"]}.get(preset, [])
    run([*TORCHRUN, f"recipes/{recipe}.py", preset, *small, "--run-dir", str(tmp_path / "run"),
         "--train.steps", "3", "--optim.warmup-steps", "1", "--batch-size", "16", "--log.no-console",
         "--eval.no-linear", *(["--eval.no-online"] if recipe == "ijepa" else []),
         "--dist.strategy", strategy])
    assert summary(tmp_path / "run")["ranks"] == 2


@pytest.fixture(scope="session")
def user_files(tmp_path_factory):
    """A folder of 24 photos, 4 shards of 12 (image, class, caption), held-out image-text shards (read
    with MiniLM's tokenizer, by a tiny random text model in its folder): what a user brings."""
    from imagefiles import write_folder, write_shards, write_tiny_text_model

    root = tmp_path_factory.mktemp("files")
    write_folder(root / "photos", 8, labelled=False, nested=True)
    dino = ["recipes/dino.py", "--crops.global-size", "32", "--crops.local-size", "16", "--crops.local-crops",
            "2", "--eval.no-knn", "--eval.no-online"]
    shards, held_out = write_shards(root / "shards", 4, 12), write_shards(root / "val", 1, 8, seed=5)
    return {"shards": [*dino, "--data.shards", shards],
            "photos": [*dino, "--data.root", str(root / "photos")],
            "pair shards": ["recipes/contrastive.py", "--data.shards", shards, "--data.val-shards", held_out,
                            "--model.text", write_tiny_text_model(root / "text-model")]}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="kills the whole process group")
# map-style files (photos) and streamed shards, for DINO's images and contrastive's pairs (a pairs file takes
# the photos' sampler path)
@pytest.mark.parametrize("source", ["shards", "photos", "pair shards"])
def test_files_two_ranks_two_workers_killed_mid_epoch_resume_bit_exact(user_files, source, tmp_path):
    flags = [*user_files[source], "--batch-size", "4", "--optim.warmup-steps", "2", "--data.workers", "2",
             "--log.no-console", "--ckpt.every", "4", "--ckpt.keep-last", "6", "--train.steps", "8"]
    run([*TORCHRUN, *flags, "--run-dir", str(tmp_path / "whole")])
    launcher = subprocess.Popen([*TORCHRUN, *flags, "--run-dir", str(tmp_path / "run")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    saved = tmp_path / "run" / "checkpoints" / "step_00000004.pt"  # every rank's part is in it
    deadline = time.monotonic() + 120
    while not saved.exists():
        assert time.monotonic() < deadline and launcher.poll() is None, "the run never saved step 4"
        time.sleep(0.005)
    os.killpg(launcher.pid, signal.SIGKILL)  # torchrun, both ranks and their DataLoader workers, at once
    launcher.wait(timeout=60)
    assert not (tmp_path / "run" / "summary.json").exists()  # it died mid-epoch, before its end
    run([*TORCHRUN, *flags, "--run-dir", str(tmp_path / "run"), "--resume"])
    assert summary(tmp_path / "run")["params_digest"] == summary(tmp_path / "whole")["params_digest"]


@pytest.mark.slow
@pytest.mark.parametrize("whole", ["fsdp"], indirect=True)
def test_fsdp_sharded_checkpoint_exports_and_evaluates_in_one_process(whole, tmp_path):
    """The teacher gathered from the 2-rank FSDP2 run's last.dcp gives that run's k-NN accuracy, through
    stepkit eval, through an export, and as a new run's starting weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(whole[1], run_dir)
    expected = summary(run_dir)["knn_acc"]
    run([sys.executable, "-m", "stepkit", "eval", str(run_dir)])
    assert json.loads((run_dir / "eval" / "last.json").read_text())["knn_acc"] == expected
    out = tmp_path / "teacher.safetensors"
    run([sys.executable, "-m", "stepkit", "export", str(run_dir), "--part", "teacher", "--out", str(out)])
    run([sys.executable, *DINO, "--run-dir", str(tmp_path / "next"), "--train.steps", "2",
         "--init.from", str(out)])
    assert summary(tmp_path / "next")["knn_acc_init"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("whole", ["ddp"], indirect=True)
def test_stepkit_eval_on_two_ranks_gives_the_one_rank_result(whole, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(whole[1], run_dir)
    run([*TORCHRUN, "-m", "stepkit", "eval", str(run_dir)])
    split = json.loads((run_dir / "eval" / "last.json").read_text())
    assert split["knn_acc"] == summary(run_dir)["knn_acc"]  # what the 1-rank evaluation in the run gave

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from stepkit.config import BestCkptConfig, CkptConfig, TrainConfig
from stepkit.run import params_digest, pick_device
from stepkit.rundir import start_run, write_summary

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits.py")


def test_threads_leave_the_dataloader_workers_their_cores(monkeypatch):
    from stepkit.run import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    try:
        torch.set_num_threads(8)
        assert set_threads(0, device=torch.device("cpu"), workers=3) == 5
        torch.set_num_threads(8)
        assert set_threads(0, device=torch.device("cpu"), workers=12) == 1  # at least one
        torch.set_num_threads(8)
        assert set_threads(0, device=torch.device("cpu"), workers=0) == 8  # torch's own choice
        assert set_threads(0, device=torch.device("cuda"), workers=3) == 8  # the GPU computes
        assert set_threads(3, device=torch.device("cpu"), workers=3) == 3  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        torch.set_num_threads(8)
        assert set_threads(0, device=torch.device("cpu"), workers=3) == 8  # the user's own count stands
        with pytest.raises(ValueError, match="^threads=-1 is not allowed: expected an integer >= 0$"):
            set_threads(-1, device=torch.device("cpu"), workers=0)
    finally:
        torch.set_num_threads(before)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='tpu' .* 'auto', 'cpu', 'cuda'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not allowed here: no CUDA device"):
            pick_device("cuda")


def test_config_pieces_validate():
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="accum=0"):
        TrainConfig(accum=0)
    with pytest.raises(ValueError, match="keep_last=-1"):
        CkptConfig(keep_last=-1)
    with pytest.raises(ValueError, match="keep_best=-1"):
        BestCkptConfig(keep_best=-1)


def test_a_fresh_run_never_overwrites_an_existing_one(tmp_path):
    ckpt_dir = start_run(tmp_path, {"a": 1}, resume=False)
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    (ckpt_dir / "last.pt").write_bytes(b"precious")
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        start_run(tmp_path, {"a": 2}, resume=False)
    assert (ckpt_dir / "last.pt").read_bytes() == b"precious"
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    start_run(tmp_path, {"a": 1}, resume=True)  # checks, writes nothing
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


def test_params_digest_tells_bit_identical_weights_apart():
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert params_digest(a) == params_digest(b)
    with torch.no_grad():
        b.weight[0, 0] = torch.nextafter(b.weight[0, 0], torch.tensor(1.0))  # one ulp
    assert params_digest(a) != params_digest(b)
    assert len(params_digest(a.to(torch.bfloat16))) == 64


def test_summary_is_json(tmp_path):
    write_summary(tmp_path, {"steps": 3, "path": tmp_path, "acc": 0.5})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["path"] == str(tmp_path)
    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    write_summary(tmp_path, {"environment": {"given": 1}})  # one the caller kept is not replaced
    assert json.loads((tmp_path / "summary.json").read_text())["environment"] == {"given": 1}


# --- the example run, as a user runs it ------------------------------------------------------


def run_digits(*args, check=True):
    return subprocess.run(
        [sys.executable, DIGITS, "--log.no-console", *args],
        capture_output=True, text=True, check=check, timeout=300,
    )


@pytest.mark.slow
def test_every_shared_flag_is_on_the_cli():
    help_text = run_digits("--help").stdout
    for flag in ["--run-dir", "--resume", "--device", "--amp", "--train.steps", "--train.seed",
                 "--train.accum", "--optim.lr", "--optim.warmup-steps", "--log.every",
                 "--log.tensorboard", "--log.wandb", "--ckpt.every", "--ckpt.keep-best"]:
        assert flag in help_text, flag


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lr", "-1"], "lr=-1.0 is not allowed: expected a number >= 0.0"),
        (["--train.steps", "10", "--optim.warmup-steps", "20"], "optim.warmup_steps=20 is not allowed"),
        (["--ema.momentum", "1.5"], "momentum=1.5"),
    ],
)
def test_bad_flags_give_a_clear_error_before_any_work(tmp_path, args, message):
    result = run_digits("--run-dir", str(tmp_path / "r"), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_run_directory_contract(tmp_path):
    run = tmp_path / "run"
    run_digits("--run-dir", str(run), "--train.steps", "60", "--eval-every", "20", "--log.every", "10",
               "--ckpt.every", "20", "--log.tensorboard")
    expected = {"config.json", "metrics.jsonl", "checkpoints", "tb", "summary.json"}
    assert {p.name for p in run.iterdir()} == expected
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 60 and config["optim"]["lr"] == 3e-3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and len(summary["params_digest"]) == 64 and summary["wall_s"] > 0
    assert summary["val_acc"] > 0.5  # chance is 0.1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r for r in records)
    assert {"loss", "lr", "grad_norm", "feat_effective_rank"} <= records[0].keys()
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"last.pt", "best.json", "step_00000060.pt"} <= ckpts
    assert any(name.startswith("best_") for name in ckpts)
    again = run_digits("--run-dir", str(run), check=False)
    assert again.returncode != 0 and "--resume" in again.stderr


@pytest.mark.slow
def test_kill_9_then_resume_ends_bit_identical(tmp_path):
    common = ["--train.steps", "1000", "--ckpt.every", "100", "--eval-every", "500", "--log.every", "100"]
    straight = run_digits("--run-dir", str(tmp_path / "straight"), *common)
    assert straight.returncode == 0
    expected = json.loads((tmp_path / "straight" / "summary.json").read_text())["params_digest"]

    run = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, DIGITS, "--log.no-console", "--run-dir", str(run), *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_00000300.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    last_logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]

    resumed = run_digits("--run-dir", str(run), "--resume", *common)
    assert "resumed from" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params_digest"] == expected
    assert summary["steps"] == 1000
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and last_logged >= 300  # one history, no step logged twice
    assert len([s for s in steps if s == 1000]) == 2  # the training line and the val_acc line


@pytest.mark.slow
@pytest.mark.parametrize(("name", "default"), [("dino", 30), ("ijepa", 100), ("jepa_sequences", 100),
                                               ("autoencoder", 50), ("contrastive", 20)])
def test_a_short_run_needs_no_warmup_flag_but_an_explicit_one_is_checked(name, default, tmp_path):
    from conftest import load_recipe

    from stepkit.schedules import warmup_steps_of

    recipe = load_recipe(name)
    parse = recipe.parse  # every recipe has one
    cfg = parse(["--run-dir", str(tmp_path / "r"), "--train.steps", "20"])
    assert cfg.optim.warmup_steps is None and warmup_steps_of(cfg.optim, 20) == 2  # a tenth of the run
    assert warmup_steps_of(cfg.optim, 1500) == default  # the recipe's warm-up once the run is long enough
    with pytest.raises(ValueError, match=r"optim.warmup_steps=21 .*at most train.steps=20"):
        parse(["--run-dir", str(tmp_path / "r"), "--train.steps", "20", "--optim.warmup-steps", "21"])

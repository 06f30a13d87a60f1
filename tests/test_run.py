import contextlib
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
    expected = {"config.json", "metrics.jsonl", "checkpoints", "tb", "summary.json", "provenance.jsonl",
                "recipe.py"}  # the run's own script, copied (stepkit.rundir.record_provenance)
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


# --- the Run construct: one `with`, one call after each update --------------------------------------------

def _run_config(tmp_path, steps=4, every=2, **flags):
    import dataclasses

    from stepkit.config import RunArgs
    from stepkit.log import LogConfig

    @dataclasses.dataclass
    class Config(RunArgs):
        log: LogConfig = dataclasses.field(default_factory=lambda: LogConfig(console=False, every=1))
        ckpt: CkptConfig = dataclasses.field(default_factory=lambda: CkptConfig(every=every))
        train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=steps))

    return Config(run_dir=tmp_path / "run", **flags)


def _train(cfg, *, forget_after=None, stop_at=None, noisy=True):
    """A run of a linear model over a seeded sampler whose batches draw noise when prepared (prefetched)."""
    from stepkit import TrainState, apply_update, forward_loss
    from stepkit.data import train_batches
    from stepkit.run import Run, seed_everything

    run = Run(cfg)
    seed_everything(0)
    model = nn.Linear(3, 1)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    data = torch.utils.data.TensorDataset(torch.arange(24.0).reshape(8, 3) / 24)
    noise = (lambda b: b[0] + torch.rand_like(b[0])) if noisy else (lambda b: b[0])
    batches = train_batches(data, state, batch_size=2, seed=0, prepare=noise, prefetch=True)
    seen = []
    with run.start(state, steps=cfg.train.steps):
        for x in run.batches(batches):
            seen.append(x.clone())
            loss, _ = forward_loss(lambda s, b: (s.model(b).square().mean(), {}), state, x)
            loss.backward()
            apply_update(state, lr=0.1)
            if state.step != forget_after:
                run.after_update({"loss": loss})
            if state.step == stop_at:
                run.stop("stopped early, on purpose")
    return run, state, seen


def test_a_run_resumed_through_run_and_train_batches_sees_the_very_same_batches(tmp_path):
    _, whole, seen_whole = _train(_run_config(tmp_path / "a", steps=6, every=3))
    with pytest.raises(SystemExit) as stopped:  # as if a signal came at step 3: saved, exit 75
        from stepkit import run as run_module

        original = run_module.save_or_stop

        def signal_at_3(ckpt_dir, state, signals, *args, **kwargs):
            if state.step == 3:
                signals.signal_name = "SIGUSR1"  # what the handler records (tests/test_signals.py)
            return original(ckpt_dir, state, signals, *args, **kwargs) or state.step == 3

        run_module.save_or_stop = signal_at_3
        try:
            _train(_run_config(tmp_path / "b", steps=6, every=3))
        finally:
            run_module.save_or_stop = original
    assert stopped.value.code == 75
    cfg = _run_config(tmp_path / "b", steps=6, every=3, resume=True)
    _, resumed, seen_after = _train(cfg)
    assert resumed.data_position == whole.data_position == 6
    assert all(torch.equal(a, b) for a, b in zip(seen_after, seen_whole[3:], strict=True))  # noise included
    assert params_digest(resumed.model) == params_digest(whole.model)


def test_an_update_without_after_update_is_an_error_at_the_next_batch(tmp_path):
    with pytest.raises(RuntimeError, match=r"^update 2 was not followed by run.after_update\(terms\)"):
        _train(_run_config(tmp_path), forget_after=2)
    with pytest.raises(RuntimeError, match=r"^update 4 was not followed"):  # the last one: at the end
        _train(_run_config(tmp_path / "last"), forget_after=4)


def test_run_stop_ends_the_loop_after_saving_and_a_plain_iterable_is_counted(tmp_path, capsys):
    run, state, seen = _train(_run_config(tmp_path, steps=10, every=1), stop_at=3)
    assert state.step == 3 and len(seen) == 3 and "stopped early, on purpose" in capsys.readouterr().out
    names = sorted(p.name for p in run.ckpt_dir.iterdir())
    assert names == ["last.pt", "step_00000003.pt"]  # saved at the stop (--ckpt.keep-last 1)
    summary = run.summary(extra=1)
    assert (summary["steps"], summary["skipped_unreadable"], summary["extra"]) == (3, 0, 1)

    from stepkit import TrainState
    from stepkit.run import Run

    plain = Run(_run_config(tmp_path / "plain", steps=2))
    model = nn.Linear(1, 1)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with plain.start(state, steps=2):
        for _ in plain.batches(iter(range(100))):
            state.step += 1
            plain.after_update({})
    assert state.data_position == 2  # no train_batches: the run counts what it handed out


def test_run_refuses_a_second_after_update_and_a_bare_with(tmp_path):
    from stepkit import TrainState
    from stepkit.run import Run

    run = Run(_run_config(tmp_path))
    with pytest.raises(RuntimeError, match=r"with run.start\(state, steps=...\)"):
        with run:
            pass
    with pytest.raises(RuntimeError, match=r"^iterate run.batches\(...\) inside `with run.start"):
        next(iter(run.batches(range(3))))
    model = nn.Linear(1, 1)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="^run.after_update was called again at step 1"):
        with run.start(state, steps=4):
            for _ in run.batches(range(10)):
                state.step += 1
                run.after_update({})
                run.after_update({})


@pytest.mark.parametrize("ends", ["at its steps", "on an error"])
def test_a_run_ends_its_loader_workers_when_its_loop_ends(ends, tmp_path):
    from test_loader import alive

    from stepkit import TrainState
    from stepkit.data import train_batches
    from stepkit.run import Run

    run = Run(_run_config(tmp_path, steps=2))
    model = nn.Linear(1, 1)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batches = train_batches(torch.utils.data.TensorDataset(torch.ones(16, 1)), state, batch_size=2, seed=0,
                            workers=1)
    failing = ends == "on an error"
    with pytest.raises(RuntimeError, match="the loop failed") if failing else contextlib.nullcontext():
        with run.start(state, steps=2):
            for _ in run.batches(batches):
                pids = [w.pid for w in batches._prefetch.batches._inner._workers]
                assert alive(pids) == pids
                state.step += 1
                run.after_update({})
                if failing:
                    raise RuntimeError("the loop failed")
    assert alive(pids) == []  # the epoch had batches left: only the run's end ended them

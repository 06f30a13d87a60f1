import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from stepkit import TrainState, ema_copy
from stepkit.checkpoint import (
    FORMAT,
    CheckpointError,
    best_checkpoints,
    load_checkpoint,
    maybe_save,
    restore,
    resume,
    save_best,
    save_checkpoint,
    save_last,
    save_periodic,
)


def make_state(hidden=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    return TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()), target=ema_copy(model))


def test_save_then_resume_restores_the_state(tmp_path):
    state = make_state()
    state.step, state.extras["center"] = 7, torch.ones(3)
    save_last(tmp_path, state)
    other = make_state(seed=1)
    other.extras["center"] = torch.zeros(3)
    assert resume(tmp_path, other)
    assert other.step == 7 and torch.equal(other.extras["center"], torch.ones(3))
    for p, q in zip(state.model.parameters(), other.model.parameters()):
        assert torch.equal(p, q)


def test_resume_without_a_checkpoint_is_a_no_op(tmp_path):
    state = make_state()
    assert not resume(tmp_path / "nothing-here", state)
    assert state.step == 0


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = make_state()
    good.step = 3
    path = save_last(tmp_path, good)
    before = path.read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    good.step = 4
    with pytest.raises(OSError, match="disk full"):
        save_last(tmp_path, good)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(path)["state"]["step"] == 3


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_broken_last_pt(tmp_path):
    # A child saves a large checkpoint over and over; it is SIGKILLed mid-save.
    script = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {os.getcwd()!r})
        from torch import nn
        from stepkit import TrainState
        from stepkit.checkpoint import save_last
        model = nn.Linear(2000, 2000)  # 16 MB a save
        state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        while True:
            save_last({str(tmp_path)!r}, state)
            state.step += 1
            print(state.step, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few complete saves first
            assert child.stdout.readline()
        time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["state"]["step"] >= 2
    assert saved["state"]["model"]["weight"].shape == (2000, 2000)


class NotAllowed:
    def __init__(self, x):
        self.x = x


def test_a_checkpoint_that_needs_code_to_load_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "state": NotAllowed(1)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: .*arbitrary code"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = save_last(tmp_path, make_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last.pt: truncated or corrupt"):
        load_checkpoint(path)


def test_a_file_that_is_not_a_stepkit_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a stepkit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_from_another_model_is_refused_with_the_differences(tmp_path):
    path = save_last(tmp_path, make_state(hidden=8))
    expected = r"last.pt: was saved from another model: shape mismatch 0.bias: saved \(8,\), here \(16,\)"
    with pytest.raises(CheckpointError, match=expected):
        restore(make_state(hidden=16), load_checkpoint(path), path)
    deeper = make_state()
    deeper.model.append(nn.Linear(2, 2))
    deeper.target = ema_copy(deeper.model)
    with pytest.raises(CheckpointError, match=r"missing keys \['3.bias', '3.weight'\]"):
        resume(tmp_path, deeper)


def test_keep_the_best_n_by_a_metric(tmp_path):
    state = make_state()
    kept_files = []
    for step, value in [(1, 0.5), (2, 0.3), (3, 0.9), (4, 0.4), (5, 0.1)]:
        state.step = step
        kept_files.append(save_best(tmp_path, state, value, keep_best=2, mode="min") is not None)
    assert kept_files == [True, True, False, True, True]
    assert [(e["step"], e["value"]) for e in best_checkpoints(tmp_path)] == [(5, 0.1), (2, 0.3)]
    assert sorted(p.name for p in tmp_path.glob("best_*.pt")) == ["best_00000002.pt", "best_00000005.pt"]
    assert load_checkpoint(tmp_path / "best_00000005.pt")["state"]["step"] == 5


def test_keep_best_by_a_metric_to_maximise(tmp_path):
    state = make_state()
    for step, value in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        state.step = step
        save_best(tmp_path, state, value, keep_best=1, mode="max")
    assert json.loads((tmp_path / "best.json").read_text()) == [
        {"file": "best_00000002.pt", "step": 2, "value": 0.7}
    ]
    with pytest.raises(ValueError, match="mode='best'"):
        save_best(tmp_path, state, 0.1, keep_best=1, mode="best")


def test_keep_the_last_k_periodic_checkpoints(tmp_path):
    state = make_state()
    for step in range(1, 6):
        state.step = step
        save_periodic(tmp_path, state, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000004.pt", "step_00000005.pt"]


def test_maybe_save_writes_last_and_periodic_every_n_steps(tmp_path):
    state = make_state()
    saved = []
    for step in range(1, 11):
        state.step = step
        saved.append(maybe_save(tmp_path, state, every=4, keep_last=1))
    assert saved == [False, False, False, True, False, False, False, True, False, False]
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] == 8
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000008.pt"]
    # the periodic file keeps its content when last.pt is replaced
    state.step = 12
    maybe_save(tmp_path, state, every=4, keep_last=2)
    assert load_checkpoint(tmp_path / "step_00000008.pt")["state"]["step"] == 8
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] == 12


def test_meta_travels_with_the_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", make_state(), meta={"val_acc": 0.5, "note": "x"})
    assert load_checkpoint(path)["meta"] == {"val_acc": 0.5, "note": "x"}


def test_sharded_format_round_trips_in_one_process_and_refuses_code(tmp_path):
    import pickle

    from stepkit.checkpoint import CheckpointError, load_sharded, save_sharded

    def fresh(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        return TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                          extras={"center": torch.zeros(2), "wall_s": 0.0})

    state = fresh(0)
    state.model(torch.randn(4, 3)).sum().backward()
    state.optimizer.step()
    state.step, state.data_position, state.extras["wall_s"] = 7, 11, 2.5
    state.extras["center"].fill_(3.0)
    path = save_sharded(tmp_path / "last.dcp", state)
    other = fresh(1)
    load_sharded(path, other)
    assert (other.step, other.data_position, other.extras["wall_s"]) == (7, 11, 2.5)
    assert torch.equal(other.extras["center"], torch.full((2,), 3.0))
    for a, b in zip(state.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)
    saved_adam = state.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other.optimizer.state_dict()["state"][0]["exp_avg"], saved_adam)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refused"):
        load_sharded(path, fresh(2))
    assert not (tmp_path / "pwned").exists()


def two_fp16_updates(state):
    from stepkit import accumulate, apply_update, forward_loss

    for _ in range(2):
        loss, _ = forward_loss(lambda s, x: (s.model(x).square().mean(), {}), state, torch.randn(8, 4),
                               amp="fp16")
        assert accumulate(state, loss)
        apply_update(state, lr=0.1)


def trained_state_with_scaler(seed=0):
    """A state that has taken two fp16 updates through a GradScaler: Adam moments, a grown tracker."""
    state = make_state(seed=seed)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    state.extras.update(center=torch.full((3,), 0.5), wall_s=1.25, val_losses=[0.5, 0.25])
    two_fp16_updates(state)
    state.data_position, state.run_id = 5, "run-7"
    return state


def comparable(sd):
    """A state_dict with its tensors as lists, rng left out: equal iff the states are equal."""
    def plain(v):
        if isinstance(v, torch.Tensor):
            return (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain({k: v for k, v in sd.items() if k != "rng"})


def test_both_formats_carry_the_same_train_state_scaler_included(tmp_path):
    from stepkit.checkpoint import load_sharded, save_sharded

    state = trained_state_with_scaler()
    assert state.scaler.state_dict()["_growth_tracker"] == 2
    expected = comparable(state.state_dict(by_name=True))
    save_checkpoint(tmp_path / "one.pt", state)
    save_sharded(tmp_path / "one.dcp", state)
    for load in (lambda s: restore(s, load_checkpoint(tmp_path / "one.pt")),
                 lambda s: load_sharded(tmp_path / "one.dcp", s)):
        fresh = make_state(seed=1)
        fresh.scaler = torch.amp.GradScaler("cpu")
        fresh.extras.update(center=torch.zeros(3), wall_s=0.0, val_losses=[])
        load(fresh)
        assert comparable(fresh.state_dict(by_name=True)) == expected
        assert fresh.scaler.get_scale() == 256.0 and fresh.scaler.state_dict()["_growth_tracker"] == 2


def test_a_scaler_on_one_side_only_is_a_mismatch_not_a_corrupt_file(tmp_path):
    from stepkit.checkpoint import CheckpointMismatch, load_sharded, save_sharded

    save_last(tmp_path, trained_state_with_scaler())
    save_sharded(tmp_path / "other" / "last.dcp", trained_state_with_scaler())
    no_scaler = make_state(seed=1)
    no_scaler.extras.update(center=torch.zeros(3), wall_s=0.0, val_losses=[])
    with pytest.raises(CheckpointMismatch, match="GradScaler"):
        resume(tmp_path, no_scaler)
    with pytest.raises(CheckpointMismatch, match="does not fit this run"):
        load_sharded(tmp_path / "other" / "last.dcp", no_scaler)


def test_fsdp2_resume_restores_the_scaler(gloo_world_of_one, tmp_path):
    from torch.distributed.fsdp import fully_shard

    from stepkit.checkpoint import load_sharded

    def sharded(seed):
        torch.manual_seed(seed)
        model = fully_shard(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        return TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                          scaler=torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3))

    state = sharded(0)
    two_fp16_updates(state)
    assert state.scaler.state_dict()["_growth_tracker"] == 2
    path = save_last(tmp_path, state)
    assert path.name == "last.dcp"
    fresh = sharded(1)
    load_sharded(path, fresh)
    assert fresh.scaler.state_dict() == state.scaler.state_dict()  # its scale and growth tracker too
    assert comparable(fresh.state_dict()) == comparable(state.state_dict())

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_recipe

from stepkit.data import synthetic_fmri
from stepkit.log import metric_history, read_history, should_stop

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "autoencoder.py"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("autoencoder")


def config(recipe, run_dir, **train):
    from stepkit.config import TrainConfig
    from stepkit.log import LogConfig

    return recipe.Config(
        run_dir=run_dir,
        device="cpu",
        train=TrainConfig(**{"steps": 40, **train}),
        optim=recipe.Optim(warmup_steps=5),
        log=LogConfig(every=8, console=False),
        data=recipe.Data(time_points=600, voxels=12),
        model=recipe.Model(hidden=32),
        batch_size=32,
    )


@pytest.mark.slow
def test_default_run_beats_ridge(recipe, tmp_path):
    cfg = recipe.Config(run_dir=tmp_path / "run", device="cpu")
    cfg.log.console = False
    summary = recipe.main(cfg)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved.pop("environment")["threads"] == torch.get_num_threads()  # what the numbers depend on
    assert saved == summary
    assert summary["voxel_corr"] > summary["voxel_corr_ridge"] + 0.1
    assert summary["voxel_corr"] < summary["voxel_corr_ceiling"]
    assert summary["wall_s"] < 180
    assert {"voxel_corr_median", "voxel_corr_frac_above_0.1", "test_recon_video", "ridge_alpha",
            "params_digest", "best_step"} <= summary.keys()


def assert_eval_scores_the_best_checkpoint_as_the_run_did(run_dir, summary):
    """stepkit eval rebuilds the run's series from the checkpoint's record and scores the test block."""
    from conftest import assert_map

    from stepkit.probe import evaluate_checkpoint

    result = evaluate_checkpoint(run_dir, "autoencoder", checkpoint="best", map_to=run_dir / "map.png")
    assert result["step"] == summary["best_step"]
    for key in ("voxel_corr", "voxel_corr_median", "voxel_corr_frac_above_0.1"):
        assert result[key] == pytest.approx(summary[key], abs=1e-6), key
    assert_map(result, run_dir / "map.png", classes=5)  # the test block's fifths, by time
    with pytest.raises(ValueError, match="this part predicts voxels"):
        evaluate_checkpoint(run_dir, "autoencoder", train_root=run_dir)


def test_early_stopping_stops_at_the_first_epoch_without_improvement(recipe, tmp_path):
    cfg = config(recipe, tmp_path / "run", steps=2000)
    cfg.patience = 2
    summary = recipe.main(cfg)
    steps, losses = metric_history(read_history(tmp_path / "run"), "val_loss")
    assert summary["steps"] == steps[-1] < 2000
    assert should_stop(losses, patience=2) and not should_stop(losses[:-1], patience=2)
    assert summary["best_step"] == steps[int(np.argmin(losses))]
    assert_eval_scores_the_best_checkpoint_as_the_run_did(tmp_path / "run", summary)


def test_few_step_run_on_a_users_npz(recipe, tmp_path):
    arrays = synthetic_fmri(seed=5, time_points=500, voxels=6)
    np.savez(tmp_path / "subject.npz", **{k: arrays[k] for k in ("video", "audio", "text", "fmri")})
    cfg = config(recipe, tmp_path / "run", steps=16)
    cfg.data.path = tmp_path / "subject.npz"
    summary = recipe.main(cfg)
    assert summary["steps"] == 16 and "voxel_corr_ceiling" not in summary
    assert np.isfinite(summary["voxel_corr"])
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "metrics.jsonl", "checkpoints",
                                                              "summary.json", "provenance.jsonl", "recipe.py"}
    ran = json.loads((tmp_path / "run" / "provenance.jsonl").read_text())["recipe"]
    assert ran.endswith("autoencoder.py")
    assert (tmp_path / "run" / "recipe.py").read_bytes() == Path(ran).read_bytes()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(g["fused"] for g in saved["state"]["optimizer"]["param_groups"])  # no host read per update
    assert_eval_scores_the_best_checkpoint_as_the_run_did(tmp_path / "run", summary)  # read from the .npz


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_takes_the_shared_flags_and_refuses_bad_data(tmp_path):
    result = run_cli("--run-dir", str(tmp_path / "run"), "--train.steps", "12", "--optim.lr", "3e-4",
                     "--optim.warmup-steps", "2", "--data.time-points", "400", "--log.no-console")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["lr"] == 3e-4
    bad = run_cli("--run-dir", str(tmp_path / "bad"), "--data.path", str(tmp_path / "missing.npz"))
    assert bad.returncode != 0 and "data.path=" in bad.stderr and "no such file" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    bad = run_cli("--run-dir", str(tmp_path / "bad"), "--loss.fmri-weight", "-1")
    assert bad.returncode != 0 and "fmri_weight=-1.0" in bad.stderr


def test_tune_entry_points_measure_instead_of_training(recipe, tmp_path):
    from stepkit.tuning import TuneConfig

    cfg = config(recipe, tmp_path / "run")
    cfg.tune = TuneConfig(find_lr=True, lr_steps=20, find_batch=True, memory_cap_gb=0.01, max_batch=2048)
    out = recipe.main(cfg)
    saved = json.loads((tmp_path / "run" / "tune.json").read_text())
    assert saved["suggested_lr"] == out["suggested_lr"] > 0 and len(saved["lrs"]) >= 3
    assert 1 <= saved["largest_batch"] < 2048
    # a measurement is no run: nothing but its numbers and plot, so the training run may use the folder
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lr_range.png", "tune.json"]

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("ijepa")


def test_few_step_run_writes_the_run_directory(recipe, tmp_path):
    cfg = recipe.parse(["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--log.no-console",
                        "--train.steps", "4", "--optim.warmup-steps", "1", "--batch-size", "16",
                        "--optim.lr", "0.002"])
    assert cfg.optim.lr == 0.002
    summary = recipe.main(cfg)
    assert summary["steps"] == 4
    expected = {"knn_acc", "knn_acc_random_init", "knn_acc_pixels", "effective_rank", "params_digest"}
    assert expected <= summary.keys()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_bad_mask_config_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "recipes/ijepa.py", "--run-dir", str(tmp_path / "r"),
                          "--mask.target-scale", "0.5", "0.1"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "target_scale" in out.stderr
    assert not (tmp_path / "r").exists()


def test_paper_preset_has_the_papers_settings(recipe, tmp_path):
    cfg = recipe.parse(["vit-h14", "--run-dir", str(tmp_path / "r")])
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.pos_embed) == ("vit-huge", 14, "sincos")
    assert (cfg.mask.targets, cfg.mask.target_scale, cfg.mask.target_aspect) == (4, (0.15, 0.2), (0.75, 1.5))
    assert cfg.mask.context_scale == (0.85, 1.0)
    assert (cfg.optim.wd, cfg.optim.wd_final) == (0.04, 0.4)
    assert (cfg.ema.momentum, cfg.ema.momentum_final) == (0.996, 1.0)

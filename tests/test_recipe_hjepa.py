import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--log.no-console", "--optim.warmup-steps", "1", "--batch-size", "16"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("hjepa")


def test_level_schedules_are_constant_or_cosine(recipe):
    assert recipe.level_values_at(7, (0.25, 1.0), None, 10) == [0.25, 1.0]
    start, final = (1.0, 0.5), (0.0, 1.0)
    assert recipe.level_values_at(0, start, final, 10) == [1.0, 0.5]
    assert recipe.level_values_at(10, start, final, 10) == [0.0, 1.0]
    mid = recipe.level_values_at(5, start, final, 10)  # half-way: the mean of start and final
    assert mid == pytest.approx([0.5, 0.75], abs=1e-12)
    quarter = recipe.level_values_at(2, start, final, 8)  # cos(pi / 4)
    assert quarter[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)


def test_two_levels_need_only_their_depths_and_weights(recipe, tmp_path):
    # the docstring's example: lr scales default to 1 for however many levels there are
    cfg = recipe.parse(["--run-dir", str(tmp_path / "r"), "--levels.depths", "2", "4",
                        "--levels.weights", "0.5", "1", "--levels.weights-final", "0", "1"])
    assert cfg.levels.depths == (2, 4) and cfg.levels.lr_scales is None


def test_head_parameters_get_their_own_groups(recipe):
    assert recipe.head_level("heads.2.weight") == 3
    assert recipe.head_level("heads.0.bias") == 1
    assert recipe.head_level("encoder.blocks.0.attn.qkv.weight") == 0
    assert recipe.head_level("predictor.out.weight") == 0


def test_few_step_run_weights_each_level_by_its_schedule(recipe, tmp_path):
    run = tmp_path / "run"
    cfg = recipe.parse(["--run-dir", str(run), *FAST, "--train.steps", "4", "--log.every", "1",
                        "--optim.lr", "0.002", "--levels.weights", "1", "0.5", "0.25",
                        "--levels.weights-final", "0", "0.5", "1"])
    assert cfg.optim.lr == 0.002
    summary = recipe.main(cfg)
    assert summary["steps"] == 4
    expected = {"knn_acc", "knn_acc_random_init", "knn_acc_pixels", "effective_rank", "params_digest"}
    assert expected <= summary.keys()
    assert (run / "checkpoints" / "last.pt").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss_depth2" in r]
    assert len(rows) == 4
    for i, row in enumerate(rows):  # the loss of update i used the weights of step i
        weights = recipe.level_values_at(i, (1, 0.5, 0.25), (0, 0.5, 1), 4)
        assert [row[f"weight_depth{d}"] for d in (2, 3, 4)] == pytest.approx(weights, abs=1e-6)
        total = sum(w * row[f"loss_depth{d}"] for w, d in zip(weights, (2, 3, 4)))
        assert row["loss"] == pytest.approx(total, rel=1e-5)
        for d in (2, 3, 4):
            assert row[f"depth{d}_target_effective_rank"] > 1 and f"depth{d}_pred_std" in row


def test_a_head_with_lr_scale_zero_stays_put(recipe, tmp_path):
    run = tmp_path / "run"
    cfg = recipe.parse(["--run-dir", str(run), *FAST, "--train.steps", "3", "--levels.depths", "2", "4",
                        "--levels.weights", "1", "1", "--levels.lr-scales", "0", "1",
                        "--ckpt.every", "1", "--ckpt.keep-last", "3"])
    recipe.main(cfg)

    def model_at(step):
        return torch.load(run / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["state"]["model"]

    before, after = model_at(2), model_at(3)
    assert torch.equal(before["heads.0.weight"], after["heads.0.weight"])
    assert not torch.equal(before["heads.1.weight"], after["heads.1.weight"])
    assert not torch.equal(before["encoder.blocks.0.mlp.0.weight"], after["encoder.blocks.0.mlp.0.weight"])


def test_mask_picture_goes_to_tensorboard(recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe.main(recipe.parse(["--run-dir", str(run), *FAST, "--train.steps", "2", "--log.tensorboard",
                              "--mask-image-every", "1"]))
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    pictures = events.Images("masks")
    assert [p.step for p in pictures] == [1, 2]
    assert (pictures[0].width, pictures[0].height) == (4 * 32, 32)  # four samples side by side


@pytest.mark.parametrize(("flags", "message"), [
    (["--levels.depths", "2", "4", "--levels.weights", "1", "1", "1"],
     "levels.weights.*one value per level: 2"),
    (["--levels.depths", "3", "2"], "levels.depths.*increasing"),
    (["--levels.depths", "2", "9", "--levels.weights", "1", "1"],
     "levels.depths.*up to the encoder's depth, 4"),
    (["--levels.depths", "2", "4", "--levels.weights", "1", "1", "--levels.lr-scales-final", "1"],
     "levels.lr_scales_final.*one value per level: 2"),
])
def test_bad_level_config_is_a_clear_error(tmp_path, flags, message):
    out = subprocess.run([sys.executable, "recipes/hjepa.py", "--run-dir", str(tmp_path / "r"), *flags],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert re.search(message, " ".join(out.stderr.split())), out.stderr

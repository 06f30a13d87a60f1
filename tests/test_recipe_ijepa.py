import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import crash_after_step, load_recipe

from stepkit import lr_at, momentum_at
from stepkit.jepa import level_values_at

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--log.no-console", "--optim.warmup-steps", "1", "--batch-size", "16",
        "--eval.no-linear"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("ijepa")


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_run_reports_both_probes_for_trained_untrained_and_pixels(recipe, tmp_path):
    run = tmp_path / "run"
    cfg = recipe.parse(["--run-dir", str(run), "--device", "cpu", "--log.no-console", "--train.steps", "4",
                        "--optim.warmup-steps", "1", "--batch-size", "16", "--optim.lr", "0.002"])
    assert (cfg.optim.lr, cfg.model.arch, cfg.levels.resolved(5)) == (0.002, "cnn", ((5,), (1.0,)))
    summary = recipe.main(cfg)
    assert summary["steps"] == 4 and summary["probe_layers"] == 4
    for kind in ("linear_acc", "knn_acc"):
        for suffix in ("", "_random_init", "_context_encoder"):
            last, concat = summary[f"{kind}_last_layer{suffix}"], summary[f"{kind}_last_layers{suffix}"]
            assert summary[f"{kind}{suffix}"] == max(last, concat)  # the better of the two probes
        assert 0 < summary[f"{kind}_pixels"] <= 1
    assert (run / "checkpoints" / "last.pt").exists()
    assert not any(k.startswith("heads.") for k in torch.load(run / "checkpoints" / "last.pt",
                                                               weights_only=True)["state"]["model"])
    row = [r for r in rows_of(run) if "loss_depth5" in r][-1]  # one level: the last stage
    assert row["loss"] == pytest.approx(row["loss_depth5"], rel=1e-6)
    assert {"depth5_target_effective_rank", "depth5_target_std", "context_pooled_std"} <= row.keys()


@pytest.mark.slow
def test_untrained_baseline_is_the_network_before_training(recipe, tmp_path):
    # the same seed trains for 0 or 3 updates: the untrained numbers are the same, the trained ones move
    a = recipe.main(recipe.parse(["--run-dir", str(tmp_path / "a"), *FAST, "--train.steps", "3",
                                  "--optim.lr", "0.01"]))
    b = recipe.main(recipe.parse(["--run-dir", str(tmp_path / "b"), *FAST, "--train.steps", "1"]))
    assert a["knn_acc_random_init"] == b["knn_acc_random_init"] and a["knn_acc_pixels"] == b["knn_acc_pixels"]
    assert a["params_digest"] != b["params_digest"]


@pytest.mark.slow
def test_vit_preset_runs_with_the_transformer_predictor(recipe, tmp_path):
    cfg = recipe.parse(["vit-toy", "--run-dir", str(tmp_path / "run"), *FAST, "--train.steps", "3"])
    assert (cfg.model.arch, cfg.model.predictor_dim) == ("vit-toy", 64)
    summary = recipe.main(cfg)
    assert summary["steps"] == 3 and summary["probe_layers"] == 4


def test_levels_resolve_to_the_last_layer_or_the_given_depths(recipe, tmp_path):
    cfg = recipe.parse(["--run-dir", str(tmp_path / "r"), "--levels.depths", "1", "3"])
    assert cfg.levels.resolved(3) == ((1, 3), (1.0, 1.0)) and cfg.levels.lr_scales is None
    assert recipe.parse(["hjepa", "--run-dir", str(tmp_path / "r")]).levels.resolved(5) == (
        (3, 4, 5), (0.25, 0.5, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn", "vit-toy"])
def test_hierarchical_run_weights_each_level_by_its_schedule(recipe, tmp_path, arch):
    run = tmp_path / "run"
    depths = (3, 4, 5) if arch == "cnn" else (2, 3, 4)
    cfg = recipe.parse(["hjepa", "--run-dir", str(run), *FAST, "--model.arch", arch, "--train.steps", "4",
                        "--log.every", "1", "--levels.depths", *map(str, depths),
                        "--levels.weights", "1", "0.5", "0.25", "--levels.weights-final", "0", "0.5", "1"])
    summary = recipe.main(cfg)
    assert summary["steps"] == 4
    rows = [r for r in rows_of(run) if f"loss_depth{depths[0]}" in r]
    assert len(rows) == 4
    for i, row in enumerate(rows):  # the loss of update i used the weights of step i
        weights = level_values_at(i, (1, 0.5, 0.25), (0, 0.5, 1), 4)
        assert [row[f"weight_depth{d}"] for d in depths] == pytest.approx(weights, abs=1e-6)
        total = sum(w * row[f"loss_depth{d}"] for w, d in zip(weights, depths))
        assert row["loss"] == pytest.approx(total, rel=1e-5)
        for d in depths:  # every level's own collapse metrics
            assert row[f"depth{d}_target_effective_rank"] > 1 and f"depth{d}_pred_std" in row


@pytest.mark.slow
def test_a_head_with_lr_scale_zero_stays_put(recipe, tmp_path):
    run = tmp_path / "run"
    cfg = recipe.parse(["--run-dir", str(run), *FAST, "--train.steps", "3", "--levels.depths", "2", "3",
                        "--levels.weights", "1", "1", "--levels.lr-scales", "0", "1",
                        "--ckpt.every", "1", "--ckpt.keep-last", "3"])
    recipe.main(cfg)

    def model_at(step):
        return torch.load(run / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["state"]["model"]

    before, after = model_at(2), model_at(3)
    assert torch.equal(before["heads.0.weight"], after["heads.0.weight"])
    assert not torch.equal(before["heads.1.weight"], after["heads.1.weight"])
    assert not torch.equal(before["encoder.convs.0.weight"], after["encoder.convs.0.weight"])


@pytest.mark.slow
def test_variance_guard_adds_its_weighted_terms(recipe, tmp_path):
    run = tmp_path / "run"
    recipe.main(recipe.parse(["--run-dir", str(run), *FAST, "--train.steps", "2", "--log.every", "1",
                              "--loss.var-weight", "2", "--loss.cov-weight", "0.5"]))
    for row in [r for r in rows_of(run) if "var_loss" in r]:
        expected = row["loss_depth5"] + 2 * row["var_loss"] + 0.5 * row["cov_loss"]
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["var_loss"] > 0  # pooled embeddings of std well below gamma=1


@pytest.mark.slow
def test_collapse_alarm_names_the_metric(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--train.steps", "4", "--log.every", "1", "--alarm.min-std", "10", "--alarm.patience", "2"]
    summary = recipe.main(recipe.parse(["--run-dir", str(run), *FAST, *flags]))
    assert "collapse warning: depth5_target_std below 10 for 2 intervals" in capsys.readouterr().out
    assert summary["collapse_warning"].startswith("collapse warning: depth5_target_std")
    assert any("collapse_warning" in r for r in rows_of(run))
    quiet = recipe.main(recipe.parse(["--run-dir", str(tmp_path / "quiet"), *FAST, "--train.steps", "2"]))
    assert quiet["collapse_warning"] == ""


@pytest.mark.slow
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
    (["--levels.depths", "2", "3", "--levels.weights", "1", "1", "1"],
     "levels.weights.*one value per level: 2"),
    (["--levels.depths", "3", "2"], "levels.depths.*increasing"),
    (["--levels.depths", "2", "9"], "levels.depths.*stages up to the encoder's depth, 5"),
    (["vit-toy", "--levels.depths", "2", "9"], "levels.depths.*blocks up to the encoder's depth, 4"),
    (["--levels.depths", "2", "3", "--levels.lr-scales-final", "1"],
     "levels.lr_scales_final.*one value per level"),
    (["--mask.target-scale", "0.5", "0.1"], "target_scale"),
    (["--model.strides", "1", "2"], "model.strides.*one stride per stage"),
    (["--model.dilations", "1", "2"], "model.dilations.*one dilation >= 1 per stage"),
    (["--data.image-size", "30"], "data.image_size.*multiple of the product of model.strides"),
    (["--loss.var-weight", "-1"], "loss.var_weight"),
])
@pytest.mark.slow
def test_bad_config_is_a_clear_error(recipe, tmp_path, flags, message):
    preset = flags[:1] if not flags[0].startswith("--") else []
    with pytest.raises(ValueError) as err:
        recipe.parse([*preset, "--run-dir", str(tmp_path / "r"), *flags[len(preset):]])
    assert re.search(message, " ".join(str(err.value).split())), err.value
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_bad_config_from_the_command_line_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "recipes/ijepa.py", "--run-dir", str(tmp_path / "r"),
                          "--model.dilations", "1", "0", "1", "1", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "model.dilations" in out.stderr and "one dilation >= 1 per stage" in out.stderr
    assert not (tmp_path / "r").exists()


def test_paper_presets_have_the_papers_settings(recipe, tmp_path):
    for name in ("vit-h14", "hjepa-vit-h14"):
        cfg = recipe.parse([name, "--run-dir", str(tmp_path / "r")])
        assert (cfg.model.arch, cfg.model.patch_size, cfg.model.pos_embed) == ("vit-huge", 14, "sincos")
        mask = cfg.mask
        assert (mask.targets, mask.target_scale, mask.target_aspect) == (4, (0.15, 0.2), (0.75, 1.5))
        assert (cfg.mask.context_scale, cfg.mask.sampler) == ((0.85, 1.0), "ijepa")
        assert (cfg.optim.wd, cfg.optim.wd_final) == (0.04, 0.4)
        assert (cfg.ema.momentum, cfg.ema.momentum_final) == (0.996, 1.0)
        # in1k_vith14_ep300.yaml: 128 per GPU x 16, no flip, start_lr 2e-4, EMA linear, the encoder's heads
        assert cfg.batch_size * 16 == 2048 and cfg.data.flip_p == 0.0 and cfg.data.crop_scale == (0.3, 1.0)
        assert (cfg.optim.lr, cfg.optim.warmup_start_lr, cfg.optim.min_lr) == (1e-3, 2e-4, 1e-6)
        assert (cfg.train.steps, cfg.optim.warmup_steps) == (300 * 625, 40 * 625)
        assert cfg.model.predictor_heads == 16 and not cfg.model.class_token
        assert cfg.model.weight_init == "ijepa"  # std 0.02 patch embedding, fix_init_weight's rescaling
        assert (cfg.model.predictor_dim, cfg.model.predictor_depth) == (384, 12)
        total = cfg.train.steps  # linear: a quarter of the way, a quarter of the rise
        assert momentum_at(total // 4, cfg.ema, total) == pytest.approx(0.996 + 0.004 / 4)
        assert momentum_at(3 * total // 4, cfg.ema, total) == pytest.approx(0.996 + 3 * 0.004 / 4)
        assert lr_at(0, cfg.optim, total) == pytest.approx(2e-4)
    assert recipe.parse(["hjepa-vit-h14", "--run-dir", "r"]).levels.depths == (8, 16, 24, 32)
    s16 = recipe.parse(["vit-s16", "--run-dir", str(tmp_path / "r")])
    assert (s16.model.arch, s16.model.patch_size, s16.batch_size) == ("vit-small", 16, 256)
    assert s16.model.predictor_heads == 6 and s16.data.flip_p == 0.0  # ViT-S's own 6 heads
    assert s16.model.weight_init == "ijepa" and recipe.parse([]).model.weight_init == "stepkit"


def test_flip_off_leaves_the_crop_unmirrored():
    from stepkit.augment import random_resized_crop

    images = torch.rand(8, 3, 16, 16)
    same = random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(same, images, atol=1e-5)
    mirrored = random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(mirrored, images.flip(-1), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-cpu", "hjepa", "vit-toy"])
def test_a_crashed_run_resumes_bit_identical(recipe, tmp_path, monkeypatch, preset):
    def flags(run):
        return [preset, "--run-dir", str(run), *FAST, "--train.steps", "6", "--ckpt.every", "3",
                "--eval.k", "5"]

    straight = recipe.main(recipe.parse(flags(tmp_path / "straight")))
    crash_after_step(recipe, monkeypatch, recipe.parse(flags(tmp_path / "crashed")))
    resumed = recipe.main(recipe.parse([*flags(tmp_path / "crashed"), "--resume"]))
    assert resumed["params_digest"] == straight["params_digest"]
    assert resumed["knn_acc"] == straight["knn_acc"]  # the target encoder (and its BatchNorm statistics) too


@pytest.mark.slow
def test_the_multiscale_loss_learns_on_images(recipe, tmp_path):
    run = tmp_path / "run"
    recipe.main(recipe.parse(["--run-dir", str(run), *FAST, "--train.steps", "16", "--log.every", "1",
                              "--loss.kind", "multiscale", "--eval.k", "5"]))
    losses = [r["loss"] for r in rows_of(run) if "loss" in r]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])  # the predictor learns the targets

"""The JEPA sequences recipe on time series and text: runs, baselines, loss variants, bad input, resume."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_after_step, load_recipe

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--log.no-console", "--optim.warmup-steps", "1", "--batch-size", "16",
        "--eval.no-linear", "--eval.k", "5"]
SERIES = ["timeseries", "--data.name", "GunPoint", "--data.window", "64", "--data.stride", "32"]
TEXT = ["text", "--data.per-topic", "40"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("jepa_sequences")


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_timeseries_preset_reports_probes_against_untrained_and_raw(recipe, tmp_path):
    run = tmp_path / "run"
    cfg = recipe.parse([*SERIES, "--run-dir", str(run), *FAST[:-3], "--train.steps", "4"])
    assert (cfg.data.kind, cfg.mask.span, cfg.mask.ratio) == ("timeseries", 16, 0.5)
    summary = recipe.main(cfg)
    assert summary["steps"] == 4 and summary["probe_layers"] == 4
    for kind in ("linear_acc", "knn_acc"):
        for suffix in ("", "_random_init", "_context_encoder"):
            assert summary[f"{kind}{suffix}"] == max(summary[f"{kind}_last_layer{suffix}"],
                                                     summary[f"{kind}_last_layers{suffix}"])
        assert 0 < summary[f"{kind}_raw"] <= 1
    row = [r for r in rows_of(run) if "loss_depth4" in r][-1]
    assert row["loss"] == pytest.approx(row["loss_depth4"], rel=1e-6)
    assert 0.4 < row["masked_fraction"] < 0.8  # spans cover at least half of each window


@pytest.mark.slow
def test_text_preset_reports_probes_against_bag_of_words(recipe, tmp_path):
    cfg = recipe.parse([*TEXT, "--run-dir", str(tmp_path / "run"), *FAST[:-3], "--train.steps", "3"])
    assert (cfg.data.kind, cfg.mask.ratio, cfg.mask.random_token_p) == ("text", 0.15, 0.1)
    summary = recipe.main(cfg)
    assert summary["steps"] == 3 and 0 < summary["linear_acc_bow"] <= 1 and 0 < summary["knn_acc_bow"] <= 1
    assert {"linear_acc", "linear_acc_random_init"} <= summary.keys()


def test_the_context_encoder_never_sees_a_masked_time_step(recipe):
    from stepkit.models.sequence import MaskedTemporalCNN

    net = MaskedTemporalCNN(in_chans=2, widths=(4, 8), dilations=(1, 2)).train()
    x = torch.randn(3, 2, 20)
    visible = torch.ones(3, 20, dtype=torch.bool)
    visible[:, 5:11] = False
    changed = x.clone()
    changed[:, :, 5:11] = 1000.0
    torch.testing.assert_close(net(x, visible), net(changed, visible))
    assert not torch.equal(net(x), net(changed))  # the target encoder (everything visible) does see them


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "data"), [  # mse: jepa_loss, tested by hand in test_jepa_losses
    ("contrastive", SERIES), ("multiscale", SERIES), ("contrastive", TEXT),
], ids=["contrastive-ts", "multiscale-ts", "contrastive-text"])
def test_each_loss_variant_learns_on_each_kind(recipe, tmp_path, loss, data):
    run = tmp_path / "run"
    extra = ["--loss.negative-samples", "8"] if loss == "contrastive" and data is TEXT else []
    recipe.main(recipe.parse([*data, "--run-dir", str(run), *FAST, "--train.steps", "16", "--log.every", "1",
                              "--optim.lr", "3e-3", "--loss.kind", loss, *extra]))
    losses = [r["loss"] for r in rows_of(run) if "loss" in r]
    assert len(losses) == 16 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # the predictor learns the targets


def write_series(path: Path, **arrays) -> Path:
    g = np.random.default_rng(0)
    base = {"x_train": g.normal(size=(30, 2, 40)), "y_train": np.arange(30) % 3,
            "x_test": g.normal(size=(12, 2, 40)), "y_test": np.arange(12) % 3}
    np.savez(path, **{**base, **arrays})
    return path


def test_your_own_series_from_an_npz(recipe, tmp_path):
    data = write_series(tmp_path / "mine.npz")
    summary = recipe.main(recipe.parse(["timeseries", "--data.path", str(data), "--data.window", "32",
                                        "--run-dir", str(tmp_path / "run"), *FAST, "--train.steps", "2"]))
    assert summary["steps"] == 2 and 0 <= summary["knn_acc_raw"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(("arrays", "flags", "message"), [
    ({"x_train": np.zeros(30)}, [], "array 'x_train' has shape \\(30,\\); expected \\(series, time\\)"),
    ({"y_train": np.arange(29)}, [], "array 'y_train' has shape \\(29,\\); expected \\(30,\\)"),
    ({"x_test": np.full((12, 2, 40), np.nan)}, [], "array 'x_test' has 960 NaN"),
    ({"x_test": np.zeros((12, 3, 40))}, [], "'x_train' has 2 channels and 'x_test' 3"),
    ({"y_test": np.zeros(12) + 0.5}, [], "array 'y_test' has dtype float64; expected integer"),
    ({}, ["--data.window", "64"], "data.window=64 is not allowed: .*at most the shortest series' length, 40"),
])
def test_bad_series_stop_before_any_work_naming_the_array(recipe, tmp_path, arrays, flags, message):
    data = write_series(tmp_path / "bad.npz", **arrays)
    argv = ["timeseries", "--data.path", str(data), "--data.window", "32", *flags, "--run-dir",
            str(tmp_path / "run"), *FAST]
    with pytest.raises(ValueError) as err:
        recipe.main(recipe.parse(argv))
    assert re.search(message, str(err.value)), err.value
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["timeseries", "--mask.ratio", "0"], "mask.ratio=0.0 is not allowed: expected a number in \\(0, 1\\)"),
    (["timeseries", "--mask.ratio", "1"], "mask.ratio=1.0"),
    (["text", "--mask.ratio", "1.5"], "mask.ratio=1.5"),
    (["timeseries", "--mask.span", "200"], "mask.span=200 is not allowed: expected at most data.window=128"),
    (["timeseries", "--data.name", "Nope"], "data.name='Nope' is not allowed: expected one of 'ArrowHead'"),
    (["timeseries", "--levels.depths", "5"], "levels.depths=\\(5,\\) .*layers up to the encoder's depth, 4"),
    (["text", "--model.transformer-dim", "30"], "model.transformer_dim=30 .*a positive multiple"),
    (["timeseries", "--loss.scales", "1", "2", "--loss.scale-weights", "1"], "loss.scale_weights"),
    (["timeseries", "--loss.temperature", "0"], "loss.temperature=0.0"),
])
def test_bad_sequence_config_names_the_field(recipe, tmp_path, flags, message):
    with pytest.raises(ValueError) as err:
        recipe.parse([*flags, "--run-dir", str(tmp_path / "r")])
    assert re.search(message, " ".join(str(err.value).split())), err.value
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_window_longer_than_the_series_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "recipes/jepa_sequences.py", "timeseries", "--data.name",
                          "GunPoint", "--data.window", "200", "--run-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "data.window=200 is not allowed" in out.stderr and "150 (GunPoint)" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("data", [SERIES, TEXT], ids=["timeseries", "text"])
def test_a_crashed_sequence_run_resumes_bit_identical(recipe, tmp_path, monkeypatch, data):
    def flags(run):
        return [*data, "--run-dir", str(run), *FAST, "--train.steps", "6", "--ckpt.every", "3"]

    straight = recipe.main(recipe.parse(flags(tmp_path / "straight")))
    crash_after_step(recipe, monkeypatch, recipe.parse(flags(tmp_path / "crashed")))
    resumed = recipe.main(recipe.parse([*flags(tmp_path / "crashed"), "--resume"]))
    assert resumed["params_digest"] == straight["params_digest"]
    assert resumed["knn_acc"] == straight["knn_acc"]

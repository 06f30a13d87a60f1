"""DINO and I-JEPA on a user's image files: unlabelled folders, labelled evaluation sets, tar shards."""

import json

import pytest
from conftest import crash_after_step, load_recipe
from imagefiles import write_folder, write_shards

SMALL = {
    "dino": ["--batch-size", "8", "--crops.global-size", "32", "--crops.local-size", "16",
             "--crops.local-crops", "2", "--model.out-dim", "32", "--model.head-hidden", "32",
             "--optim.warmup-steps", "2"],
    "ijepa": ["--batch-size", "8", "--optim.warmup-steps", "2", "--eval.no-linear"],
    "contrastive": ["--batch-size", "8", "--optim.warmup-steps", "2", "--data.image-size", "32"],
}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """An unlabelled nested folder, labelled train / val folders, and 4 shards: the files a user has."""
    root = tmp_path_factory.mktemp("images")
    write_folder(root / "photos", 8, labelled=False, nested=True, seed=2)
    write_folder(root / "train", 6)
    write_folder(root / "val", 3, seed=1)
    return root, write_shards(root / "shards", 4, 6, seed=3)


def run(name, run_dir, *flags, crash_at=None, monkeypatch=None):
    recipe = load_recipe(name)
    cfg = recipe.parse(["--run-dir", str(run_dir), "--device", "cpu", "--log.no-console", *SMALL[name],
                        *flags])
    if crash_at is not None:
        crash_after_step(recipe, monkeypatch, cfg, step=crash_at)
        return None
    return recipe.main(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "ijepa"])
def test_an_unlabelled_folder_trains_and_a_labelled_pair_evaluates(name, data, tmp_path, capsys):
    root, _ = data
    summary = run(name, tmp_path / "run", "--data.root", str(root / "photos"), "--eval.train-root",
                  str(root / "train"), "--eval.val-root", str(root / "val"), "--train.steps", "4",
                  "--eval.k", "3", "--data.workers", "2")
    out = capsys.readouterr().out
    assert f"data.root '{root / 'photos'}': 24 images (3 sub-folders)" in out
    assert "evaluation: 3 classes, 18 labelled training images" in out and "9 held-out" in out
    assert summary["steps"] == 4 and summary["skipped_unreadable"] == 0
    assert 0.0 <= summary["knn_acc"] <= 1.0 and "knn_acc_pixels" in summary


@pytest.mark.slow
@pytest.mark.parametrize("name, source, workers, crash_at", [
    ("dino", "shards", 2, 5),  # odd: the resumed loader's first batch comes from worker 1
    ("dino", "photos", 0, 5),  # with 2 workers: tests/test_torchrun.py's photos, 2 ranks x 2 workers
    ("ijepa", "shards", 0, 4),  # with workers: dino's case above and tests/test_torchrun.py's shards
])
def test_a_run_on_files_resumes_bit_exact(name, source, workers, crash_at, data, tmp_path, monkeypatch):
    root, pattern = data
    where = ["--data.shards", pattern] if source == "shards" else ["--data.root", str(root / source)]
    # 9 updates of 8: three epochs of the 24 samples, so the crash and the resume cross an epoch
    flags = [*where, "--train.steps", "9", "--data.workers", str(workers), "--ckpt.every", "1"]
    flags += ["--eval.no-knn"] if name == "dino" else []
    whole = run(name, tmp_path / "whole", *flags)
    run(name, tmp_path / "run", *flags, crash_at=crash_at, monkeypatch=monkeypatch)
    resumed = run(name, tmp_path / "run", *flags, "--resume")
    assert resumed["params_digest"] == whole["params_digest"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["workers"] == workers


@pytest.mark.slow
def test_shards_without_labelled_images_train_and_say_evaluation_is_skipped(data, tmp_path, capsys):
    _, pattern = data
    summary = run("ijepa", tmp_path / "run", "--data.shards", pattern, "--train.steps", "2",
                  "--data.workers", "0")
    out = capsys.readouterr().out
    assert f"data.shards '{pattern}': 4 shards, read by 1 x 1 readers" in out
    assert "evaluation: skipped: pass --eval.train-root DIR and --eval.val-root" in out
    assert summary["steps"] == 2 and "knn_acc" not in summary


@pytest.mark.slow
def test_resuming_shards_with_other_workers_is_refused(data, tmp_path, monkeypatch):
    _, pattern = data
    flags = ["--data.shards", pattern, "--train.steps", "6", "--ckpt.every", "1", "--eval.no-knn"]
    run("dino", tmp_path / "run", *flags, "--data.workers", "2", crash_at=3, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="data.workers=1 is not allowed: expected 2, the number this run"):
        run("dino", tmp_path / "run", *flags, "--data.workers", "1", "--resume")


def test_one_source_of_training_images_at_a_time(tmp_path):
    dino = load_recipe("dino")
    with pytest.raises(ValueError, match="data.synthetic=8 is not allowed: expected 0 with --data.root"):
        dino.parse(["--run-dir", str(tmp_path), "--data.synthetic", "8", "--data.root", str(tmp_path)])
    with pytest.raises(ValueError, match="data.shards='d/0.tar' is not allowed: expected None when"):
        load_recipe("ijepa").parse(["--run-dir", str(tmp_path), "--data.shards", "d/0.tar",
                                    "--data.root", "x"])


@pytest.mark.slow
def test_contrastive_on_shards_reports_recall_and_resumes_to_the_sample(data, tmp_path, monkeypatch):
    """img2dataset's layout (key.jpg + key.txt), 4 training shards read by 2 workers, held-out shards."""
    from imagefiles import write_shards as shards_of

    val = shards_of(tmp_path / "val", 1, 6, seed=5)
    flags = ["--data.shards", data[1], "--data.val-shards", val, "--train.steps", "6", "--data.workers", "2",
             "--ckpt.every", "1"]
    whole = run("contrastive", tmp_path / "whole", *flags)
    # 6 held-out images; a caption equal to an image's own is a hit too (identical captions: one target)
    from stepkit.data import expand_shards, read_shard_pairs

    captions = read_shard_pairs(expand_shards(val)).texts
    same = sum(sum(c == d for d in captions) for c in captions) / 36
    assert 0.0 <= whole["recall_at_1_i2t"] <= 1.0 and whole["recall_at_1_chance"] == pytest.approx(same)
    assert whole["skipped_unreadable"] == 0
    run("contrastive", tmp_path / "run", *flags, crash_at=3, monkeypatch=monkeypatch)
    resumed = run("contrastive", tmp_path / "run", *flags, "--resume")
    assert resumed["params_digest"] == whole["params_digest"]  # every worker read on from its place


def test_contrastive_shards_settings_that_cannot_work_are_one_line(data, tmp_path):
    recipe = load_recipe("contrastive")
    shards = ["--data.shards", data[1]]
    with pytest.raises(ValueError, match=r"data.val_shards=None is not allowed: expected one source of held"):
        recipe.parse(shards)
    with pytest.raises(ValueError, match=r"model.text='scratch' is not allowed: expected a pretrained token"):
        recipe.parse(["tiny", *shards, "--data.val-shards", data[1]])
    with pytest.raises(ValueError, match=r"data.shards=.* is not allowed: expected None with --data.pairs"):
        recipe.parse([*shards, "--data.pairs", "p.csv"])

"""Bad input as a new user meets it: one line naming the file or the flag, no traceback, nothing left."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stepkit import TrainState, forward_loss
from stepkit.data import load_fmri_npz

ROOT = Path(__file__).resolve().parents[1]


def recipe(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--log.no-console", *args],
                          capture_output=True, text=True, timeout=300)


def refused(out, *fragments):
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def folder(tmp_path):
    """train/ and val/ with two classes of tiny images, and one file in train/ that is not an image."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"this is not a png")
    return tmp_path


DINO_SMALL = ["--train.steps", "2", "--optim.warmup-steps", "1", "--batch-size", "8", "--eval.k", "3",
              "--crops.local-crops", "2", "--data.workers", "0", "--model.out-dim", "16",
              "--model.head-hidden", "16"]


@pytest.mark.slow
def test_an_unreadable_image_is_named_before_training_and_leaves_no_run_dir(folder):
    out = recipe("dino", "--run-dir", str(folder / "run"), "--data.root", str(folder / "train"), *DINO_SMALL)
    refused(out, "broken.png: not a readable image", "--data.skip-unreadable")
    assert not (folder / "run").exists()


@pytest.mark.slow
def test_skip_unreadable_leaves_them_out_and_counts_them(folder):
    out = recipe("dino", "--run-dir", str(folder / "run"), "--data.root", str(folder / "train"),
                 "--data.skip-unreadable", *DINO_SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((folder / "run" / "summary.json").read_text())["skipped_unreadable"] == 1


@pytest.mark.slow
def test_without_held_out_images_evaluation_is_skipped_with_one_line(folder):
    (folder / "val").rename(folder / "elsewhere")
    out = recipe("dino", "--run-dir", str(folder / "run"), "--data.root", str(folder / "train"),
                 "--data.skip-unreadable", *DINO_SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "evaluation: skipped: no held-out images" in out.stdout and "--eval.val-root DIR" in out.stdout
    assert "knn_acc" not in json.loads((folder / "run" / "summary.json").read_text())
    out = recipe("dino", "--run-dir", str(folder / "run2"), "--data.root", str(folder / "train"),
                 "--eval.val-root", str(folder / "elsewhere"), "--data.skip-unreadable", *DINO_SMALL)
    assert out.returncode == 0 and "20 labelled training images" in out.stdout and "8 held-out" in out.stdout


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("name, args, fragments", [
    ("dino", ["--data.shards", "{shards}/{{0004..0007}}.tar"], ["data.shards=", "matches no file", "0004"]),
    ("ijepa", ["--data.shards", "{shards}/{{0000..0005}}.tar"], ["2 of its 6 shards do not exist"]),
    ("dino", ["--data.shards", "{shards}/{{0000..0003}}.tar", "--data.workers", "8"],
     ["data.workers=8 is not allowed: expected at most 4 with 4 shards over 1 ranks"]),
    ("ijepa", ["--data.shards", "{shards}/{{0000..0003}}.tar", "--data.root", "{folder}/train"],
     ["data.shards=", "None when --data.root is set"]),
    ("dino", ["--data.root", "{folder}/train", "--eval.train-root", "{folder}/train"],
     ["eval.val_root=None is not allowed with --eval.train-root"]),
    ("ijepa", ["--data.root", "{folder}/nowhere"], ["data.root=", "nowhere' is not allowed: no such folder"]),
])
def test_bad_image_data_is_one_line_before_any_run_dir(folder, name, args, fragments):
    from imagefiles import write_shards

    shards = Path(write_shards(folder / "shards", 4, 2)).parent
    before = tree_digest(folder)
    args = [a.format(shards=shards, folder=folder) for a in args]
    flags = [*args, "--data.skip-unreadable", "--train.steps", "2"]
    refused(recipe(name, "--run-dir", str(folder / "run"), *flags), *fragments)
    assert not (folder / "run").exists() and tree_digest(folder) == before


@pytest.mark.slow
def test_a_shard_cut_off_mid_member_is_named_and_left_as_it_was(folder):
    from imagefiles import write_shards

    pattern = write_shards(folder / "shards", 4, 6)
    cut = folder / "shards" / "0002.tar"
    cut.write_bytes(cut.read_bytes()[:5000])
    before = tree_digest(folder / "shards")
    out = recipe("dino", "--run-dir", str(folder / "run"), "--data.shards", pattern, *DINO_SMALL,
                 "--train.steps", "8", "--eval.no-knn")
    refused(out, "0002.tar: cut off or not a tar shard after member '00020000", "--data.shards",
            "--data.skip-unreadable")
    assert tree_digest(folder / "shards") == before
    out = recipe("dino", "--run-dir", str(folder / "run2"), "--data.shards", pattern, *DINO_SMALL,
                 "--train.steps", "8", "--eval.no-knn", "--data.skip-unreadable")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((folder / "run2" / "summary.json").read_text())["skipped_unreadable"] >= 1


@pytest.mark.slow
def test_errors_name_the_flag_the_user_typed(tmp_path):
    refused(recipe("dino", "--run-dir", str(tmp_path / "r"), "--data.image-size", "3"), "data.image_size=3")
    refused(recipe("ijepa", "--run-dir", str(tmp_path / "r"), "--train.steps", "0"), "train.steps=0")
    refused(recipe("dino", "--run-dir", str(tmp_path / "r"), "--optim.lr", "-1"), "optim.lr=-1.0")
    refused(recipe("dino", "--run-dir", str(tmp_path / "r"), "--eval.k", "5000"),
            "eval.k=5000", "training images (1438)")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_an_npz_that_is_not_an_archive_is_named(tmp_path):
    bad = tmp_path / "subject.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(ValueError, match=r"subject.npz: not a readable .npz file \(BadZipFile"):
        load_fmri_npz(bad)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match="a single array"):
        load_fmri_npz(tmp_path / "one.npz")
    refused(recipe("autoencoder", "--run-dir", str(tmp_path / "r"), "--data.path", str(bad)),
            "subject.npz: not a readable .npz file")
    assert not (tmp_path / "r").exists()


# --- small things found by reading the code ----------------------------------------------------------


def test_train_state_fields_after_the_optimizer_are_keyword_only():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError):
        TrainState(model, opt, None, None, 2)
    assert TrainState(model, opt, accum=2).accum == 2


@pytest.mark.parametrize("returned, message", [
    ({"loss": 1}, r"got a dict with keys \['loss'\]: return \(out\['loss'\], out\) instead"),
    ((1, 2, 3), r"got a tuple of 3: \(int, int, int\)"),
    ("loss", "got a str"),
])
def test_forward_loss_says_what_it_expects(returned, message):
    model = torch.nn.Linear(2, 1)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    expects = r"loss_fn must return a scalar loss tensor or a pair \(loss, aux dict"
    with pytest.raises(ValueError, match=expects):
        forward_loss(lambda s, b: returned, state, None)
    with pytest.raises(ValueError, match=message):
        forward_loss(lambda s, b: returned, state, None)


@pytest.mark.slow
def test_the_pretrained_text_tower_without_its_extra_says_what_to_install(tmp_path):
    run_dir = tmp_path / "r"
    code = ("import sys, runpy; sys.modules['transformers'] = None; "
            f"sys.argv = ['contrastive.py', '--run-dir', {str(run_dir)!r}, '--log.no-console']; "
            f"runpy.run_path({str(ROOT / 'recipes' / 'contrastive.py')!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    refused(out, "needs the 'text' extra (transformers is not installed)", "pip install 'stepkit[text]'")
    assert not run_dir.exists()


@pytest.mark.parametrize(("flag", "closest"), [
    ("--optim.lrr", "--optim.lr"),  # a typo
    ("--lr", "--optim.lr"),  # far off as a whole: its last part is alike
    ("--learning-rate", "--optim.lr"),  # another project's word for it
    ("--epochs", "--train.steps"),
    ("--train.step", "--train.steps"),
    ("--log.no-consol", "--log.no-console"),
    ("--crops.local_crop=2", "--crops.local-crops"),  # underscores and = as tyro takes them
])
@pytest.mark.slow
def test_an_unknown_flag_is_named_with_the_closest_ones(flag, closest):
    from conftest import load_recipe

    with pytest.raises(ValueError, match="unknown flag") as err:
        load_recipe("dino").parse(["--train.steps", "3", flag, *(["2"] if "=" not in flag else [])])
    message = str(err.value)
    assert message.startswith(f"unknown flag {flag.split('=')[0]!r}; the closest: ")
    assert closest in message.split("the closest: ")[1].split(" (")[0].split(", ")
    assert "--help lists all" in message


@pytest.mark.slow
def test_an_unknown_flag_from_the_command_line_is_one_line_and_a_bad_value_keeps_tyros_message(tmp_path):
    out = recipe("jepa_sequences", "--run-dir", str(tmp_path / "run"), "--mask.ratioo", "0.5")
    refused(out, "unknown flag '--mask.ratioo'; the closest: --mask.ratio")
    assert not (tmp_path / "run").exists()
    out = recipe("ijepa", "--run-dir", str(tmp_path / "run"), "--train.steps", "many")
    assert out.returncode == 2 and "--train.steps" in out.stderr and "unknown flag" not in out.stderr
    assert not (tmp_path / "run").exists()

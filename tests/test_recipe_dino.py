import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import crash_after_step, load_recipe

from stepkit.schedules import scaled_lr

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "dino.py"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dino")


def small(recipe, run_dir, *flags):
    return recipe.parse(
        [
            "--run-dir",
            str(run_dir),
            "--device",
            "cpu",
            "--log.no-console",
            "--train.steps",
            "6",
            "--optim.warmup-steps",
            "2",
            "--batch-size",
            "16",
            "--crops.local-crops",
            "2",
            "--model.out-dim",
            "32",
            "--model.head-hidden",
            "32",
            "--eval.no-online",  # the online probe: tests/test_online_probe.py and the torchrun tests
            *flags,
        ]
    )


@pytest.mark.slow
def test_few_step_run_writes_the_run_directory(recipe, tmp_path):
    summary = recipe.main(small(recipe, tmp_path / "run", "--model.freeze-last-layer-steps", "3"))
    assert summary["steps"] == 6
    assert {
        "knn_acc",
        "knn_acc_student",
        "knn_acc_random_init",
        "knn_acc_pixels",
        "params_digest",
    } <= summary.keys()
    assert all(0.0 <= summary[k] <= 1.0 for k in summary if k.startswith("knn"))
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "provenance.jsonl",
        "recipe.py",
        "checkpoints",
        "summary.json",
    }
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(g["fused"] for g in saved["state"]["optimizer"]["param_groups"])  # no host read per update
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"dino", "koleo", "teacher_entropy", "feat_effective_rank", "momentum"} <= records[0].keys()


@pytest.mark.slow
def test_centering_targets_and_a_vit_backbone_run(recipe, tmp_path):
    cfg = small(
        recipe,
        tmp_path / "run",
        "--loss.targets",
        "centering",
        "--model.arch",
        "vit-toy",
        "--loss.teacher-temp-warmup-steps",
        "4",
        "--loss.warmup-teacher-temp",
        "0.04",
    )
    summary = recipe.main(cfg)
    assert summary["steps"] == 6


def test_presets_and_flags(recipe, tmp_path):
    paper = recipe.parse(["vit-s16", "--optim.lr", "2e-3"])
    assert paper.model.arch == "vit-small" and paper.model.out_dim == 65536 and paper.optim.lr == 2e-3
    # DINO's vanilla ViT-S/16 run (main_dino.py's defaults): 8 ranks x 64, 100 epochs of 2,502 updates
    vanilla = recipe.parse(["vit-s16"])
    assert vanilla.batch_size * 8 == 512 and (vanilla.optim.lr, vanilla.optim.lr_per_batch) == (5e-4, 256)
    assert [scaled_lr(5e-4, 64 * ranks, 256) for ranks in (1, 2, 4)] == [1.25e-4, 2.5e-4, 5e-4]
    assert vanilla.train.steps == 100 * 2502 and vanilla.optim.warmup_steps == 10 * 2502
    assert vanilla.model.freeze_last_layer_steps == 2502 and vanilla.model.norm_last_layer
    assert (vanilla.loss.teacher_temp, vanilla.loss.warmup_teacher_temp) == (0.04, 0.04)
    assert vanilla.optim.clip is None and vanilla.optim.clip_per_param == 3.0
    assert (vanilla.optim.wd, vanilla.optim.wd_final, vanilla.optim.min_lr) == (0.04, 0.4, 1e-6)
    ema = vanilla.ema
    assert (ema.momentum, ema.momentum_final, ema.momentum_decay) == (0.996, 1.0, "cosine")
    assert vanilla.model.drop_path == 0.1 and not vanilla.model.head_batch_norm
    assert vanilla.crops.global_size == 224 and vanilla.crops.local_crops == 8
    assert vanilla.crops.local_scale == (0.05, 0.4) and vanilla.crops.global_scale == (0.4, 1.0)
    assert vanilla.model.weight_init == "dino"  # the patch embedding and the last layer as DINO leaves them
    assert recipe.parse([]).model.arch == "cnn" and recipe.parse([]).model.weight_init == "stepkit"
    assert recipe.PRESETS["tiny-cpu"][1].optim.lr == recipe.Config().optim.lr  # parse() did not mutate it


@pytest.mark.slow
def test_cli_lr_reaches_the_optimizer(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--run-dir",
            str(run),
            "--log.no-console",
            "--train.steps",
            "3",
            "--optim.lr",
            "0.0123",
            "--optim.warmup-steps",
            "0",
            "--optim.decay",
            "constant",
            "--batch-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import torch

    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {g["lr"] for g in saved["state"]["optimizer"]["param_groups"]} == {0.0123}


@pytest.mark.slow
def test_bad_flags_are_refused_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "r"), "--loss.student-temp", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "student_temp=0.0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_the_labelled_layout_with_val_beside_it_trains_and_evaluates(recipe, tmp_path):
    from imagefiles import write_folder

    write_folder(tmp_path / "train", 6)
    write_folder(tmp_path / "val", 2, seed=1)
    cfg = small(recipe, tmp_path / "run", "--data.root", str(tmp_path / "train"), "--data.workers", "0",
                "--crops.global-size", "32", "--crops.local-size", "16", "--eval.k", "5")
    summary = recipe.main(cfg)
    assert summary["steps"] == 6 and 0.0 <= summary["knn_acc"] <= 1.0


def crash_after_step_3_then_resume(recipe, run_dir, monkeypatch, *flags) -> dict:
    """Run until the step-3 checkpoint is written, die there, then resume: the resumed summary."""
    crash_after_step(recipe, monkeypatch, small(recipe, run_dir, *flags))
    return recipe.main(small(recipe, run_dir, *flags, "--resume"))


@pytest.mark.slow
def test_a_crashed_run_resumes_bit_identical(recipe, tmp_path, monkeypatch):
    flags = ("--ckpt.every", "3")
    straight = recipe.main(small(recipe, tmp_path / "straight", *flags))
    resumed = crash_after_step_3_then_resume(recipe, tmp_path / "crashed", monkeypatch, *flags)
    assert resumed["params_digest"] == straight["params_digest"]


@pytest.mark.slow
def test_compiled_networks_train_like_eager_ones(recipe, tmp_path, monkeypatch):
    import torch

    # The recipe's --compile wiring, traced by dynamo and run through AOTAutograd's graphs; inductor's own
    # code generation (a minute of C++ builds on a cold cache) is tested in tests/test_compile.py.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **kw, backend="aot_eager"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    losses, graphs = {}, {}
    for mode in ("none", "default"):
        counters.clear()
        flags = ["--compile", mode, "--train.steps", "3", "--log.every", "1"]
        recipe.main(small(recipe, tmp_path / mode, *flags))
        rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "loss" in r]
        graphs[mode] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert len(losses["none"]) == 3
    assert graphs == {"none": 0, "default": 2}  # the student's forward and the teacher's
    # Traced graphs may reorder float32 sums: the same run up to rounding, not bit for bit.
    assert losses["default"] == pytest.approx(losses["none"], rel=1e-4)


@pytest.mark.slow
def test_prefetched_crops_give_the_same_run_and_resume_exactly(recipe, tmp_path, monkeypatch):
    flags = ("--ckpt.every", "3", "--train.steps", "6")
    off = recipe.main(small(recipe, tmp_path / "off", *flags, "--data.prefetch", "off"))
    on = recipe.main(small(recipe, tmp_path / "on", *flags, "--data.prefetch", "on"))
    assert on["params_digest"] == off["params_digest"]  # the CNN draws nothing else from the RNG
    resumed = crash_after_step_3_then_resume(recipe, tmp_path / "crashed", monkeypatch, *flags,
                                             "--data.prefetch", "on")
    assert resumed["params_digest"] == off["params_digest"]


def test_the_cnn_is_built_channels_last_unless_turned_off_or_sharded(recipe, tmp_path):
    def backbone(*flags):
        return recipe.build_model(recipe.parse(["--run-dir", str(tmp_path / "r"), *flags]), 1).backbone

    def conv_weights(net):  # the first conv has one input channel: both layouts at once
        return [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)][1:]

    torch.manual_seed(0)
    fast = backbone()
    torch.manual_seed(0)
    plain = backbone("--model.no-channels-last")
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in conv_weights(fast))
    assert all(w.is_contiguous() for w in conv_weights(plain))
    assert all(w.is_contiguous() for w in conv_weights(backbone("--dist.strategy", "fsdp")))
    # the same weights from the same seed; the same features up to the kernels' rounding
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def test_synthetic_images_without_knn_report_the_speed(recipe, tmp_path):
    summary = recipe.main(small(recipe, tmp_path / "s", "--data.synthetic", "64", "--eval.no-knn",
                                "--train.steps", "3", "--optim.warmup-steps", "1"))
    assert summary["steps"] == 3 and summary["images_per_s"] > 0 and "knn_acc" not in summary


@pytest.mark.slow
def test_grad_checkpointing_needs_a_vit(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "r"),
                          "--model.grad-checkpointing"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "model.grad_checkpointing=True is not allowed" in out.stderr


def test_collapse_alarm_names_teacher_entropy_near_uniform(recipe, tmp_path, capsys):
    import math

    summary = recipe.main(small(recipe, tmp_path / "run", "--log.every", "1", "--alarm.patience", "2",
                                "--alarm.max-entropy-fraction", "0.0", "--eval.no-knn"))
    out = capsys.readouterr().out
    assert "collapse warning: teacher_entropy above 0 for 2 intervals" in out
    assert summary["collapse_warning"].startswith("collapse warning: teacher_entropy")
    cfg = recipe.parse(["--run-dir", str(tmp_path / "r")])  # the default: 98% of log(out_dim)
    assert cfg.alarm.max_entropy_fraction * math.log(cfg.model.out_dim) == pytest.approx(0.98 * math.log(128))


# docs/recipes/dino.md, "Your own augmentation": the edit, as a user makes it in a copied recipe.
ROTATION = '''
def rotate_quarter(view: torch.Tensor) -> torch.Tensor:
    """Each image turned by 0, 90, 180 or 270 degrees (its own draw)."""
    turns = torch.randint(0, 4, (len(view),)).tolist()
    print("rotated", tuple(view.shape), flush=True)
    return torch.stack([torch.rot90(image, k, dims=(-2, -1)) for image, k in zip(view, turns)])


def build_model('''


def with_rotated_local_crops(tmp_path: Path) -> Path:
    """recipes/dino.py copied, with one function and one call added: the local crops rotated."""
    text = SCRIPT.read_text()
    call = "        return normalize(view_colors(view, cfg.crops, i), mean, std)\n"
    assert text.count(call) == 1 and text.count("\ndef build_model(") == 1
    text = text.replace("\ndef build_model(", ROTATION, 1)
    rotate = "        view = rotate_quarter(view) if i >= 2 else view  # local crops only\n"
    text = text.replace(call, rotate + call)
    path = tmp_path / "my_dino.py"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_an_augmentation_added_in_the_copied_recipe_runs_for_every_source(tmp_path):
    from imagefiles import write_folder, write_shards

    common = ["--train.steps", "2", "--batch-size", "8", "--crops.local-crops", "2", "--model.out-dim", "16",
              "--model.head-hidden", "16", "--eval.no-knn", "--log.no-console", "--device", "cpu"]
    write_folder(tmp_path / "images", 4)
    sources = {"digits": [], "files": ["--data.root", str(tmp_path / "images"), "--data.workers", "0"],
               "shards": ["--data.shards", write_shards(tmp_path / "shards", 2, 8), "--data.workers", "0"]}
    edited = with_rotated_local_crops(tmp_path)
    runs = [(edited, name) for name in sources] + [(SCRIPT, "digits")]  # and the recipe as shipped
    digests = {}
    for script, source in runs:
        run_dir = tmp_path / f"{script.stem}-{source}"
        command = [sys.executable, str(script), "--run-dir", str(run_dir), *common, *sources[source]]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        rotated = [line for line in out.stdout.splitlines() if line.startswith("rotated")]
        assert len(rotated) == (2 * 2 if script == edited else 0)  # 2 local crops x 2 steps
        assert all(line.endswith(", 16, 16)") for line in rotated)  # the local crops' size, not the global
        digests[script.stem, source] = json.loads((run_dir / "summary.json").read_text())["params_digest"]
    assert digests["dino", "digits"] != digests["my_dino", "digits"]  # the rotation changed what was learned

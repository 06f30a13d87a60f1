"""recipes/dinov2.py: DINOv2's loss composed as the paper's code composes it, its presets equal to the
official configs value by value, continued pretraining with a frozen backbone, resume."""

import math

import pytest
import torch
from conftest import crash_after_step, load_recipe

from stepkit.ema import target_copy
from stepkit.losses.dino import sinkhorn_knopp, teacher_softmax
from stepkit.masking import ibot_masks
from stepkit.state import TrainState


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("dinov2")


def small(recipe, run_dir, *flags):
    return recipe.parse(["--run-dir", str(run_dir), "--device", "cpu", "--log.no-console", "--train.steps",
                         "6", "--optim.warmup-steps", "2", "--batch-size", "16", "--crops.local-crops", "2",
                         "--model.out-dim", "32", "--model.head-hidden", "32", "--model.ibot-out-dim", "24",
                         *flags])


def cross_entropy(targets, logits, temp):
    return -(targets * torch.log_softmax(logits / temp, dim=-1)).sum(dim=-1)


@pytest.mark.parametrize("targets, separate", [("sinkhorn", False), ("centering", True)])
def test_the_objective_is_dino_plus_ibot_plus_koleo_computed_view_by_view(recipe, targets, separate,
                                                                         tmp_path):
    flags = ["--model.drop-path", "0", "--model.no-head-batch-norm", "--loss.targets", targets,  # as DINOv2's
             "--ibot.weight", "0.7", "--loss.koleo-weight", "0.3",
             *(["--model.separate-ibot-head"] if separate else [])]
    cfg = small(recipe, tmp_path, *flags)
    torch.manual_seed(0)
    student = recipe.build_model(cfg, in_chans=1)
    teacher = target_copy(student)
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b, temp, s_temp = 5, cfg.loss.teacher_temp, cfg.loss.student_temp
    views = [torch.randn(b, 1, 32, 32), torch.randn(b, 1, 32, 32), torch.randn(b, 1, 16, 16),
             torch.randn(b, 1, 16, 16)]
    masks = ibot_masks(2 * b, (8, 8), torch.Generator().manual_seed(3))
    k = cfg.model.out_dim
    state = TrainState(student, torch.optim.SGD(student.parameters(), lr=0.1),
                       extras={"center": torch.zeros(1, k),
                               "patch_center": torch.zeros(1, 24 if separate else k)})
    loss, aux = recipe.dinov2_objective(cfg, student, teacher, state, (views, masks))

    # by hand: each global view through the teacher whole, the student with its masked patches swapped
    patch_head = (lambda m: m.patch_head) if separate else (lambda m: m.head)
    prefix = student.backbone.prefix
    with torch.no_grad():
        t_tokens = [teacher.backbone.tokens(v) for v in views[:2]]
        t_cls = torch.cat([teacher.head(t[:, 0]) for t in t_tokens])
        t_patch = torch.cat([patch_head(teacher)(t[:, prefix:][m]) for t, m in zip(t_tokens, masks.chunk(2))])
    if targets == "sinkhorn":
        q, q_patch = sinkhorn_knopp(t_cls, temp), sinkhorn_knopp(t_patch, temp)
    else:
        q = teacher_softmax(t_cls, torch.zeros(1, k), temp)
        q_patch = teacher_softmax(t_patch, torch.zeros(1, t_patch.shape[1]), temp)
    s_tokens = [student.backbone.tokens(v, mask=m) for v, m in zip(views[:2], masks.chunk(2))]
    s_logits = [student.head(t[:, 0]) for t in s_tokens]
    s_logits += [student.head(student.backbone(v)) for v in views[2:]]
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    dino = sum(cross_entropy(q.chunk(2)[t], s_logits[s], s_temp).mean() for t, s in pairs) / len(pairs)
    s_patch = torch.cat([patch_head(student)(t[:, prefix:][m]) for t, m in zip(s_tokens, masks.chunk(2))])
    per_patch = cross_entropy(q_patch, s_patch, s_temp)
    owner = masks.nonzero()[:, 0]  # each masked patch's image: DINOv2 weighs it by 1 / its image's count
    counts = masks.sum(dim=1)
    ibot = (per_patch / counts[owner]).sum() / (2 * b)

    def koleo(x):
        x = torch.nn.functional.normalize(x, dim=-1)
        d = torch.cdist(x, x) + torch.eye(len(x)) * 1e9
        return -torch.log(d.min(dim=1).values + 1e-8).mean()

    spread = koleo(s_tokens[0][:, 0]) + koleo(s_tokens[1][:, 0])  # DINOv2 sums over the two global crops
    assert torch.allclose(aux["dino"], dino, atol=1e-5) and torch.allclose(aux["ibot"], ibot, atol=1e-5)
    assert torch.allclose(aux["koleo"], spread, atol=1e-5)
    assert torch.allclose(loss, dino + 0.7 * ibot + 0.3 * spread, atol=1e-5)
    if targets == "centering":  # both centres moved from zero by (1 - momentum) x the batch's mean
        assert torch.allclose(state.extras["center"], 0.1 * t_cls.mean(dim=0, keepdim=True), atol=1e-6)
        patch_mean = t_patch.mean(dim=0, keepdim=True)
        assert torch.allclose(state.extras["patch_center"], 0.1 * patch_mean, atol=1e-6)


# the official configs (facebookresearch/dinov2: ssl_default_config.yaml + train/vitl16_short.yaml, and
# train/vitl14.yaml over it), as read from the repository; an epoch is OFFICIAL_EPOCH_LENGTH = 1,250 updates
VITL16_SHORT = {
    "batch_size": 64, "amp": "bf16", "model.arch": "vit-large", "model.patch_size": 16, "model.registers": 0,
    "model.layer_scale": 1e-5, "model.ffn": "mlp", "model.drop_path": 0.3, "model.drop_path_uniform": True,
    "model.out_dim": 65536, "model.head_hidden": 2048, "model.bottleneck": 256,
    "model.head_batch_norm": False, "model.separate_ibot_head": False, "model.freeze_last_layer_steps": 1250,
    "loss.targets": "centering",
    "loss.warmup_teacher_temp": 0.04, "loss.teacher_temp": 0.07, "loss.teacher_temp_warmup_steps": 30 * 1250,
    "loss.koleo_weight": 0.1, "loss.student_temp": 0.1, "loss.center_momentum": 0.9, "ibot.weight": 1.0,
    "ibot.mask_probability": 0.5, "ibot.mask_ratio": (0.1, 0.5), "ibot.center_momentum": 0.9,
    "train.steps": 100 * 1250, "optim.lr": 4e-3, "optim.lr_per_batch": 1024, "optim.lr_rule": "sqrt",
    "optim.min_lr": 1e-6, "optim.warmup_steps": 10 * 1250, "optim.wd": 0.04, "optim.wd_final": 0.4,
    "optim.clip": 3.0, "optim.layer_decay": 0.9, "optim.patch_embed_lr": 0.2, "ema.momentum": 0.992,
    "ema.momentum_final": 1.0, "crops.global_size": 224, "crops.global_scale": (0.32, 1.0),
    "crops.local_crops": 8, "crops.local_size": 96, "crops.local_scale": (0.05, 0.32),
}
VITL14 = {**VITL16_SHORT, "batch_size": 32, "model.patch_size": 14, "model.drop_path": 0.4,
          "model.ffn": "swiglu",
          "model.out_dim": 131072, "model.bottleneck": 384, "model.separate_ibot_head": True,
          "model.ibot_out_dim": 131072, "model.ibot_bottleneck": 256, "loss.targets": "sinkhorn",
          "train.steps": 500 * 1250, "optim.lr": 2e-4, "optim.warmup_steps": 80 * 1250, "optim.wd_final": 0.2,
          "optim.layer_decay": 1.0, "ema.momentum": 0.994, "crops.local_size": 98}


@pytest.mark.parametrize("preset, official", [("vitl16-short", VITL16_SHORT), ("vitl14", VITL14)])
def test_the_official_presets_equal_dinov2s_configs(recipe, preset, official):
    cfg = recipe.parse([preset])
    for name, value in official.items():
        group, _, field = name.rpartition(".")
        assert getattr(getattr(cfg, group) if group else cfg, field) == value, name


def test_vitl16_short_builds_dinov2s_vit_large(recipe):
    cfg = recipe.parse(["vitl16-short"])
    with torch.device("meta"):
        model = recipe.build_model(cfg, in_chans=3)
    vit = model.backbone
    assert (vit.dim, len(vit.blocks), vit.patch_size, vit.prefix) == (1024, 24, 16, 1)
    d, h = 1024, 4096  # DINOv2's vit_large: per block two norms, qkv, proj, two LayerScales, the MLP
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    embed = 3 * 16 * 16 * d + d + d + (1 + 14 * 14) * d + d  # patches, class token, positions, mask token
    assert sum(p.numel() for p in vit.parameters()) == embed + 24 * block + 2 * d
    assert model.head.last_layer.weight_v.shape[0] == 65536 and model.patch_head is None


def test_groups_decay_by_layer_and_slow_the_patch_embedding_and_a_continued_backbone(recipe, tmp_path):
    cfg = small(recipe, tmp_path, "--optim.layer-decay", "0.9", "--optim.patch-embed-lr", "0.2",
                "--continued.backbone-lr", "0.1")
    model = recipe.build_model(cfg, in_chans=1)
    scale_of = {id(p): g["lr_scale"] for g in recipe.optimizer_groups(cfg, model) for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(model.backbone.blocks)  # 4: block i at 0.9 ** (4 - i), the embeddings at 0.9 ** 5
    assert scale_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(0.1 * 0.9 ** depth)
    assert scale_of[id(named["backbone.patch_embed.weight"])] == pytest.approx(0.1 * 0.2 * 0.9 ** (depth + 1))
    assert scale_of[id(named["backbone.norm.weight"])] == pytest.approx(0.1)
    assert scale_of[id(named["head.mlp.0.weight"])] == 1.0


def test_bad_ibot_flags_are_one_line_naming_the_flag(recipe, tmp_path):
    with pytest.raises(ValueError, match=r"ibot.mask_ratio=\(0.6, 0.2\).*0 <= low <= high <= 1"):
        small(recipe, tmp_path, "--ibot.mask-ratio", "0.6", "0.2")
    with pytest.raises(ValueError, match="mask_probability"):
        small(recipe, tmp_path, "--ibot.mask-probability", "1.5")


@pytest.mark.slow
def test_a_crashed_run_resumes_bit_identical(recipe, tmp_path, monkeypatch):
    whole = recipe.main(small(recipe, tmp_path / "whole", "--ckpt.every", "1"))
    assert {"knn_acc", "knn_acc_student", "knn_acc_random_init", "knn_acc_pixels"} <= whole.keys()
    crash_after_step(recipe, monkeypatch, small(recipe, tmp_path / "run", "--ckpt.every", "1"), step=3)
    resumed = recipe.main(small(recipe, tmp_path / "run", "--ckpt.every", "1", "--resume"))
    assert resumed["params_digest"] == whole["params_digest"]


@pytest.fixture(scope="module")
def released(recipe, tmp_path_factory):
    """A finished 2-update run: its directory, its summary, its teacher's backbone (the weights released)."""
    folder = tmp_path_factory.mktemp("released") / "run"
    summary = recipe.main(small(recipe, folder, "--train.steps", "2"))
    target = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["state"]["target"]
    backbone = {k.removeprefix("backbone."): v for k, v in target.items() if k.startswith("backbone.")}
    return folder, summary, backbone


def continued(recipe, run_dir, released_dir, *flags):
    return small(recipe, run_dir, "--init.from", str(released_dir), "--ckpt.every", "1", "--ckpt.keep-last",
                 "9", "--continued.head-warmup-steps", "3", "--train.steps", "4", *flags)


def saved_state(run_dir, step):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["state"]


@pytest.mark.slow
def test_continued_pretraining_freezes_the_backbone_then_starts_the_teacher_at_the_student(recipe, released,
                                                                                          tmp_path):
    folder, finished, start = released
    summary = recipe.main(continued(recipe, tmp_path / "more", folder))
    assert summary["knn_acc_init"] == pytest.approx(finished["knn_acc"], abs=1e-9)  # where the teacher ended

    def weights(step):
        saved = saved_state(tmp_path / "more", step)
        return saved["model"], saved["target"]

    for step in (1, 2):  # the backbone as released; the heads learning (update 1 is at lr 0: warm-up)
        student, teacher = weights(step)
        assert all(torch.equal(student[f"backbone.{k}"], v) for k, v in start.items())
    assert not torch.equal(student["head.mlp.0.weight"], teacher["head.mlp.0.weight"])  # the EMA lags
    student, teacher = weights(3)  # the switch: the teacher is the student, whole
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    student, _ = weights(4)  # then the backbone moves
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert math.isfinite(summary["knn_acc"])


@pytest.mark.slow
def test_the_anchor_pulls_the_backbone_toward_the_released_weights_also_after_a_resume(recipe, released,
                                                                                       tmp_path, monkeypatch):
    # the same continuation with and without --continued.anchor: equal until update 4, which then also
    # pulls the backbone toward the released weights by lr * anchor (L2-SP, decoupled)
    folder, _, start = released
    recipe.main(continued(recipe, tmp_path / "free", folder))
    anchored = continued(recipe, tmp_path / "anchored", folder, "--continued.anchor", "50")
    whole = recipe.main(anchored)
    pull = recipe.lr_at(3, recipe.lr_schedule(anchored), 4) * 50
    assert 0 < pull < 1
    free, saved = saved_state(tmp_path / "free", 4)["model"], saved_state(tmp_path / "anchored", 4)
    for name, w0 in start.items():
        w = free[f"backbone.{name}"]
        torch.testing.assert_close(saved["model"][f"backbone.{name}"], w + pull * (w0 - w), rtol=0, atol=1e-6)
        assert torch.equal(saved["extras"][f"anchor.{name}"], w0)  # the released weights ride along
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(saved["model"][f"backbone.{qkv}"], start[qkv])  # pulled, not back at the start

    # a resume without --init.from pulls toward the released weights its checkpoint holds, not a fresh init
    crashed = continued(recipe, tmp_path / "crashed", folder, "--continued.anchor", "50")
    crash_after_step(recipe, monkeypatch, crashed, step=3)
    flags = ["--ckpt.every", "1", "--continued.head-warmup-steps", "3", "--train.steps", "4",
             "--continued.anchor", "50", "--resume"]
    assert recipe.main(small(recipe, tmp_path / "crashed", *flags))["params_digest"] == whole["params_digest"]

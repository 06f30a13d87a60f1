"""Weights in and out (stepkit.weights): parts read from checkpoints, exports rebuilt without the recipe,
weights loaded into new models (timm / DINO / I-JEPA layouts, resized positions), one-line refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stepkit import TrainState
from stepkit.checkpoint import CheckpointError, save_last, save_periodic
from stepkit.checkpoint.sharded import save_sharded
from stepkit.models import (
    ARCHITECTURES,
    MaskedCNN,
    MaskedTemporalCNN,
    ProjectedTower,
    SmallCNN,
    TinyTextEncoder,
    TokenTransformer,
    VisionTransformer,
    arch_record,
    build_arch,
)
from stepkit.weights import (
    checkpoint_parts,
    describe_part,
    export,
    find_checkpoint,
    from_timm,
    init_from,
    merge_lora_state,
    read_part,
    resize_pos_embed,
    to_timm,
)

ROOT = Path(__file__).resolve().parents[1]


class Backboned(nn.Module):
    """A recipe-like model: a backbone and a head, as DINO's."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.dim, 3)


def vit(**kw) -> VisionTransformer:
    return VisionTransformer.preset("toy", **{"img_size": 16, **kw})


def saved_run(tmp_path: Path, backbone: nn.Module, *, sharded: bool = False
              ) -> tuple[Path, Backboned, Backboned]:
    """A run directory whose last checkpoint holds a model and a (different) EMA target, with parts."""
    torch.manual_seed(0)
    model = Backboned(backbone)
    target = Backboned(build_arch(arch_record(backbone)))
    with torch.no_grad():
        for p in target.parameters():
            p.normal_()
    state = TrainState(model, torch.optim.AdamW(model.parameters()), target=target, step=12)
    parts = {"teacher": describe_part(backbone, source="target", prefix="backbone.", about="EMA"),
             "student": describe_part(backbone, source="model", prefix="backbone.", about="online")}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"seed": 0}')
    if sharded:
        save_sharded(run / "checkpoints" / "last.dcp", state, meta={"parts": parts})
    else:
        save_last(run / "checkpoints", state, meta={"parts": parts})
    return run, model, target


ARCHS = [
    lambda: vit(),
    lambda: vit(pos_embed="sincos"),
    lambda: SmallCNN(1, (8, 16), pool=2),
    lambda: MaskedCNN(img_size=16, in_chans=1, widths=(8, 16), strides=(1, 2)),
    lambda: MaskedTemporalCNN(in_chans=2, widths=(8, 8)),
    lambda: TokenTransformer(20, length=8, dim=16, depth=1, heads=2),
    lambda: TinyTextEncoder(20, dim=16, depth=1, heads=2),
    lambda: ProjectedTower(SmallCNN(1, (8,)), 4),
]


@pytest.mark.parametrize("make", ARCHS)
def test_an_architecture_record_rebuilds_the_same_shapes(make):
    module = make()
    record = arch_record(module)
    json.dumps(record)  # plain JSON
    rebuilt = build_arch(json.loads(json.dumps(record)))
    assert type(rebuilt) is type(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in
                                                                      module.state_dict().items()}


def test_a_record_cannot_name_a_class_outside_the_list():
    with pytest.raises(ValueError, match="architecture 'os.system' is not one stepkit builds"):
        build_arch({"class": "os.system", "arguments": {}})
    with pytest.raises(ValueError, match="not a stepkit model"):
        arch_record(nn.Linear(2, 2))
    assert "Linear" not in ARCHITECTURES


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_read_part_takes_the_part_from_the_right_side(tmp_path, sharded):
    run, model, target = saved_run(tmp_path, vit(), sharded=sharded)
    teacher, info = read_part(run, "teacher")
    student, _ = read_part(run, "student")
    assert set(teacher) == set(model.backbone.state_dict())
    for name, value in target.backbone.state_dict().items():
        assert torch.equal(teacher[name], value), name
        assert torch.equal(student[name], model.backbone.state_dict()[name])
    assert info["step"] == 12 and info["part"] == "teacher" and len(info["config_sha256"]) == 64


def test_export_then_load_in_a_fresh_process_gives_the_same_features(tmp_path):
    run, _, target = saved_run(tmp_path, vit())
    out = export(run, "teacher", tmp_path / "teacher.safetensors")
    x = torch.rand(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = (f"import torch; from stepkit.weights import load_exported; m = load_exported({str(out)!r}); "
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), target.backbone.eval()(x))
    described = json.loads(out.with_suffix(".json").read_text())
    assert described["arch"]["class"] == "VisionTransformer" and described["step"] == 12


def test_export_refuses_without_writing(tmp_path):
    run, _, _ = saved_run(tmp_path, SmallCNN(1, (8,)))
    with pytest.raises(CheckpointError, match=r"part='head' is not one .* parts: teacher \(EMA\); student"):
        export(run, "head", tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="format='timm' needs a ViT part; 'teacher' is a SmallCNN"):
        export(run, "teacher", tmp_path / "b", format="timm")
    with pytest.raises(ValueError, match="format='onnx' is not allowed: one of safetensors, timm"):
        export(run, "teacher", tmp_path / "c", format="onnx")
    (tmp_path / "kept.safetensors").write_text("mine")
    with pytest.raises(ValueError, match="exists; choose another path or pass --force"):
        export(run, "teacher", tmp_path / "kept.safetensors")
    assert (tmp_path / "kept.safetensors").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints here"):
        export(empty, "teacher", tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match=r"kept.safetensors is a file, not a folder; choose another path"):
        export(run, "teacher", tmp_path / "kept.safetensors" / "e.safetensors")
    assert (tmp_path / "kept.safetensors").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept.safetensors", "run"]


def test_export_makes_the_folders_of_a_new_path(tmp_path):
    run, _, _ = saved_run(tmp_path, SmallCNN(1, (8,)))
    out = export(run, "teacher", tmp_path / "new" / "dir" / "teacher")
    assert out == tmp_path / "new" / "dir" / "teacher.safetensors"
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["teacher.json", "teacher.md", "teacher.safetensors"]


def test_a_card_says_what_a_run_without_a_summary_lacks_and_a_lone_checkpoint_carries_nothing(tmp_path):
    run, _, _ = saved_run(tmp_path, SmallCNN(1, (8,)))  # config.json, no summary.json
    card = export(run, "teacher", tmp_path / "t.safetensors").with_suffix(".md").read_text()
    assert "# teacher of run" in card and "update 12" in card and "No evaluation numbers" in card
    assert "The whole config (config.json)" in card and "`SmallCNN`" in card
    (tmp_path / "lone").mkdir()
    lone = tmp_path / "lone" / "ckpt.pt"
    lone.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    card = export(lone, "teacher", tmp_path / "l.safetensors").with_suffix(".md").read_text()
    assert "outside its run directory" in card and "config.json" not in card


def test_find_checkpoint_names_what_a_run_holds(tmp_path):
    run, model, target = saved_run(tmp_path, SmallCNN(1, (8,)))
    state = TrainState(model, torch.optim.AdamW(model.parameters()), target=target, step=7)
    save_periodic(run / "checkpoints", state, keep_last=3)
    assert find_checkpoint(run, "step_7").name == "step_00000007.pt"
    with pytest.raises(CheckpointError, match=r"checkpoint='step_9' is not in .*last.pt, step_00000007.pt"):
        find_checkpoint(run, "step_9")
    with pytest.raises(CheckpointError, match="names no parts to export"):
        checkpoint_parts(find_checkpoint(run, "step_7"))


def test_timm_names_round_trip_and_positions_resize():
    state = vit().state_dict()
    assert from_timm(to_timm(state)).keys() == state.keys()
    assert "patch_embed.proj.weight" in to_timm(state) and "blocks.0.mlp.fc1.weight" in to_timm(state)
    pos = torch.randn(1, 1 + 16, 8)
    same = resize_pos_embed(pos, (4, 4), class_token=True)
    assert same is pos
    grown = resize_pos_embed(pos, (8, 8), class_token=True)
    assert grown.shape == (1, 65, 8) and torch.equal(grown[:, 0], pos[:, 0])
    # a constant grid stays constant under bicubic resampling
    flat = resize_pos_embed(torch.ones(1, 9, 2), (5, 5), class_token=False)
    assert torch.allclose(flat, torch.ones(1, 25, 2))


def test_init_from_a_dino_style_file_with_prefixes_and_a_head(tmp_path):
    source = vit()
    teacher = {"module.backbone." + k: v for k, v in to_timm(source.state_dict()).items()}
    teacher["module.head.last_layer.weight"] = torch.zeros(5, 64)
    torch.save({"student": teacher, "teacher": teacher, "epoch": 3}, tmp_path / "checkpoint.pth")
    fresh = vit()
    report = init_from(fresh, tmp_path / "checkpoint.pth", part="")
    assert report.described == {"part": "teacher"} and report.missing == [] and report.unexpected == []
    for name, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_init_from_an_ijepa_style_encoder_without_class_token(tmp_path):
    source = VisionTransformer.preset("toy", img_size=16, pos_embed="sincos")
    encoder = {"module." + k: v for k, v in to_timm(source.state_dict()).items() if k != "cls_token"}
    encoder["module.pos_embed"] = source.state_dict()["pos_embed"][:, 1:]  # I-JEPA: no class token row
    torch.save({"encoder": encoder, "target_encoder": encoder, "predictor": {"x": torch.ones(1)}},
               tmp_path / "ijepa.pth.tar")
    learned = vit(img_size=32)  # learned positions, a larger grid
    report = init_from(learned, tmp_path / "ijepa.pth.tar", part="")
    assert report.missing == ["cls_token"]
    assert "4x4 grid resized to 8x8" in report.notes[0]
    assert torch.equal(learned.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_init_refuses_another_architecture_naming_the_key(tmp_path):
    torch.save(vit().state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match=r"patch_embed.weight: saved \(64, 3, 4, 4\), this model "
                                         r"\(64, 3, 8, 8\) \(patch size 4 saved, 8 here"):
        init_from(VisionTransformer.preset("toy", img_size=16, patch_size=8), tmp_path / "vit.pt", part="")
    with pytest.raises(ValueError, match="none of its .* tensors has a name this SmallCNN has"):
        init_from(SmallCNN(3, (8,)), tmp_path / "vit.pt", part="")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"init.from='.*notes.txt': not a checkpoint or state dict"):
        init_from(vit(), tmp_path / "notes.txt", part="")
    torch.save({"a": {"w": torch.ones(1)}, "b": {"w": torch.ones(1)}}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"holds several networks \(a, b\): pass --init.key NAME"):
        init_from(vit(), tmp_path / "two.pt", part="")
    run, _, _ = saved_run(tmp_path, SmallCNN(3, (8,)))
    with pytest.raises(ValueError, match="holds a SmallCNN, and this run builds a VisionTransformer"):
        init_from(vit(), run, part="teacher")


def test_merged_lora_state_equals_peft_merge():
    peft = pytest.importorskip("peft")
    del peft
    from stepkit.models import WordTokenizer, add_lora, merge_lora

    tokenize = WordTokenizer(["a small seven", "a large one"])
    torch.manual_seed(0)
    lora = add_lora(TinyTextEncoder(len(tokenize), dim=16, depth=1, heads=2, dropout=0.0), r=2, alpha=6.0,
                    targets=("linear1",))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged_here = merge_lora_state(lora.state_dict(), 6.0 / 2)
    reference = merge_lora(lora).state_dict()
    assert merged_here.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(merged_here[name], reference[name], atol=1e-6), name


def test_timm_loads_the_export_strictly_and_init_takes_timm_weights(tmp_path):
    """benchmarks/timm_vit.py in a process of its own (it may stand in an empty torchvision)."""
    out = tmp_path / "timm.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "timm_vit.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    if result["status"] == "skipped":
        pytest.skip(result["why"])
    assert len(result["cases"]) == 4
    for case in result["cases"].values():
        assert case["export_max_abs_diff"] < 1e-5 and case["init_max_abs_diff"] < 1e-5
        assert case["init_missing"] == [] and case["init_unexpected"] == []


# DINOv2: Hugging Face folders and the original state dicts in, Hugging Face and timm folders out

DINOV2_KINDS = [dict(registers=0, ffn="mlp"), dict(registers=4, ffn="mlp"), dict(registers=2, ffn="swiglu")]


def dinov2_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    model = vit(layer_scale=1e-5, mask_token=True, **kw).eval()
    with torch.no_grad():  # every tensor away from its initial value (LayerScale, tokens) so each one counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_model(config: dict):
    transformers = pytest.importorskip("transformers")
    config = dict(config)
    name = config.pop("architectures")[0]
    config.pop("model_type")
    registers = "Registers" in name
    config_class = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    return getattr(transformers, name)(config_class(**config)).eval()


@pytest.mark.parametrize("kind", DINOV2_KINDS, ids=lambda k: f"{k['registers']}reg-{k['ffn']}")
def test_a_hugging_face_dinov2_folder_goes_in_strictly_with_its_features(kind, tmp_path):
    from stepkit.weights import hf_dinov2_config

    torch.manual_seed(1)
    hf = hf_model(hf_dinov2_config({"dim": 64, "depth": 4, "heads": 4, "patch_size": 4, "img_size": 16,
                                    "layer_scale": 1e-5, **kind}))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = vit(layer_scale=1e-5, mask_token=True, **kind).eval()
    report = init_from(ours, tmp_path / "hf", part="")
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) < 0.4
    with torch.no_grad():
        theirs = hf(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        assert (ours(x, all_tokens=True, mask=mask) - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("kind", DINOV2_KINDS, ids=lambda k: f"{k['registers']}reg-{k['ffn']}")
def test_a_vit_exports_as_a_hugging_face_dinov2_model_with_its_features(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    backbone = dinov2_vit(**kind)
    run, model, _ = saved_run(tmp_path, backbone)
    model.backbone = backbone
    out = export(run, "student", tmp_path / "hf", format="hf")
    name = "Dinov2WithRegistersModel" if kind["registers"] else "Dinov2Model"
    hf, info = getattr(transformers, name).from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (hf.eval()(pixel_values=x).pooler_output - backbone(x)).abs().max() < 1e-5
    again = vit(layer_scale=1e-5, mask_token=True, **kind)
    report = init_from(again, out, part="")  # and back: the export's own description
    assert report.missing == [] and report.unexpected == []
    assert all(torch.equal(again.state_dict()[k], v) for k, v in backbone.state_dict().items())


def test_a_plain_vit_exports_as_dinov2_with_unit_scales(tmp_path):
    transformers = pytest.importorskip("transformers")
    run, model, _ = saved_run(tmp_path, vit())
    hf = transformers.Dinov2Model.from_pretrained(str(export(run, "student", tmp_path / "hf", format="hf")))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (hf.eval()(pixel_values=x).pooler_output - model.backbone.eval()(x)).abs().max() < 1e-5
    sincos, _, _ = saved_run(tmp_path / "s", vit(pos_embed="sincos", class_token=False))
    with pytest.raises(ValueError, match="format='hf' needs a ViT with a class token and learned positions"):
        export(sincos, "student", tmp_path / "hf2", format="hf")
    assert not (tmp_path / "hf2").exists()


def test_dinov2s_original_training_checkpoint_goes_in_with_chunked_blocks_and_registers(tmp_path):
    """dinov2's train checkpoints: teacher.backbone.blocks.<chunk>.<block>.*, register_tokens, mask_token."""
    source = dinov2_vit(registers=4, ffn="swiglu")
    chunked = {}
    for name, value in source.state_dict().items():
        if name.startswith("blocks."):
            index = int(name.split(".")[1])
            name = f"blocks.{index // 2}." + name.split(".", 1)[1]  # two chunks of two blocks
        chunked["backbone." + name.replace("patch_embed.", "patch_embed.proj.")] = value
    torch.save({"teacher": chunked, "iteration": 10}, tmp_path / "model_0000009.rank_0.pth")
    ours = vit(layer_scale=1e-5, mask_token=True, registers=4, ffn="swiglu").eval()
    report = init_from(ours, tmp_path / "model_0000009.rank_0.pth", part="")
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x, all_tokens=True), source(x, all_tokens=True))


def test_timms_dinov2_layout_with_registers_goes_in_and_out(tmp_path):
    """timm's vit_*_reg4_dinov2: reg_token, no position on the class token (folded into it)."""
    source = dinov2_vit(registers=4)
    timm_state = to_timm(source.state_dict())
    assert "reg_token" in timm_state and timm_state["pos_embed"].shape == (1, 16, 64)
    assert "mask_token" not in timm_state
    ours = vit(layer_scale=1e-5, registers=4).eval()
    report = init_from(ours, _saved(tmp_path / "timm.pth", timm_state), part="")
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (ours(x, all_tokens=True) - source(x, all_tokens=True)).abs().max() < 1e-5


def _saved(path: Path, state: dict) -> Path:
    torch.save(state, path)
    return path

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stepkit.schedules import (
    DECAYS,
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    layer_decay_scales,
    lr_at,
    momentum_at,
    param_groups,
    warmup_decay,
    wd_at,
)

# --- exact values against the closed form ------------------------------------------------

START, PEAK, FINAL, W, TOTAL = 0.1, 1.0, 0.2, 10, 110


def sched(step, decay, **kw):
    args = dict(start=START, peak=PEAK, final=FINAL, warmup_steps=W, total_steps=TOTAL, decay=decay)
    return warmup_decay(step, **(args | kw))


@pytest.mark.parametrize("decay", DECAYS)
def test_warmup_is_linear_from_start_to_peak(decay):
    assert sched(0, decay) == START
    assert sched(5, decay) == pytest.approx(START + (PEAK - START) * 5 / W, abs=1e-15)
    assert sched(W, decay) == PEAK  # the warm-up ends exactly at the peak


def test_cosine_mid_and_end():
    # u = (t - W) / (TOTAL - W); value = final + (peak - final) (1 + cos(pi u)) / 2
    assert sched(60, "cosine") == pytest.approx(FINAL + (PEAK - FINAL) * 0.5, abs=1e-15)
    assert sched(35, "cosine") == pytest.approx(
        FINAL + (PEAK - FINAL) * 0.5 * (1 + math.cos(math.pi * 0.25)), abs=1e-15
    )
    assert sched(TOTAL, "cosine") == pytest.approx(FINAL, abs=1e-15)
    assert sched(TOTAL + 50, "cosine") == pytest.approx(FINAL, abs=1e-15)


def test_linear_mid_and_end():
    assert sched(60, "linear") == pytest.approx((PEAK + FINAL) / 2, abs=1e-15)
    assert sched(85, "linear") == pytest.approx(PEAK + (FINAL - PEAK) * 0.75, abs=1e-15)
    assert sched(TOTAL, "linear") == pytest.approx(FINAL, abs=1e-15)


def test_step_decay_values():
    kw = dict(step_every=20, step_gamma=0.5, final=0.1)
    assert [sched(W + 20 * k, "step", **kw) for k in range(5)] == [1.0, 0.5, 0.25, 0.125, 0.1]


def test_constant_holds_the_peak():
    assert sched(W, "constant") == PEAK
    assert sched(TOTAL, "constant") == PEAK


def test_no_warmup_starts_at_peak_and_warmup_as_long_as_the_run_ends_at_peak():
    assert warmup_decay(0, peak=2.0, final=1.0, total_steps=10) == 2.0
    assert warmup_decay(10, peak=2.0, final=1.0, total_steps=10, warmup_steps=10) == 2.0
    assert warmup_decay(10, peak=2.0, final=1.0, total_steps=10, warmup_steps=10, start=0.0) == 2.0


def test_dino_teacher_momentum_formula():
    base, total = 0.996, 1000
    s = MomentumSchedule(momentum=base, momentum_final=1.0)
    for t in (0, 1, 250, 500, 999, 1000):
        expected = 1 - (1 - base) * (math.cos(math.pi * t / total) + 1) / 2
        assert momentum_at(t, s, total) == pytest.approx(expected, abs=1e-15)


def test_lr_and_wd_helpers_read_their_dataclass():
    lr = LRSchedule(lr=0.5, min_lr=0.05, warmup_steps=4, warmup_start_lr=0.01, decay="linear")
    assert lr_at(0, lr, 40) == 0.01
    assert lr_at(2, lr, 40) == pytest.approx(0.01 + (0.5 - 0.01) / 2)
    assert lr_at(22, lr, 40) == pytest.approx(0.5 + (0.05 - 0.5) * 0.5)
    wd = WDSchedule(wd=0.04, wd_final=0.4)  # DINO's cosine *increase*
    assert wd_at(0, wd, 100) == pytest.approx(0.04)
    assert wd_at(50, wd, 100) == pytest.approx(0.22)
    assert wd_at(100, wd, 100) == pytest.approx(0.4)
    assert wd_at(70, WDSchedule(wd=0.1), 100) == 0.1  # no wd_final: constant


# --- properties -----------------------------------------------------------------------------

values = st.floats(0.0, 10.0, allow_nan=False)
schedules = st.builds(
    dict,
    start=values,
    peak=values,
    final=values,
    total_steps=st.integers(1, 5000),
    warmup_frac=st.floats(0.0, 1.0),
    decay=st.sampled_from(DECAYS),
    step_every=st.integers(1, 500),
    step_gamma=st.floats(0.01, 1.0),
)


def build(s):
    s = dict(s)
    if s["decay"] == "step":  # only decreases: the final value is below the peak
        s["final"] = min(s["final"], s["peak"])
    s["warmup_steps"] = int(s.pop("warmup_frac") * s["total_steps"])
    return s


@settings(max_examples=200, deadline=None)
@given(schedules, st.data())
def test_bounded_by_start_peak_and_final(s, data):
    s = build(s)
    step = data.draw(st.integers(0, 2 * s["total_steps"]))
    v = warmup_decay(step, **s)
    lo, hi = min(s["start"], s["peak"], s["final"]), max(s["start"], s["peak"], s["final"])
    assert lo - 1e-12 <= v <= hi + 1e-12


@settings(max_examples=200, deadline=None)
@given(schedules)
def test_continuous_at_the_warmup_boundary(s):
    s = build(s)
    w = s["warmup_steps"]
    if w == 0:
        return
    # the warm-up formula at t = W gives the peak; so does the decay phase at t = W
    assert warmup_decay(w, **s) == pytest.approx(s["peak"], abs=1e-12)
    slope = abs(s["peak"] - s["start"]) / w
    assert abs(warmup_decay(w, **s) - warmup_decay(w - 1, **s)) <= slope + 1e-12


@settings(max_examples=150, deadline=None)
@given(schedules)
def test_monotone_within_each_phase(s):
    s = build(s)
    w, total = s["warmup_steps"], s["total_steps"]
    warm = [warmup_decay(t, **s) for t in range(0, w + 1)]
    decay = [warmup_decay(t, **s) for t in range(w, total + 2)]
    for phase, toward in ((warm, s["peak"] - s["start"]), (decay, s["final"] - s["peak"])):
        diffs = [b - a for a, b in zip(phase, phase[1:])]
        if s["decay"] == "constant" and phase is decay:
            assert all(d == 0 for d in diffs)
        elif toward >= 0:
            assert all(d >= -1e-12 for d in diffs)
        else:
            assert all(d <= 1e-12 for d in diffs)


@settings(max_examples=100, deadline=None)
@given(schedules, st.data())
def test_tensor_form_equals_float_form(s, data):
    s = build(s)
    step = data.draw(st.integers(0, 2 * s["total_steps"]))
    as_tensor = warmup_decay(torch.tensor(step), **s)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float64
    assert as_tensor.item() == pytest.approx(warmup_decay(step, **s), rel=1e-12, abs=1e-12)


def test_tensor_form_of_named_schedules():
    t = torch.tensor(37)
    lr = LRSchedule(lr=1e-3, warmup_steps=10)
    assert lr_at(t, lr, 100).item() == pytest.approx(lr_at(37, lr, 100), rel=1e-12)
    m = MomentumSchedule()
    assert momentum_at(t, m, 100).item() == pytest.approx(momentum_at(37, m, 100), rel=1e-12)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: LRSchedule(lr=-1e-3), "lr=-0.001"),
        (lambda: LRSchedule(lr=float("nan")), "lr=nan"),
        (lambda: LRSchedule(lr=1e-3, min_lr=1e-2), "min_lr=0.01"),
        (lambda: LRSchedule(warmup_steps=-1), "warmup_steps=-1"),
        (lambda: LRSchedule(warmup_start_lr=-0.1), "warmup_start_lr=-0.1"),
        (lambda: LRSchedule(decay="exp"), "decay='exp'"),
        (lambda: LRSchedule(step_every=0), "step_every=0"),
        (lambda: LRSchedule(step_gamma=1.5), "step_gamma=1.5"),
        (lambda: WDSchedule(wd=-0.1), "wd=-0.1"),
        (lambda: WDSchedule(wd_final=-1.0), "wd_final=-1.0"),
        (lambda: WDSchedule(wd_decay="step"), "wd_decay='step'"),
        (lambda: MomentumSchedule(momentum=1.5), "momentum=1.5"),
        (lambda: MomentumSchedule(momentum=-0.1), "momentum=-0.1"),
        (lambda: MomentumSchedule(momentum_final=2.0), "momentum_final=2.0"),
        (lambda: lr_at(0, LRSchedule(warmup_steps=200), 100), "warmup_steps=200"),
        (lambda: warmup_decay(0, peak=1.0, total_steps=0), "total_steps=0"),
        (lambda: warmup_decay(0, peak=1.0, final=2.0, total_steps=9, decay="step"), "final=2.0"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(make, field):
    with pytest.raises(ValueError, match="expected") as err:
        make()
    assert field in str(err.value)


def test_warmup_longer_than_run_says_the_run_length():
    with pytest.raises(ValueError, match=r"warmup_steps=200 .* total_steps=100"):
        lr_at(0, LRSchedule(warmup_steps=200), 100)


def test_unknown_decay_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'cosine', 'linear', 'step', 'constant'"):
        LRSchedule(decay="poly")


# --- tyro exposes the dataclasses as flags ---------------------------------------------------


def test_tyro_exposes_schedule_fields_as_flags():
    import dataclasses

    import tyro

    @dataclasses.dataclass
    class Optim(LRSchedule, WDSchedule):
        betas: tuple[float, float] = (0.9, 0.999)

    @dataclasses.dataclass
    class Config:
        optim: Optim = dataclasses.field(default_factory=Optim)
        ema: MomentumSchedule = dataclasses.field(default_factory=MomentumSchedule)

    cfg = tyro.cli(
        Config,
        args=["--optim.lr", "3e-4", "--optim.warmup-steps", "7", "--optim.wd-final", "0.4",
              "--ema.momentum", "0.99"],
    )
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 7 and cfg.optim.wd_final == 0.4
    assert cfg.ema.momentum == 0.99
    # a mixed config validates every part: a bad wd is caught although LRSchedule comes first
    with pytest.raises(ValueError, match="wd=-1.0"):
        Optim(wd=-1.0)


# --- per-group scales -------------------------------------------------------------------------


def test_layer_decay_scales():
    assert layer_decay_scales(3, 0.5) == [0.0625, 0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="decay=1.5"):
        layer_decay_scales(3, 1.5)


def test_param_groups_split_decay_and_layers():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    model[2].bias.requires_grad_(False)
    groups = param_groups(model)
    assert [(g["names"], g["wd_scale"]) for g in groups] == [
        (["0.weight", "2.weight"], 1.0),
        (["0.bias", "1.weight", "1.bias"], 0.0),
    ]
    layered = param_groups(model, layer_of=lambda n: int(n[0]), layer_scales=[0.25, 0.5, 1.0])
    by_name = {n: (g["lr_scale"], g["wd_scale"]) for g in layered for n in g["names"]}
    assert by_name == {
        "0.weight": (0.25, 1.0), "0.bias": (0.25, 0.0), "1.weight": (0.5, 0.0),
        "1.bias": (0.5, 0.0), "2.weight": (1.0, 1.0),
    }
    with pytest.raises(ValueError, match="layer_of"):
        param_groups(model, layer_of=lambda n: 5, layer_scales=[1.0])
    with pytest.raises(ValueError, match="together"):
        param_groups(model, layer_of=lambda n: 0)


def test_a_warmup_left_none_is_the_default_capped_at_a_tenth_of_the_run():
    from dataclasses import dataclass
    from typing import ClassVar

    from stepkit.schedules import LRSchedule, lr_at, warmup_steps_of

    @dataclass
    class Optim(LRSchedule):
        warmup_steps: int | None = None
        default_warmup: ClassVar[int] = 30

    optim = Optim(lr=1.0)
    assert [warmup_steps_of(optim, n) for n in (1500, 300, 20, 5)] == [30, 30, 2, 0]
    assert warmup_steps_of(Optim(lr=1.0, warmup_steps=7), 20) == 7  # an explicit value is kept
    assert warmup_steps_of(LRSchedule(warmup_steps=None), 100) == 0  # no default_warmup: none
    assert lr_at(1, optim, 20) == 0.5  # half-way through a 2-update warm-up
    assert lr_at(15, optim, 1500) == 0.5


# DINOv2's optimizer rules: sqrt lr scaling, ViT layer ids for layer-wise decay, the patch embedding's factor


def test_dinov2_lr_rule_is_sqrt_wrt_1024():
    from stepkit.schedules import scaled_lr

    # ssl_default_config: base lr 0.004 for 1024 images; vitl16_short runs 64 per GPU on 32 GPUs (2048)
    assert scaled_lr(0.004, 2048, 1024, rule="sqrt") == pytest.approx(0.004 * 2 ** 0.5, rel=1e-15)
    assert scaled_lr(0.004, 1024, 1024, rule="sqrt") == 0.004
    assert scaled_lr(5e-4, 1024, 256) == 2e-3  # DINO's linear rule, unchanged
    with pytest.raises(ValueError, match="rule='log' is not allowed"):
        scaled_lr(1e-3, 8, 8, rule="log")


def test_vit_layer_ids_and_dinov2s_groups_by_hand():
    from stepkit.models import VisionTransformer
    from stepkit.schedules import layer_decay_scales, no_decay_dinov2, param_groups, vit_layer_id

    vit = VisionTransformer(dim=16, depth=2, heads=2, patch_size=4, img_size=16, layer_scale=1e-5,
                            registers=1, mask_token=True)
    ids = {n: vit_layer_id(n, 2) for n, _ in vit.named_parameters()}
    assert {n for n, i in ids.items() if i == 0} == {"cls_token", "register_tokens", "mask_token",
                                                     "pos_embed",
                                                     "patch_embed.weight", "patch_embed.bias"}
    assert ids["blocks.0.ls1.gamma"] == 1 and ids["blocks.1.mlp.2.weight"] == 2 and ids["norm.weight"] == 3
    scales = layer_decay_scales(2, 0.9)  # [0.729, 0.81, 0.9, 1.0]
    groups = param_groups(vit, no_weight_decay=no_decay_dinov2, layer_of=lambda n: vit_layer_id(n, 2),
                          layer_scales=scales, lr_scale_of=lambda n: 0.2 if "patch_embed" in n else 1.0)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["patch_embed.weight"]["lr_scale"] == pytest.approx(0.729 * 0.2)
    assert by_name["cls_token"]["lr_scale"] == pytest.approx(0.729)
    assert by_name["cls_token"]["wd_scale"] == 1.0 and by_name["blocks.0.ls1.gamma"]["wd_scale"] == 0.0
    assert by_name["blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.9)
    assert by_name["norm.bias"]["lr_scale"] == 1.0 and by_name["norm.bias"]["wd_scale"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters()))

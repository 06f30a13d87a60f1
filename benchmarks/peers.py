"""One DINO step built from lightly's pieces against the same step built from stepkit's, side by side.

What a user switching libraries compares: the same backbone, projection
head, batch and multi-crop views, trained one DINO step at a time with

- ``lightly``: ``DINOProjectionHead``, ``DINOLoss`` (centering, teacher
  temperature), ``update_momentum`` for the teacher, ``cosine_schedule`` for
  the momentum, plain ``AdamW``, the gradient clipping and autocast a
  lightly example uses;
- ``stepkit``: the recipe's step (``DINOHead``, ``dino_loss`` +
  ``teacher_softmax`` + ``update_center``, ``forward_loss`` / ``accumulate``
  / ``clip`` / ``apply_update`` / ``ema_update`` / ``momentum_at``).

Before timing it checks that both losses are equal on the same inputs
(the same logits through lightly's ``DINOLoss`` and stepkit's functions).
lightly is a benchmark-time extra, never a dependency: ``pip install
--no-deps lightly`` (its package ``__init__`` imports torchvision for an
unrelated loss; where torchvision cannot import beside this torch, the
script stands in an empty ``torchvision`` module, which the DINO pieces do
not use, and says so).

    python benchmarks/peers.py                          # CPU, tiny sizes (also the CI smoke test)
    python benchmarks/peers.py --device cuda --size vit-s16

Prints a table; writes benchmarks/results/peers_<device>_<size>.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.abc
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from dino_step import SIZES, run_facts, sync  # noqa: E402

from stepkit import (  # noqa: E402
    MomentumSchedule,
    TrainState,
    accumulate,
    apply_update,
    clip,
    ema_update,
    forward_loss,
    momentum_at,
    param_groups,
)
from stepkit.losses.dino import dino_loss, teacher_softmax, update_center  # noqa: E402
from stepkit.models import DINOHead, VisionTransformer, multi_crop_forward  # noqa: E402

STUDENT_TEMP, TEACHER_TEMP, CENTER_M, CLIP, LR, WD, STEPS_IN_RUN = 0.1, 0.04, 0.9, 3.0, 5e-4, 0.04, 1000


class _AbsentAttributes(type):
    """``_Absent.NEAREST`` (timm reads torchvision's enums at import, as distinct dict keys) is another
    stand-in, one per name."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        member = _AbsentAttributes(name, (cls,), {})
        setattr(cls, name, member)
        return member


class _Absent(metaclass=_AbsentAttributes):
    """Stands for any torchvision name a peer's package imports but the compared code never uses."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("torchvision is not available here (benchmarks/peers.py stood in for it)")


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent


class _AbsentTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AbsentModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__, module.__version__ = [], "0.0.0"
        if module.__name__ == "torchvision":  # lightly.data calls it at import (its video reader)
            module.set_video_backend = lambda backend: None


def allow_without_torchvision() -> str:
    """Where torchvision cannot import beside this torch, stand in an empty one; say so (or "")."""
    try:
        importlib.import_module("torchvision")
    except Exception as err:  # noqa: BLE001 - not installed, or built for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _AbsentTorchvision())
        return f"torchvision does not import here ({type(err).__name__}); an empty stand-in was used"
    return ""


def import_peer(names: dict[str, str], what: str, install: str) -> tuple[types.SimpleNamespace | None, str]:
    """A peer's pieces, ``names`` mapping each name to the module it comes from, as one namespace (and
    the note of ``allow_without_torchvision``), or None and why not: ``what`` is not importable, ``install``
    brings it."""
    note = allow_without_torchvision()  # peers' packages import torchvision for pieces never used here
    try:
        found = {name: getattr(importlib.import_module(module), name) for name, module in names.items()}
    except Exception as err:  # noqa: BLE001
        return None, f"{what} is not importable ({type(err).__name__}: {err}); {install}"
    return types.SimpleNamespace(**found), note


def import_lightly() -> tuple[types.SimpleNamespace | None, str]:
    """lightly's DINO pieces, or None and why not."""
    return import_peer({"DINOLoss": "lightly.loss", "DINOProjectionHead": "lightly.models.modules",
                        "update_momentum": "lightly.models.utils",
                        "cosine_schedule": "lightly.utils.scheduler"},
                       "lightly", "pip install --no-deps lightly")


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views):
        return self.head(multi_crop_forward(self.backbone, None, views))


def build(size: dict, lightly, use_lightly_head: bool) -> Student:
    backbone = VisionTransformer.preset(size["vit"], img_size=size["global_size"], patch_size=size["patch"])
    if use_lightly_head:
        head = lightly.DINOProjectionHead(backbone.dim, size["hidden"], size["bottleneck"], size["out_dim"],
                                          batch_norm=False, freeze_last_layer=0, norm_last_layer=True)
    else:
        head = DINOHead(backbone.dim, size["out_dim"], hidden=size["hidden"], bottleneck=size["bottleneck"],
                        batch_norm=False)
    return Student(backbone, head)


def lightly_loop(student: Student, teacher: Student, lightly, device: torch.device, amp: torch.dtype | None,
                 out_dim: int):
    teacher.requires_grad_(False)  # built apart: lightly's weight-normed head cannot be deep-copied
    criterion = lightly.DINOLoss(output_dim=out_dim, warmup_teacher_temp=TEACHER_TEMP,
                                 teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                 center_momentum=CENTER_M).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)
    counter = [0]

    def step(views):
        m = lightly.cosine_schedule(counter[0], STEPS_IN_RUN, 0.996, 1.0)
        lightly.update_momentum(student, teacher, m)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            teacher_out = [teacher(v) for v in [[x] for x in views[:2]]]
            student_out = [student([v]) for v in views]
            loss = criterion(teacher_out, student_out, epoch=0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        opt.step()
        counter[0] += 1

    return step


def stepkit_loop(student: Student, device: torch.device, amp: str | None, out_dim: int):
    teacher = copy.deepcopy(student).requires_grad_(False)
    state = TrainState(model=student, target=teacher, optimizer=torch.optim.AdamW(
        param_groups(student), lr=LR, fused=device.type == "cuda"))
    center = torch.zeros(1, out_dim, device=device)
    ema = MomentumSchedule(momentum=0.996)

    def loss_fn(state, views):
        student_out = state.model(views)
        with torch.no_grad():
            teacher_out = teacher(views[:2])
        targets = teacher_softmax(teacher_out, center, TEACHER_TEMP)
        update_center(center, teacher_out, CENTER_M)
        return dino_loss(student_out, targets, student_temp=STUDENT_TEMP, n_student_views=len(views))

    def step(views):
        loss, _ = forward_loss(loss_fn, state, views, amp=amp)
        accumulate(state, loss)
        clip(state, max_norm=CLIP)
        apply_update(state, lr=LR, wd=WD)
        ema_update(state.target, state.model, momentum_at(state.step, ema, STEPS_IN_RUN))

    return step


def same_loss(lightly, size: dict, device: torch.device) -> float:
    """|lightly DINOLoss - stepkit's dino loss| on the same logits, float32, centre at zero (first call)."""
    g = torch.Generator().manual_seed(1)
    n_views, batch, k = 2 + size["local_crops"], size["batch"], size["out_dim"]
    student = torch.randn(n_views * batch, k, generator=g).to(device)
    teacher = torch.randn(2 * batch, k, generator=g).to(device)
    criterion = lightly.DINOLoss(output_dim=k, warmup_teacher_temp=TEACHER_TEMP, teacher_temp=TEACHER_TEMP,
                                 student_temp=STUDENT_TEMP, center_momentum=CENTER_M).to(device)
    theirs = criterion(list(teacher.chunk(2)), list(student.chunk(n_views)), epoch=0)
    targets = teacher_softmax(teacher, torch.zeros(1, k, device=device), TEACHER_TEMP)
    ours = dino_loss(student, targets, student_temp=STUDENT_TEMP, n_student_views=n_views)
    return float((theirs - ours).abs())


def time_steps(step, views, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step(views)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(views)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device, size = torch.device(args.device), SIZES[args.size]
    out = args.out or HERE / "results" / f"peers_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    lightly, note = import_lightly()
    g = torch.Generator().manual_seed(0)
    shapes = [size["global_size"]] * 2 + [size["local_size"]] * size["local_crops"]
    views = [torch.randn(size["batch"], 3, s, s, generator=g).to(device) for s in shapes]
    amp = "bf16" if device.type == "cuda" else None
    result = dict(benchmark="peers", size=args.size, **run_facts(device), note=note, rows=[])
    torch.manual_seed(0)
    ours = build(size, lightly, use_lightly_head=False).to(device)
    result["rows"].append(dict(loop="stepkit", step_ms=round(1e3 * time_steps(
        stepkit_loop(ours, device, amp, size["out_dim"]), views, device, args.warmup, args.steps), 2)))
    if lightly is None:
        result["lightly"] = note
        print(f"lightly: {note}; only stepkit timed")
    else:
        result["loss_difference"] = same_loss(lightly, size, device)
        torch.manual_seed(0)
        theirs = build(size, lightly, use_lightly_head=True).to(device)
        torch.manual_seed(0)
        their_teacher = build(size, lightly, use_lightly_head=True).to(device)
        dtype = torch.bfloat16 if amp == "bf16" else None
        result["rows"].append(dict(loop="lightly", step_ms=round(1e3 * time_steps(
            lightly_loop(theirs, their_teacher, lightly, device, dtype, size["out_dim"]), views, device,
            args.warmup, args.steps), 2)))
        import lightly as lightly_package

        result["lightly_version"] = lightly_package.__version__
    for row in result["rows"]:
        row["images_per_s"] = round(size["batch"] / (row["step_ms"] / 1e3), 1)
    if len(result["rows"]) == 2:
        result["stepkit_speedup"] = round(result["rows"][1]["step_ms"] / result["rows"][0]["step_ms"], 3)
    print(f"DINO step from each library's pieces, {args.size} on {result['device']}, "
          f"torch {torch.__version__}" + (f", lightly {result.get('lightly_version')}" if lightly else ""))
    if note:
        print(f"note: {note}")
    if "loss_difference" in result:
        print(f"same inputs, |lightly DINOLoss - stepkit dino_loss| = {result['loss_difference']:.2e}")
    print(f"{'loop':<12}{'step ms':>10}{'img/s':>10}")
    for r in result["rows"]:
        print(f"{r['loop']:<12}{r['step_ms']:>10.2f}{r['images_per_s']:>10.1f}")
    if "stepkit_speedup" in result:
        print(f"stepkit: {result['stepkit_speedup']:.2f}x lightly's images/s")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

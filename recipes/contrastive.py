"""Contrastive embedding training: an image tower and a text tower matched by in-batch InfoNCE.

    python recipes/contrastive.py --run-dir runs/contrastive             # MiniLM + LoRA, CPU, minutes
    python recipes/contrastive.py tiny --run-dir runs/c-tiny              # from-scratch text tower
    python recipes/contrastive.py --run-dir runs/c --gradcache.chunk 16 --batch-size 256
    python recipes/contrastive.py tiny --run-dir runs/c-kd --distill.teacher-run runs/contrastive
    python recipes/contrastive.py --data.pairs pairs.csv --data.image-size 224   # your image-text pairs
    python recipes/contrastive.py --data.pairs qa.jsonl --data.kind text-text     # anchor / positive texts
    python recipes/contrastive.py --model.image ./vit --model.lock-image  # LiT: a locked HF image tower
    python recipes/contrastive.py --init.from runs/dino --init.part teacher       # the image tower from DINO

Images (the embedded captioned digits, or your own pairs file) go through a
small CNN (or a pretrained Hugging Face image model, with LoRA or locked as
in LiT), captions through pretrained all-MiniLM-L6-v2 fine-tuned with LoRA
(or another Hugging Face text model, or a small text encoder trained from
scratch); both are projected to a
shared space and L2-normalised. The loss is CLIP's symmetric InfoNCE with a
learnable, clamped logit scale, over every pair of the batch (gathered
across ranks under torchrun). Gradient caching lets the batch outgrow
activation memory; a frozen teacher run can be distilled in. The run ends
with held-out retrieval recall@1/5/10 both ways, before and after training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from stepkit import dist
from stepkit.augment import normalize, to_unit
from stepkit.check import at_least, fail, integer_at_least
from stepkit.cli import cli, run_main
from stepkit.config import Amp, CkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import PairDataConfig, PairSets, pair_sets, pairs_record, seeded_loader, train_batches
from stepkit.data.paired import batch_negatives
from stepkit.evaluation import chance_recall_at_k, held_out_retrieval, paired_relevance, repeated_targets_line
from stepkit.gradcache import gradcache
from stepkit.log import LogConfig
from stepkit.losses.contrastive import (
    clip_loss,
    embedding_mse,
    matryoshka_loss,
    siglip_loss,
    similarity_distillation_loss,
)
from stepkit.models import pretrained_image_stats
from stepkit.models.text import text_extra, tokens_of
from stepkit.monitor import collapse_metrics
from stepkit.probe import ProbeRecord
from stepkit.run import Run, params_digest, pick_device, seed_everything, set_threads
from stepkit.schedules import LRSchedule, WDSchedule, lr_at, param_groups, wd_at
from stepkit.seeds import seed_of
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss
from stepkit.tuning import TuneConfig, tune
from stepkit.two_tower import (
    Renormalized,
    TwoTower,
    TwoTowerConfig,
    describe_towers,
    image_tower,
    init_towers,
    load_teacher,
    lock_image_tower,
    shares_text_tower,
    text_tower,
    tower_extras,
)
from stepkit.weights import InitConfig
from stepkit.weights.hub import TIMM_PREFIX, timm_vit


@dataclass
class Loss:
    kind: Literal["clip", "siglip"] = "clip"
    """clip: CLIP's symmetric InfoNCE (a softmax over the batch); siglip: SigLIP's pairwise sigmoid loss
    with a learnable bias (under torchrun the other ranks' texts come around a ring, never all at once)."""
    init_temperature: float | None = None
    """The starting temperature; None: 0.07 (CLIP), 0.1 (SigLIP's log t = log 10)."""
    init_bias: float = -10.0
    """SigLIP: the starting logit bias (the paper's -10)."""
    max_logit_scale: float = 100.0
    local_loss: bool = True
    """Under torchrun: each rank's rows against all gathered columns (False: the full matrix on
    every rank; CLIP only)."""
    matryoshka_dims: tuple[int, ...] = ()
    """Matryoshka: train the embeddings' first d dimensions as embeddings too (e.g. 128 64 32 16, the
    full --model.embed-dim first); the evaluation reports recall at each. Empty: off."""
    matryoshka_weights: tuple[float, ...] = ()
    """One weight per --loss.matryoshka-dims width (empty: 1 each)."""

    def __post_init__(self) -> None:
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            fail("loss.matryoshka_weights", self.matryoshka_weights,
                 f"one weight per --loss.matryoshka-dims width ({len(self.matryoshka_dims)})")
        dims = self.matryoshka_dims
        if len(set(dims)) != len(dims) or min(dims, default=1) < 1:
            fail("loss.matryoshka_dims", self.matryoshka_dims, "distinct widths of at least 1")

    @property
    def temperature(self) -> float:
        default = 0.1 if self.kind == "siglip" else 0.07
        return default if self.init_temperature is None else self.init_temperature


@dataclass
class Distill:
    teacher_run: Path | None = None
    """A finished run of this recipe (any model settings) whose last checkpoint is the frozen teacher."""
    kind: Literal["kl", "mse"] = "kl"
    """KL between the in-batch image-text similarity distributions, or MSE between embeddings."""
    weight: float = 1.0
    temperature: float = 0.1

    def __post_init__(self) -> None:
        at_least("weight", self.weight, 0.0)
        at_least("temperature", self.temperature, 1e-4)


@dataclass
class GradCache:
    chunk: int = 0
    """Rows per encoder pass with gradient caching (0: off, the whole batch at once)."""

    def __post_init__(self) -> None:
        integer_at_least("chunk", self.chunk, 0)


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int | None = None
    """Updates of linear warm-up; None: 20, or a tenth of --train.steps when that is shorter."""
    default_warmup: ClassVar[int] = 20
    wd: float = 0.05
    clip: float | None = 1.0
    """Largest global gradient norm (None: no clipping)."""
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (CLIP's, open_clip's from scratch: 0.9 0.98 eps 1e-6)
    eps: float = 1e-8


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/contrastive")
    init: InitConfig = field(default_factory=InitConfig)
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 64
    """Pairs per update on each rank; under torchrun every rank's pairs are negatives for all."""
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    loss: Loss = field(default_factory=Loss)
    distill: Distill = field(default_factory=Distill)
    gradcache: GradCache = field(default_factory=GradCache)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300))
    optim: Optim = field(default_factory=Optim)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=20))
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=100))
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 2)
        if self.data.shards is not None and self.model.text == "scratch":
            fail("model.text", "scratch", "a pretrained tokenizer (minilm or a Hugging Face folder) with "
                 "--data.shards: a from-scratch tower's vocabulary is built from every caption up front")
        if self.data.negative_columns and self.gradcache.chunk:
            fail("gradcache.chunk", self.gradcache.chunk, "0 with --data.negative-columns (not chunked)")
        if self.data.shards is not None and self.tune.measures:
            fail("data.shards", self.data.shards, "None with --tune.* (it tunes on --data.pairs or digits)")
        if not all(0 <= beta < 1 for beta in self.optim.betas):
            fail("optim.betas", self.optim.betas, "two numbers in [0, 1), as 0.9 0.98")
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


PRESETS = {
    "minilm-lora": ("The default: pretrained MiniLM text tower with LoRA, CNN image tower, CPU.", Config()),
    "tiny": (
        "Both towers from scratch (no pretrained model, no extra packages); fastest.",
        Config(model=TwoTowerConfig(text="scratch"), train=TrainConfig(steps=400),  # beta2 0.999: -5 recall@1
               optim=Optim(lr=3e-3, warmup_steps=20, betas=(0.9, 0.98), eps=1e-6)),
    ),
    "siglip": (
        "tiny with SigLIP's sigmoid loss (t = 10, b = -10 learnable), 3x as long (it starts slower).",
        Config(model=TwoTowerConfig(text="scratch"), train=TrainConfig(steps=1200),
               optim=Optim(lr=3e-3, warmup_steps=20), loss=Loss(kind="siglip")),
    ),
    "matryoshka": (
        "tiny with Matryoshka embeddings: its first 16, 8 and 4 dimensions trained too (weights 1/4 each).",
        Config(model=TwoTowerConfig(text="scratch"), train=TrainConfig(steps=400),
               optim=Optim(lr=3e-3, warmup_steps=20), loss=Loss(matryoshka_dims=(128, 16, 8, 4),
                                                           matryoshka_weights=(1.0, 0.25, 0.25, 0.25))),
    ),
}


@dataclass
class Teacher:
    """--distill.teacher-run: a finished run's towers, frozen, and its tokens of the training texts."""

    model: TwoTower
    tokenize: Callable
    captions: dict | None  # None: streamed captions, tokenized a batch at a time
    anchors: dict | None  # text-text only


def distillation_teacher(cfg: Config, data: PairSets, vocabulary: list[str], device: torch.device, mean,
                         std) -> Teacher | None:
    """The teacher of --distill.*, fed this run's images its own way (its normalisation, its channels)."""
    if cfg.distill.teacher_run is None or cfg.distill.weight <= 0:
        return None
    text_only = cfg.data.kind == "text-text"
    model, tokenize, takes = load_teacher(cfg.distill.teacher_run, vocabulary, data.channels, device)
    if takes is not None and not text_only:
        given = (mean, std) if mean is not None else ((0.0,), (1.0,))
        wanted = (takes.get("mean", (0.0,)), takes.get("std", (1.0,)))
        model.image = Renormalized(model.image, given, wanted, int(takes.get("channels", 3)))
    return Teacher(model, tokenize, tokenize(data.train_texts) if data.shards is None else None,
                   tokenize(data.train_anchors) if text_only else None)


def pair_loss(cfg: Loss, model: TwoTower, *embedded: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CLIP's or SigLIP's loss of the embedded (queries, texts[, hard negatives]), over the leading widths
    of --loss.matryoshka-dims if asked."""
    scale, bias = model.logit_scale(), model.logit_bias() if model.logit_bias is not None else None

    def loss_fn(image, text, negatives=None):
        if cfg.kind == "siglip":
            return siglip_loss(image, text, scale, bias, negatives=negatives)
        return clip_loss(image, text, scale, negatives=negatives, local_loss=cfg.local_loss)

    terms = {"logit_scale": scale.detach(), **({"logit_bias": bias.detach()} if bias is not None else {})}
    if not cfg.matryoshka_dims:
        return loss_fn(*embedded), terms
    total, each = matryoshka_loss(loss_fn, *embedded, dims=cfg.matryoshka_dims,
                                  weights=cfg.matryoshka_weights or None)
    return total, {**terms, **{f"contrastive_d{d}": v.detach() for d, v in each.items()}}


def contrastive_objective(cfg: Config, model: TwoTower, teacher: Teacher | None, embedded: tuple, images,
                          rows) -> tuple[torch.Tensor, dict]:
    """The loss of a batch's embeddings (queries, texts[, hard negatives]): CLIP's or SigLIP's
    (``pair_loss``), plus --distill.*'s term against the teacher's embeddings of the same ``images`` (or
    anchors' tokens) and ``rows`` (their captions)."""
    image, text = embedded[:2]
    contrastive, terms = pair_loss(cfg.loss, model, *embedded)
    queries = "anchor_" if cfg.data.kind == "text-text" else "image_"
    aux = {"contrastive": contrastive, **terms, **collapse_metrics(image, queries)}
    if teacher is None:
        return contrastive, aux
    with torch.no_grad():
        t_tokens = tokens_of(rows, teacher.captions, teacher.tokenize, text.device)
        if teacher.anchors is not None:  # text-text: the teacher's own tokens of the anchors
            images = tokens_of(rows, teacher.anchors, teacher.tokenize, text.device)
        t_image, t_text = teacher.model(images, t_tokens)
    if cfg.distill.kind == "kl":
        distill = similarity_distillation_loss(image, text, t_image, t_text, cfg.distill.temperature)
    else:
        distill = embedding_mse(torch.cat([image, text]), torch.cat([t_image, t_text]))
    return contrastive + cfg.distill.weight * distill, {**aux, "distill": distill}


def pretrained_image(cfg: Config, mean, std) -> tuple[nn.Module | None, tuple | None, tuple | None]:
    """A pretrained image tower's normalisation (and a timm ViT built with its hub weights, unless
    --init.from brings them); else None and the data's own."""
    m = cfg.model
    if m.image == "cnn" or cfg.data.kind != "image-text":
        return None, mean, std
    if m.image.startswith(TIMM_PREFIX):
        return timm_vit(m.image, pretrained=cfg.init.from_ is None and not cfg.resuming)
    return None, *pretrained_image_stats(m.image)


@torch.no_grad()
def held_out_embeddings(model: TwoTower, data: PairSets, tokenize, prep, loader) -> tuple[torch.Tensor, ...]:
    """The held-out queries' (images, or anchors) and texts' embeddings, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    tokens = lambda texts: {k: v.to(device) for k, v in tokenize(texts).items()}  # noqa: E731
    if data.test_anchors is not None:
        queries = model.image(**tokens(data.test_anchors))
    else:
        queries = torch.cat([model.image(prep(x)) for x, _ in loader(data.test, batch_size=256)])
    embedded = model.text(**tokens(data.test_texts))
    model.train()  # a locked image encoder stays in eval mode (stepkit.models.lock)
    return queries, embedded


def build_model(cfg: Config, vocabulary: list[str], in_chans: int, image) -> tuple[TwoTower, Callable]:
    """A query tower (images, the anchors' text, or None: the text tower's), the captions' text tower and
    their tokenizer; the logit scale (and SigLIP's bias); LiT's lock (--model.lock-image*)."""
    m, text_only = cfg.model, cfg.data.kind == "text-text"
    queries = (None if shares_text_tower(m, text_only) else text_tower(m, vocabulary)[0] if text_only
               else image_tower(m, in_chans, image=image))
    text, tokenize = text_tower(m, vocabulary)
    model = TwoTower(queries, text, m.embed_dim, init_temperature=cfg.loss.temperature,
                     max_logit_scale=cfg.loss.max_logit_scale,
                     init_bias=cfg.loss.init_bias if cfg.loss.kind == "siglip" else None)
    lock_image_tower(model, m)
    if max(cfg.loss.matryoshka_dims, default=0) > model.text.dim:
        fail("loss.matryoshka_dims", cfg.loss.matryoshka_dims, f"widths of at most {model.text.dim}")
    return model, tokenize


def result_line(cfg: Config, model: TwoTower, before: dict, after: dict, chance: float) -> str:
    """The run's last line: held-out recall@1 both ways, where it started, chance."""
    text_only = cfg.data.kind == "text-text"
    (f, b), ways = (("a2p", "p2a"), "anchor->positive, positive->anchor") if text_only else \
        (("i2t", "t2i"), "image->text, text->image")
    begun = "zero-shot" if model.image is model.text and cfg.model.text != "scratch" else "before training"
    return (f"held-out recall@1 {ways} {after[f'recall_at_1_{f}']:.3f} / {after[f'recall_at_1_{b}']:.3f} "
            f"({begun} {before[f'recall_at_1_{f}']:.3f} / {before[f'recall_at_1_{b}']:.3f}, chance "
            f"{chance:.3f}); summary in {cfg.run_dir / 'summary.json'}")


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)  # torchrun: join the group, one device each
    data = pair_sets(cfg.data, seed=cfg.train.seed)  # the digits, your pairs file, or shards
    if data.about and dist.is_main():
        print(data.about, flush=True)
    m, in_chans = cfg.model, data.channels
    for package in tower_extras(m):  # the 'text' extra: say so before any folder is made
        text_extra(package)
    seed_everything(cfg.train.seed)
    image, mean, std = pretrained_image(cfg, data.mean, data.std)  # a pretrained tower: its own normalisation

    def prep(x: torch.Tensor) -> torch.Tensor:  # to the device, normalised (the digits: as they are)
        return x.to(device) if mean is None else normalize(to_unit(x.to(device)), mean, std)

    text_only, train_texts, train_anchors = cfg.data.kind == "text-text", data.train_texts, data.train_anchors
    vocabulary = train_texts + (train_anchors or [])  # a from-scratch tower's words
    model, tokenize = build_model(cfg, vocabulary, in_chans, image)
    inits = init_towers(model, cfg.init) if not cfg.resuming else []  # weights only
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    for report in inits if dist.is_main() else []:
        print(report.line(), flush=True)
    model = model.to(device)
    probe = ProbeRecord("retrieval", data=pairs_record(cfg.data, cfg.train.seed), batch_size=256,
                        queries="image", widths=list(cfg.loss.matryoshka_dims))  # stepkit eval's
    parts = describe_towers(m, model, tokenize, text_only=text_only, image_size=cfg.data.image_size,
                            in_chans=in_chans, mean=mean, std=std, probe=probe.as_dict())
    teacher = distillation_teacher(cfg, data, vocabulary, device, mean, std)  # None: --distill off
    tokens = tokenize(train_texts) if data.shards is None else None  # every caption once; streamed: per batch
    anchor_tokens = tokenize(train_anchors) if text_only else None
    n_negatives = len(cfg.data.negative_columns)  # hard negatives a row: a pairs file's tokenized once
    negative_tokens = tokenize(list(chain(*data.train_negatives))) if data.train_negatives else None
    workers = cfg.data.workers if data.files else 0  # tensors in memory are read by the main process
    set_threads(cfg.threads, device=device, workers=workers)  # the workers take cores from the model

    def loader(dataset, **kw) -> DataLoader:  # seeded apart from the global RNG; workers ignore SIGTERM
        return seeded_loader(dataset, seed=cfg.train.seed, workers=workers, timeout=cfg.data.timeout, **kw)

    relevant = paired_relevance(*data.test_pairs)  # which held-out rows answer each other
    evaluate = lambda: held_out_retrieval(  # noqa: E731  recall@1/5/10, MRR@10, NDCG@10, each Matryoshka width
        *held_out_embeddings(model, data, tokenize, prep, loader), relevant, widths=cfg.loss.matryoshka_dims,
        text_only=text_only)
    repeats = repeated_targets_line(data.test_texts, "texts" if text_only else "captions")
    if repeats and dist.is_main():
        print(repeats, flush=True)
    before = evaluate()
    # Under torchrun: DDP, or FSDP2 with each tower sharded on its own (evaluation calls them alone).
    # The logit scale only the loss uses: left out of both, its gradient averaged below.
    wrapped = dist.parallelize(model, cfg.dist.strategy, device, shard=lambda m: [m.image, m.text],
                               param_dtype=torch.bfloat16 if cfg.amp == "bf16" else None,
                               ignore=[n for n, _ in model.named_parameters() if n.startswith("logit_")])
    if dist.world_size() > 1:  # the same initial weights everywhere; each rank its own dropout
        seed_everything(seed_of(cfg.train.seed, "rank", dist.rank()))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    optimizer = adamw(param_groups(model), device=device, betas=cfg.optim.betas, eps=cfg.optim.eps)  # fused
    state = TrainState(model=wrapped, optimizer=optimizer, scaler=scaler, accum=cfg.train.accum)

    def to_device(batch):
        """A loader's batch -> (images or anchor tokens, their captions' tokens, their rows, their hard
        negatives' tokens or None) on the device."""
        rows = batch[-1]  # text-text: the anchors' tokens stand where the images would
        queries = tokens_of(rows, anchor_tokens, tokenize, device) if text_only else prep(data.images(batch))
        negatives = tokens_of(batch_negatives(batch, n_negatives), negative_tokens, tokenize,  # shards: texts
                              device) if n_negatives else None
        return queries, tokens_of(rows, tokens, tokenize, device), rows, negatives

    objective = partial(contrastive_objective, cfg, model, teacher)  # ((image, text[, negs]), images, rows)

    def loss_fn(state: TrainState, batch):
        images, toks, rows, negatives = batch
        return objective(state.model(images, toks, negatives), images, rows)

    if cfg.tune.measures:  # measure instead of training: no run, no checkpoint, no log
        def make_batch(size: int):  # files: epoch 0's crops
            idx = torch.randint(0, len(data.train), (size,)).tolist()
            return to_device(default_collate([data.train[i] for i in idx]))
        return tune(cfg.tune, cfg.run_dir, loss_fn, state, make_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    # An epoch-seeded order, or each shard reader's place, resumed; every batch counted as consumed
    batches = train_batches(data.train, state, batch_size=cfg.batch_size, seed=cfg.train.seed,
                            workers=workers, shards=data.shards, prepare=to_device,
                            skip_unreadable=cfg.data.skip_unreadable, timeout=cfg.data.timeout)
    with run.start(state, steps=cfg.train.steps, meta={"parts": parts}):  # resumed when asked; log; signals
        for batch in run.batches(batches):  # saved between updates; ends at the last step or a signal
            if cfg.gradcache.chunk:  # the same loss, the encoders run chunk by chunk
                images, _, rows, _ = batch
                loss, aux, due = gradcache(
                    state, lambda part: state.model(*part), batch[:2],
                    lambda i, t, images=images, rows=rows: objective((i, t), images, rows),
                    chunk=cfg.gradcache.chunk, amp=cfg.amp)
            else:
                loss, aux = forward_loss(loss_fn, state, batch, amp=cfg.amp)
                due = accumulate(state, loss)
            if not due:
                continue
            for shared in (model.logit_scale.log_scale, getattr(model.logit_bias, "bias", None)):
                if shared is not None and shared.grad is not None:  # outside DDP / FSDP2: averaged here
                    dist.all_reduce_mean(shared.grad)
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, cfg.train.steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, cfg.train.steps))
            run.after_update({"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr})  # NaN watch, log

    after, n = evaluate(), len(relevant)
    summary = run.summary(
        **after, **{f"{k}_before": v for k, v in before.items()},
        **{f"recall_at_{k}_chance": chance_recall_at_k(n, n, k, relevant=relevant) for k in (1, 5)},
        logit_scale=float(model.logit_scale().detach()), skipped_unreadable=data.skipped,
        **({"logit_bias": float(model.logit_bias().detach())} if model.logit_bias is not None else {}),
        params_digest=params_digest(model), **({"init": [r.as_dict() for r in inits]} if inits else {}))
    if cfg.dist.strategy == "ddp":  # every replica must hold the same parameters (buffers differ:
        weights = dict(model.named_parameters())  # each rank's last BatchNorm statistics are its own)
        summary["replicas_identical"] = dist.same_on_all_ranks(params_digest(weights))
    run.log.write({k: v for k, v in summary.items() if k.startswith("recall")}, state.step)
    if not run.finish(summary):  # summary.json written; only rank 0 prints
        return summary
    print(result_line(cfg, model, before, after, summary["recall_at_1_chance"]))
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

"""JEPA on sequences: predict the representations of masked spans of a time series, or masked words.

    python recipes/jepa_sequences.py --run-dir runs/jepa-ts             # masked spans of UCR series (sktime)
    python recipes/jepa_sequences.py text --run-dir runs/jepa-text      # BERT-style masking, topic sentences
    python recipes/jepa_sequences.py --data.path mine.npz --data.window 64 --mask.span 8   # your own series
    python recipes/jepa_sequences.py --loss.kind contrastive            # or multiscale: the loss variants
    python recipes/jepa_sequences.py --help

I-JEPA's structure over one token per time step or word: the context
encoder (a masked temporal CNN that never sees the masked spans, or a
transformer reading BERT-corrupted ids) feeds a transformer predictor that
fills every masked position, regressed on the EMA target encoder's
layer-normed tokens of the clean sequence there. ``--levels.depths`` makes it
hierarchical (a head per level), ``--loss.var-weight`` / ``--loss.cov-weight``
add VICReg's guard against collapse. Images: ``recipes/ijepa.py``.

The data kind (``--data.kind timeseries|text``, the presets of those names)
picks the encoder, the masks and the baseline once, before the loop:

- time series: the UCR / UEA set ``--data.name`` inside sktime's wheel (or
  your ``--data.path``), channels standardised, windows of ``--data.window``
  steps every ``--data.stride``; spans of ``--mask.span`` steps masked until
  ``--mask.ratio`` of the window is covered; baseline: each series resampled
  to the window;
- text: topic-labelled sentences of chatterbot-corpus, ``--mask.ratio`` of
  the tokens chosen, a ``--mask.random-token-p`` share of them replaced by a
  random token, the rest by the mask token; baseline: a bag of words.

The run ends with I-JEPA's evaluation on held-out series (sentences): a
linear probe and k-NN on the target encoder's pooled tokens, last layer and
last ``--eval.layers`` layers, beside the same network untrained and the
baseline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from stepkit import dist
from stepkit.check import fail, in_range, integer_at_least, one_of
from stepkit.cli import cli, run_main
from stepkit.config import Amp, CkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import (
    CHAT_TOPICS,
    UCR_UEA,
    chat_topics,
    load_series_npz,
    tokenized_sentences,
    train_batches,
    ucr_uea,
    windowed_series,
)
from stepkit.ema import ema_update, target_copy
from stepkit.evaluation import frozen_probes, probes_line
from stepkit.jepa import (
    JEPALoss,
    Levels,
    TargetAlarm,
    head_level,
    jepa_shard_units,
    level_losses,
    level_lr_scales,
    level_values_at,
    raw_sequence_features,
    sequence_features,
    target_collapse_watch,
)
from stepkit.log import LogConfig
from stepkit.masking import span_masks, token_masks
from stepkit.models import MaskedTemporalCNN, SequenceJEPA, SequencePredictor, TokenTransformer
from stepkit.models.jepa import layer_dims
from stepkit.models.sequence import sequence_tokens
from stepkit.monitor import collapse_metrics
from stepkit.probe import ProbeRecord
from stepkit.run import Run, params_digest, pick_device, seed_everything, set_threads
from stepkit.schedules import (
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    lr_at,
    momentum_at,
    param_groups,
    wd_at,
)
from stepkit.seeds import seed_of
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss
from stepkit.tuning import TuneConfig, tune
from stepkit.weights import InitConfig, describe_part


@dataclass
class Data:
    kind: Literal["timeseries", "text"] = "timeseries"
    """timeseries: spans of time steps masked, a masked temporal CNN; text: BERT-style token masking, a
    token transformer (the presets of those names)."""
    seed: int = 0
    """text: the seed of the held-out split."""
    name: str = "OSULeaf"
    """timeseries: the UCR / UEA set inside sktime's wheel (needs the timeseries extra), one of
    ArrowHead, BasicMotions, GunPoint, ItalyPowerDemand, JapaneseVowels, OSULeaf."""
    path: Path | None = None
    """timeseries: your own series instead: an .npz (or a folder of .npy files) with x_train (N, T) or
    (N, C, T), y_train (N,) integer labels, x_test, y_test."""
    window: int = 128
    """timeseries: time steps per training window (at most the shortest series)."""
    stride: int = 16
    """timeseries: steps between two windows of a series (training windows; a held-out series is
    described by the mean of its windows' features)."""
    topics: tuple[str, ...] = CHAT_TOPICS
    """text: the chatterbot-corpus topics that label the sentences (needs the text-jepa extra)."""
    per_topic: int = 200
    """text: the most sentences per topic."""
    tokenizer: Literal["word", "minilm"] = "word"
    """text: a word vocabulary of the training sentences, or MiniLM's WordPiece tokenizer (text extra)."""
    max_len: int = 32
    """text: tokens per sentence (longer ones are cut)."""
    unlabelled: bool = True
    """text: pretrain on every sentence of the corpus except the held-out ones (all 21 topics; the probe
    still fits on the labelled training split alone); --data.no-unlabelled: the labelled training split."""

    def __post_init__(self) -> None:
        integer_at_least("window", self.window, 2)
        integer_at_least("stride", self.stride, 1)
        integer_at_least("per_topic", self.per_topic, 2)
        integer_at_least("max_len", self.max_len, 2)
        if self.kind == "timeseries" and self.path is None:
            one_of("name", self.name, UCR_UEA)
        if self.kind == "text" and not self.topics:
            fail("topics", self.topics, "at least two topics")


@dataclass
class Model:
    widths: tuple[int, ...] = (32, 64, 128, 128)
    """timeseries: channels of each stage of the masked temporal CNN."""
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    """timeseries: each stage's dilation (): 1 for every stage."""
    kernel: int = 5
    """timeseries: the temporal kernel size (odd)."""
    transformer_dim: int = 64
    """text: the token transformer's width."""
    transformer_depth: int = 4
    """text: its blocks."""
    transformer_heads: int = 4
    """text: its attention heads."""
    predictor_dim: int = 64
    predictor_depth: int = 2
    """The transformer predictor's blocks."""
    predictor_heads: int = 4

    def __post_init__(self) -> None:
        integer_at_least("model.predictor_dim", self.predictor_dim, 1)
        integer_at_least("model.predictor_depth", self.predictor_depth, 1)
        if not self.widths:
            fail("model.widths", self.widths, "at least one stage")
        if self.dilations and (len(self.dilations) != len(self.widths) or min(self.dilations) < 1):
            fail("model.dilations", self.dilations,
                 f"one dilation >= 1 per stage (model.widths={self.widths})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            fail("model.kernel", self.kernel, "an odd size >= 1")
        integer_at_least("model.transformer_depth", self.transformer_depth, 1)
        if self.transformer_dim < 1 or self.transformer_dim % self.transformer_heads:
            fail("model.transformer_dim", self.transformer_dim,
                 f"a positive multiple of model.transformer_heads={self.transformer_heads}")


@dataclass
class Mask:
    span: int = 16
    """timeseries: length in time steps of each masked span (spans are added at random starts until
    --mask.ratio of the window is covered)."""
    ratio: float = 0.5
    """timeseries: the share of each window masked; text: the share of tokens chosen (BERT: 0.15)."""
    random_token_p: float = 0.1
    """text: a chosen token becomes a random token with this probability, else the mask token."""

    def __post_init__(self) -> None:
        integer_at_least("span", self.span, 1)
        if not 0 < self.ratio < 1:
            fail("ratio", self.ratio, "a number in (0, 1)")
        in_range("random_token_p", self.random_token_p, 0.0, 1.0)


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int | None = None
    """Updates of linear warm-up; None: 100, or a tenth of --train.steps when that is shorter."""
    default_warmup: ClassVar[int] = 100
    wd: float = 0.04
    wd_final: float | None = 0.4
    clip: float | None = 1.0


@dataclass
class Eval:
    layers: int = 4
    """The second linear probe reads the last this many layers (CNN stages, transformer blocks)
    concatenated."""
    k: int = 20
    temperature: float = 0.07
    linear: bool = may_change_on_resume(True)
    """Fit the linear probes (--eval.no-linear: k-NN only, a few seconds less)."""

    def __post_init__(self) -> None:
        integer_at_least("eval.layers", self.layers, 1)
        integer_at_least("eval.k", self.k, 1)


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/jepa-timeseries")
    init: InitConfig = field(default_factory=InitConfig)
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 64
    """Windows (sentences) per update on each rank."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    mask: Mask = field(default_factory=Mask)
    loss: JEPALoss = field(default_factory=JEPALoss)
    levels: Levels = field(default_factory=Levels)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000))
    optim: Optim = field(default_factory=Optim)
    ema: MomentumSchedule = field(
        default_factory=lambda: MomentumSchedule(momentum=0.99, momentum_final=0.999))
    eval: Eval = field(default_factory=Eval)
    alarm: TargetAlarm = field(default_factory=TargetAlarm)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=250))
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 1)
        if self.data.kind == "timeseries" and self.mask.span > self.data.window:
            fail("mask.span", self.mask.span, f"at most data.window={self.data.window}")
        depth = self.encoder_depth()
        if self.levels.depths and self.levels.depths[-1] > depth:
            fail("levels.depths", self.levels.depths, f"layers up to the encoder's depth, {depth}")
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")

    def encoder_depth(self) -> int:
        """Stages of the temporal CNN, blocks of the token transformer: what --levels.depths counts."""
        return len(self.model.widths) if self.data.kind == "timeseries" else self.model.transformer_depth


PRESETS = {
    "timeseries": (
        "Time series: a masked temporal CNN on OSULeaf (UCR, inside sktime's wheel), spans masked.",
        Config(),
    ),
    "text": (
        "Text: a token transformer on chatterbot-corpus's topic-labelled sentences, BERT-style masking.",
        # without the variance guard the targets collapse to rank ~7 of 64 on this small corpus and the
        # probe learns nothing (0.628 trained and untrained, seed 0)
        Config(run_dir=Path("runs/jepa-text"), data=Data(kind="text"),
               mask=Mask(ratio=0.15, random_token_p=0.1), loss=JEPALoss(var_weight=1.0, cov_weight=0.04),
               train=TrainConfig(steps=2000)),
    ),
}


def build_encoder(cfg: Config, seq: dict) -> nn.Module:
    m = cfg.model
    if cfg.data.kind == "timeseries":
        return MaskedTemporalCNN(in_chans=seq["in_chans"], widths=m.widths, kernel=m.kernel,
                                 dilations=m.dilations or None)
    return TokenTransformer(seq["vocab_size"], length=seq["length"], dim=m.transformer_dim,
                            depth=m.transformer_depth, heads=m.transformer_heads)


def load_sequences(cfg: Config) -> dict:
    """The windows of a UCR / UEA set (or your .npz), or tokenized topic sentences: train and held-out."""
    if cfg.data.kind == "timeseries":
        source = str(cfg.data.path) if cfg.data.path is not None else cfg.data.name
        raw = load_series_npz(cfg.data.path) if cfg.data.path is not None else ucr_uea(cfg.data.name)
        return windowed_series(raw, window=cfg.data.window, stride=cfg.data.stride, source=source)
    sentences = chat_topics(cfg.data.topics, per_topic=cfg.data.per_topic, seed=cfg.data.seed)
    return tokenized_sentences(sentences, tokenizer=cfg.data.tokenizer, max_len=cfg.data.max_len,
                               unlabelled=cfg.data.unlabelled)


def describe_parts(cfg: Config, encoder: nn.Module, seq: dict) -> dict:
    """The target and context encoders as checkpoints describe them (stepkit export / eval)."""
    facts = {"input": {"kind": cfg.data.kind, "length": seq["length"]},
             "features": "token features (B, length, dim), pooled by stepkit.jepa.sequence_features"}
    d = cfg.data  # the items the probes read, rebuilt by stepkit eval from the same library loaders
    data = {"kind": d.kind, "name": d.name, "path": str(d.path) if d.path else None, "window": d.window,
            "stride": d.stride} if d.kind == "timeseries" else {
        "kind": d.kind, "topics": list(d.topics), "per_topic": d.per_topic, "seed": d.seed,
        "tokenizer": d.tokenizer, "max_len": d.max_len, "unlabelled": d.unlabelled}
    # what `stepkit eval` reproduces; a change to main's evaluation changes it too
    probe = ProbeRecord("sequence", layers=cfg.eval.layers, k=cfg.eval.k, data=data, linear=cfg.eval.linear,
                        temperature=cfg.eval.temperature, seed=cfg.train.seed).as_dict()
    return {"target": describe_part(encoder, source="target", prefix="", **facts, probe=probe,
                                    about="the EMA target encoder (what the probes evaluate)"),
            "context": describe_part(encoder, source="model", prefix="encoder.", **facts, probe=probe,
                                     about="the context encoder")}


def probe_scores(cfg: Config, nets: dict, seq: dict, device: torch.device) -> dict:
    """The evaluation: linear and k-NN probes on each net's pooled tokens (last layer, last --eval.layers),
    beside the raw windows (series) or a bag of words (text); the target's collapse metrics."""
    window = cfg.data.window if cfg.data.kind == "timeseries" else None  # None: sentences of token ids
    depth = cfg.encoder_depth()

    def features(net: nn.Module, layers: int):
        return sequence_features(net, seq, tuple(range(depth - layers, depth)), window=window,
                                 stride=cfg.data.stride, device=device)

    raw = raw_sequence_features(seq, window=window, vocab_size=seq.get("vocab_size", 0))
    last_width = lambda net: layer_dims(net, (depth - 1,))[0]  # noqa: E731
    scores, last_layer_features = frozen_probes(
        nets, features, last_width, raw, "raw" if window else "bow", layers=min(cfg.eval.layers, depth),
        k=cfg.eval.k, temperature=cfg.eval.temperature, linear=cfg.eval.linear, seed=cfg.train.seed)
    (_, _), (held_out, _) = last_layer_features[""]  # collapse check on held-out items: the target's
    final = collapse_metrics(held_out[:256], "")
    return {**scores, "effective_rank": float(final["effective_rank"]), "feature_std": float(final["std"])}


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)
    set_threads(cfg.threads, device=device, workers=0)  # --threads
    seq = load_sequences(cfg)
    train_set = seq["train_set"]
    if cfg.eval.k > len(seq["train"][1]):  # found now, not after training
        fail("eval.k", cfg.eval.k, f"at most the number of training {cfg.data.kind} items "
             f"({len(seq['train'][1])})")
    seed_everything(cfg.train.seed)
    encoder = build_encoder(cfg, seq)
    init = cfg.init.load_into(encoder, part="target") if not cfg.resuming else None  # weights only
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    if init and dist.is_main():
        print(init.line(), flush=True)
    depths, start_weights = cfg.levels.resolved(cfg.encoder_depth())
    blocks = tuple(d - 1 for d in depths)  # 0-based, for sequence_tokens(layers=...)
    dims = layer_dims(encoder, blocks)
    hierarchical = len(depths) > 1  # a trunk of predictor_dim, then one head per level
    m = cfg.model
    predictor = SequencePredictor(seq["length"], encoder.dim, m.predictor_dim, m.predictor_depth,
                                  m.predictor_heads, out_dim=m.predictor_dim if hierarchical else dims[0])
    model = SequenceJEPA(encoder, predictor, dims if hierarchical else []).to(device)
    parts = describe_parts(cfg, encoder, seq)  # what each checkpoint says of its encoders
    target_encoder = target_copy(encoder).to(device)  # deterministic: no stochastic depth, no dropout
    untrained = copy.deepcopy(target_encoder)  # the baseline of the final evaluation
    # DDP / FSDP2 under torchrun (first: FSDP2 swaps in the sharded parameters the optimizer must hold);
    # AdamW with a group per level's head, whose lr follows its own schedule
    wrap = lambda m: dist.parallelize(m, cfg.dist.strategy, device, shard=jepa_shard_units)  # noqa: E731
    wrapped, target = wrap(model), wrap(target_encoder)
    groups = param_groups(model, layer_of=head_level, layer_scales=[1.0] * (1 + len(model.heads)))
    group_level = [head_level(g["names"][0]) for g in groups]
    state = TrainState(model=wrapped, optimizer=adamw(groups, device=device), target=target,
                       scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
                       accum=cfg.train.accum)
    target_encoder = state.target
    if dist.world_size() > 1:  # the same initial weights everywhere; each rank its own masks
        seed_everything(seed_of(cfg.train.seed, "rank", dist.rank()))
    steps = cfg.train.steps
    mask_rng = torch.Generator()
    loss_rng = torch.Generator()  # the contrastive loss's negatives

    # What each kind masks, picked once: (clean input for the target encoder, the context encoder's
    # input, visible (B, L), masked (B, L)).
    def mask_spans(x: torch.Tensor):
        masked = span_masks(len(x), x.shape[-1], cfg.mask.span, cfg.mask.ratio, mask_rng).to(device)
        x = x.to(device)
        return x, x, ~masked, masked

    def mask_tokens(x: torch.Tensor):
        corrupted, masked = token_masks(x, cfg.mask.ratio, mask_id=seq["mask_id"],
                                        vocab_size=seq["vocab_size"], random_token_p=cfg.mask.random_token_p,
                                        special=seq["special"], generator=mask_rng)
        visible = (x != 0) & ~masked  # the context encoder's pooled tokens: real, unmasked ones
        return x.to(device), corrupted.to(device), visible.to(device), masked.to(device)

    make_batch = mask_spans if cfg.data.kind == "timeseries" else mask_tokens

    def loss_fn(state: TrainState, batch):
        clean, inputs, visible, masked = batch
        with torch.no_grad():
            _, outputs = sequence_tokens(state.target, clean, layers=blocks)
        preds, pooled = state.model(inputs, visible, masked)
        pairs = [(p, F.layer_norm(o, o.shape[-1:]), masked) for p, o in zip(preds, outputs)]
        weights = level_values_at(state.step, start_weights, cfg.levels.weights_final, steps)
        loss, aux = level_losses(pairs, pooled, depths=depths, weights=weights, loss=cfg.loss,
                                 generator=loss_rng)
        return loss, {"masked_fraction": masked.float().mean(), **aux}

    if cfg.tune.measures:  # measure instead of training: no run, no checkpoint, no log
        def tune_batch(size: int):
            idx = torch.randint(0, len(train_set), (size,)).tolist()
            return make_batch(torch.stack([train_set[i][0] for i in idx]))

        return tune(cfg.tune, cfg.run_dir, loss_fn, state, tune_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    # An epoch-seeded order, each batch counted in the state as consumed: a resume starts at the next
    batches = train_batches(train_set, state, batch_size=cfg.batch_size, seed=cfg.train.seed)
    watch = target_collapse_watch(cfg.alarm, depths)
    with run.start(state, steps=steps, meta={"parts": parts}):  # resumed when asked; log; signals
        for x, _ in run.batches(batches):  # saved between updates; ends at the last step or a signal
            mask_rng.manual_seed(seed_of(cfg.train.seed, "masks", state.data_position, dist.rank()))
            loss_rng.manual_seed(seed_of(cfg.train.seed, "negatives", state.data_position, dist.rank()))
            loss, aux = forward_loss(loss_fn, state, make_batch(x), amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, steps)
            scales, level_terms = level_lr_scales(state.step, cfg.levels, depths, group_level, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps), group_scales=scales)
            momentum = momentum_at(state.step, cfg.ema, steps)
            ema_update(state.target, model.encoder, momentum)
            terms = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "momentum": momentum,
                     **level_terms}
            means = run.after_update(terms)  # NaN watch (exit 65 after a storm), log
            watch.report(means, run.log, state.step)  # a new collapse warning: printed and logged
    # left the run: last.pt saved (after a signal: exit 75)

    start = "_init" if init else "_random_init"  # the weights it started from
    nets = {"": target_encoder, "_context_encoder": model.encoder, start: untrained}
    summary = run.summary(**probe_scores(cfg, nets, seq, device), params_digest=params_digest(model),
                          collapse_warning=watch.last, **({"init": init.as_dict()} if init else {}))
    raw_name = "raw" if cfg.data.kind == "timeseries" else "bow"
    run.log.write({k: v for k, v in summary.items() if k.startswith(("knn", "linear"))}, state.step)
    if run.finish(summary):  # summary.json written; only rank 0 prints
        print(f"{probes_line(summary, baseline=start, raw_name=raw_name, linear=cfg.eval.linear)}; "
              f"summary in {cfg.run_dir / 'summary.json'}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

"""I-JEPA and hierarchical JEPA: predict the representations of masked patches, spans or tokens from the rest.

    python recipes/ijepa.py --run-dir runs/ijepa                   # masked CNN, embedded digits, CPU, minutes
    python recipes/ijepa.py hjepa --run-dir runs/hjepa             # hierarchical: targets at every stage
    python recipes/ijepa.py timeseries --run-dir r                 # masked spans of UCR series (sktime)
    python recipes/ijepa.py text --run-dir r                       # BERT-style token masking, topic sentences
    python recipes/ijepa.py timeseries --data.path mine.npz        # your own x_train, y_train, x_test, y_test
    python recipes/ijepa.py --loss.kind contrastive                # or multiscale: the guide's loss variants
    python recipes/ijepa.py --levels.depths 3 5 --levels.weights 0.5 1 --levels.weights-final 0 1
    python recipes/ijepa.py --loss.var-weight 1 --loss.cov-weight 0.04   # a variance guard (C-JEPA)
    python recipes/ijepa.py vit-s16 --run-dir runs/s16 --data.root /data/imagenet/train   # one GPU
    python recipes/ijepa.py vit-h14 --run-dir runs/h14 --data.root /data/imagenet/train   # the paper, GPUs
    python recipes/ijepa.py --help

Each batch gets I-JEPA's multi-block masks: one context block and M target
blocks on the patch grid, disjoint. The context encoder sees only the context
patches: a ViT encodes just those tokens; the masked CNN (``--model.arch
cnn``, CNN-JEPA) zeroes everything else at its input and after every stage.
A predictor (a narrow transformer for the ViT, depthwise-separable
convolutions for the CNN) reads the context plus a mask token at every unseen
patch and predicts what the target encoder (an EMA of the context encoder,
seeing the whole image) makes of the target patches, layer-normed; the loss
(smooth L1 or MSE) covers the target patches only.

``--levels.depths`` picks the encoder blocks (ViT) or stages (CNN) whose
outputs are the targets: one level (the default: the last) is I-JEPA; several
are hierarchical JEPA, one predictor trunk with a linear head per level, each
level's loss weight and head learning rate on their own cosine schedule.
Optional guard against collapse: VICReg's variance / covariance terms on the
context encoder's pooled embeddings (``--loss.var-weight``,
``--loss.cov-weight``). Every level's loss and collapse metrics are logged, and
a warning is printed and logged when the targets' effective rank or std stays
low (``--alarm.*``).

Sequences (``--data.kind timeseries|text``, the presets of those names) keep the same structure over
one token per time step or word: the context encoder (a masked temporal CNN that never sees the masked
spans, or a transformer reading BERT-corrupted ids) feeds a transformer predictor that fills every masked
position, regressed on the EMA target encoder's layer-normed tokens of the clean sequence there.

The run ends with I-JEPA's evaluation on held-out images (series, sentences): a linear probe
(logistic regression on standardised, average-pooled patch tokens of the
target encoder, its regularisation chosen on a validation split of the
training set) on the last layer and on the last ``--eval.layers`` layers
concatenated, the better one reported, and a k-NN classifier beside it; each
also for the same network untrained and for the raw input (pixels, the series resampled to a window,
a sentence's bag of words).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stepkit import (
    LRSchedule,
    MomentumSchedule,
    TrainState,
    WDSchedule,
    accumulate,
    apply_update,
    clip,
    dist,
    ema_update,
    forward_loss,
    lr_at,
    momentum_at,
    param_groups,
    warmup_decay,
    wd_at,
)
from stepkit.augment import normalize, random_resized_crop, to_unit
from stepkit.bundled import CHAT_TOPICS, UCR_UEA, chat_topics, digits_canvas, ucr_uea
from stepkit.check import at_least, fail, in_range, integer_at_least, one_of
from stepkit.checkpoint import maybe_save, resume, save_last
from stepkit.data import ImageFolder, ResumableSampler, image_folders, load_series_npz
from stepkit.evaluation import knn_accuracy, linear_probe
from stepkit.log import LogConfig, Logger
from stepkit.losses.jepa import (
    jepa_contrastive_loss,
    jepa_loss,
    multiscale_jepa_loss,
    variance_covariance_loss,
)
from stepkit.masking import MultiBlock, mask_image, multi_block_masks, span_masks, token_masks
from stepkit.models import VisionTransformer
from stepkit.models.jepa import (
    ConvPredictor,
    JEPAPredictor,
    MaskedCNN,
    jepa_targets,
    layer_dims,
    patch_tokens,
    pooled_patches,
)
from stepkit.models.sequence import MaskedTemporalCNN, SequencePredictor, TokenTransformer, sequence_tokens
from stepkit.models.text import WordTokenizer, masked_mean, pretrained_tokenizer, pretrained_vocab
from stepkit.models.vit import PRESETS as VIT_PRESETS
from stepkit.monitor import CollapseWatch, collapse_metrics
from stepkit.run import (
    Amp,
    CkptConfig,
    Device,
    RunArgs,
    StopSignals,
    TrainConfig,
    cli,
    params_digest,
    pick_device,
    record_resume,
    run_main,
    seed_everything,
    start_run,
    to_jsonable,
    write_summary,
)
from stepkit.tuning import TuneConfig, tune

Kind = Literal["image", "timeseries", "text"]


@dataclass
class Data:
    kind: Kind = "image"
    """image: multi-block masks on a patch grid; timeseries: spans of time steps masked (set by the
    timeseries preset); text: BERT-style token masking (the text preset)."""
    root: Path | None = None
    """An image folder with one sub-folder per class (held-out: a sibling 'val' folder or
    --data.val-root); None: the embedded digits."""
    val_root: Path | None = None
    image_size: int = 32
    crop_scale: tuple[float, float] = (0.6, 1.0)
    """Random resized crop before masking (I-JEPA uses (0.3, 1.0) on ImageNet)."""
    seed: int = 0
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    skip_unreadable: bool = False
    """Image folders: leave out files that cannot be decoded (each file is checked before training;
    the count is in the summary) instead of stopping with an error naming the first one."""

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
        integer_at_least("image_size", self.image_size, 8)
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
    arch: Literal["cnn", "vit-toy", "vit-tiny", "vit-small", "vit-base", "vit-huge", "tcn",
                  "transformer"] = "cnn"
    """Images: cnn, the masked CNN (CNN-JEPA) with the conv predictor, or vit-*, a ViT with I-JEPA's
    transformer predictor. Time series: tcn, a masked temporal CNN. Text: transformer. Sequences get a
    transformer predictor that fills every masked position."""
    widths: tuple[int, ...] = (32, 64, 128, 128, 128)
    """cnn: channels of each stage."""
    strides: tuple[int, ...] = (1, 2, 2, 1, 1)
    """cnn: each stage's stride; their product is the patch size (4: 32 px images make an 8x8 grid)."""
    dilations: tuple[int, ...] = (1, 1, 1, 2, 4)
    """cnn: each stage's dilation (): 1 for every stage. The dilated stages on the patch grid let each
    token see the whole 32 px image (a receptive field of 57 px instead of 9: held-out linear probe
    0.705 instead of 0.535 on the tiny default)."""
    patch_size: int = 0
    """vit: patch size (0: the preset's)."""
    pos_embed: Literal["learned", "sincos"] = "learned"
    """vit: encoder and predictor positions, learned or I-JEPA's fixed 2-D sine-cosine (the paper
    presets)."""
    predictor_dim: int = 128
    predictor_depth: int = 3
    """Predictor blocks: residual depthwise-separable conv blocks (cnn), transformer blocks (vit)."""
    predictor_heads: int = 4
    """vit: the predictor's attention heads."""
    predictor_kernel: int = 3
    """cnn: the predictor's depthwise kernel size (odd)."""
    kernel: int = 5
    """tcn: the temporal kernel size (odd); its stages use --model.widths and --model.dilations."""
    transformer_dim: int = 64
    """transformer: width."""
    transformer_depth: int = 4
    """transformer: blocks."""
    transformer_heads: int = 4
    """transformer: attention heads."""
    grad_checkpointing: bool = False
    """vit: recompute each encoder block in the backward pass instead of storing its activations (less
    memory, about one more forward; the same gradients)."""

    def __post_init__(self) -> None:
        integer_at_least("model.predictor_dim", self.predictor_dim, 1)
        integer_at_least("model.predictor_depth", self.predictor_depth, 1)
        if len(self.widths) != len(self.strides) or not self.widths:
            fail("model.strides", self.strides, f"one stride per stage (model.widths={self.widths})")
        if self.dilations and (len(self.dilations) != len(self.widths) or min(self.dilations) < 1):
            fail("model.dilations", self.dilations,
                 f"one dilation >= 1 per stage (model.widths={self.widths})")
        if self.predictor_kernel < 1 or self.predictor_kernel % 2 == 0:
            fail("model.predictor_kernel", self.predictor_kernel, "an odd size >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            fail("model.kernel", self.kernel, "an odd size >= 1")
        integer_at_least("model.transformer_depth", self.transformer_depth, 1)
        if self.transformer_dim < 1 or self.transformer_dim % self.transformer_heads:
            fail("model.transformer_dim", self.transformer_dim,
                 f"a positive multiple of model.transformer_heads={self.transformer_heads}")

    def depth(self) -> int:
        """Stages of the CNNs, blocks of the ViT / transformer: what --levels.depths counts."""
        if self.arch in ("cnn", "tcn"):
            return len(self.widths)
        if self.arch == "transformer":
            return self.transformer_depth
        return VIT_PRESETS[self.arch.removeprefix("vit-")]["depth"]


@dataclass
class Loss:
    kind: Literal["smooth_l1", "mse", "contrastive", "multiscale"] = "smooth_l1"
    """smooth_l1 / mse: regression of the target features (mse is jepa_loss); contrastive: InfoNCE of
    each prediction against its target, other tokens' targets as negatives (jepa_contrastive_loss);
    multiscale: mse at several poolings of the tokens (multiscale_jepa_loss)."""
    temperature: float = 0.1
    """contrastive: the softmax temperature."""
    negative_samples: int | None = None
    """contrastive: negatives drawn per token (None: every other predicted token of the batch)."""
    scales: tuple[int, ...] = (1, 2, 4)
    """multiscale: token windows averaged at each scale."""
    scale_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    """multiscale: one weight per scale."""
    var_weight: float = 0.0
    """Weight of VICReg's variance hinge on the context encoder's pooled embeddings (0: off)."""
    cov_weight: float = 0.0
    """Weight of VICReg's covariance term on the same embeddings (0: off)."""
    var_gamma: float = 1.0
    """The std each embedding dimension is kept above by the variance hinge."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            fail("loss.temperature", self.temperature, "a number > 0")
        if self.negative_samples is not None:
            integer_at_least("loss.negative_samples", self.negative_samples, 1)
        if not self.scales or min(self.scales) < 1:
            fail("loss.scales", self.scales, "integers >= 1")
        if len(self.scale_weights) != len(self.scales) or min(self.scale_weights) < 0:
            fail("loss.scale_weights", self.scale_weights,
                 f"one weight >= 0 per scale (loss.scales={self.scales})")
        at_least("loss.var_weight", self.var_weight, 0.0)
        at_least("loss.cov_weight", self.cov_weight, 0.0)
        at_least("loss.var_gamma", self.var_gamma, 0.0)


@dataclass
class Levels:
    """Which encoder outputs are predicted (``--levels.*``): one entry per level."""

    depths: tuple[int, ...] = ()
    """Encoder blocks (vit) or stages (cnn), 1-based and increasing, whose outputs are the targets;
    (): the last alone (I-JEPA). Several: hierarchical JEPA, one head per level."""
    weights: tuple[float, ...] = ()
    """Each level's loss weight at the start of the run (): 1 for every level."""
    weights_final: tuple[float, ...] | None = None
    """Each level's loss weight at the end (cosine from --levels.weights); None: constant."""
    lr_scales: tuple[float, ...] | None = None
    """Each level's head: learning-rate multiplier at the start (None: 1 for every level)."""
    lr_scales_final: tuple[float, ...] | None = None
    """Each level's head: multiplier at the end (cosine from --levels.lr-scales); None: constant."""

    def __post_init__(self) -> None:
        if any(d < 1 for d in self.depths) or list(self.depths) != sorted(set(self.depths)):
            fail("levels.depths", self.depths, "increasing block numbers, each at least 1")
        n = max(1, len(self.depths))
        for name in ("weights", "weights_final", "lr_scales", "lr_scales_final"):
            values = getattr(self, name)
            if values is None or (name == "weights" and values == ()):
                continue
            if len(values) != n:
                fail(f"levels.{name}", values, f"one value per level: {n} (levels.depths={self.depths})")
            if any(v < 0 for v in values):
                fail(f"levels.{name}", values, "values >= 0")
        if self.weights and not any(self.weights) and not any(self.weights_final or ()):
            fail("levels.weights", self.weights, "at least one positive weight")

    def resolved(self, encoder_depth: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The levels' depths and start weights: () means the last block, weight 1."""
        depths = self.depths or (encoder_depth,)
        return depths, self.weights or (1.0,) * len(depths)


def level_values_at(
    step: int, start: tuple[float, ...], final: tuple[float, ...] | None, total_steps: int
) -> list[float]:
    """Each level's value at ``step``: cosine from ``start`` to ``final`` over the run (constant if None)."""
    if final is None:
        return [float(v) for v in start]
    return [warmup_decay(step, peak=a, final=b, total_steps=total_steps) for a, b in zip(start, final)]


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
    pool: int = 1
    """Probe features: patch tokens averaged over a pool x pool grid (1: the plain mean, I-JEPA's)."""
    layers: int = 4
    """The second linear probe reads the last this many layers (vit blocks, cnn stages) concatenated."""
    k: int = 20
    temperature: float = 0.07
    linear: bool = True
    """Fit the linear probes (--eval.no-linear: k-NN only, a few seconds less)."""

    def __post_init__(self) -> None:
        integer_at_least("eval.pool", self.pool, 1)
        integer_at_least("eval.layers", self.layers, 1)
        integer_at_least("eval.k", self.k, 1)


@dataclass
class Mask(MultiBlock):
    """Images: I-JEPA's multi-block masks (the fields above). Sequences: the fields below."""

    span: int = 16
    """timeseries: length in time steps of each masked span (spans are added at random starts until
    --mask.ratio of the window is covered)."""
    ratio: float = 0.5
    """timeseries: the share of each window masked; text: the share of tokens chosen (BERT: 0.15)."""
    random_token_p: float = 0.1
    """text: a chosen token becomes a random token with this probability, else the mask token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        integer_at_least("span", self.span, 1)
        if not 0 < self.ratio < 1:
            fail("ratio", self.ratio, "a number in (0, 1)")
        in_range("random_token_p", self.random_token_p, 0.0, 1.0)


@dataclass
class Alarm:
    """A collapse warning (``--alarm.*``): printed and logged when every level's targets stay low."""

    min_effective_rank: float = 1.5
    """Warn when a level's targets' effective rank stays below this..."""
    min_std: float = 0.05
    """...or their per-dimension std below this..."""
    patience: int = 3
    """...for this many log intervals in a row."""

    def __post_init__(self) -> None:
        integer_at_least("alarm.patience", self.patience, 1)


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/ijepa")
    device: Device = "auto"
    amp: Amp = "none"
    batch_size: int = 64
    """Images per update on each rank."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    mask: Mask = field(default_factory=Mask)
    loss: Loss = field(default_factory=Loss)
    levels: Levels = field(default_factory=Levels)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500))
    optim: Optim = field(default_factory=Optim)
    ema: MomentumSchedule = field(
        default_factory=lambda: MomentumSchedule(momentum=0.99, momentum_final=0.999))
    eval: Eval = field(default_factory=Eval)
    alarm: Alarm = field(default_factory=Alarm)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    mask_image_every: int = 250
    """Updates between two pictures of the masks in TensorBoard / wandb (0: never)."""
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=250, keep_best=0))
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 1)
        integer_at_least("mask_image_every", self.mask_image_every, 0)
        kind, arch = self.data.kind, self.model.arch
        wanted = {"image": "cnn or vit-*", "timeseries": "tcn", "text": "transformer"}[kind]
        fits = {"image": arch not in ("tcn", "transformer"), "timeseries": arch == "tcn",
                "text": arch == "transformer"}[kind]
        if not fits:
            fail("model.arch", arch, f"{wanted} for data.kind={kind!r}")
        if kind == "timeseries" and self.mask.span > self.data.window:
            fail("mask.span", self.mask.span, f"at most data.window={self.data.window}")
        depth = self.model.depth()
        if self.levels.depths and self.levels.depths[-1] > depth:
            what = "stages" if arch in ("cnn", "tcn") else "blocks"
            fail("levels.depths", self.levels.depths, f"{what} up to the encoder's depth, {depth} "
                 f"({self.model.arch})")
        if arch == "cnn" and self.data.image_size % math.prod(self.model.strides):
            fail("data.image_size", self.data.image_size,
                 f"a multiple of the product of model.strides={self.model.strides}")
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


def _vit_h14(**overrides) -> Config:
    """I-JEPA's ViT-H/14 run (Assran et al. 2023): 300 epochs of ImageNet at batch 2048."""
    settings = dict(
        device="cuda", amp="bf16", batch_size=2048,
        data=Data(image_size=224, crop_scale=(0.3, 1.0)),
        model=Model(arch="vit-huge", patch_size=14, predictor_dim=384, predictor_depth=12,
                    predictor_heads=12, pos_embed="sincos"),
        mask=Mask(targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                        context_scale=(0.85, 1.0), sampler="ijepa", min_keep=10),
        train=TrainConfig(steps=187500),
        optim=Optim(lr=1e-3, min_lr=1e-6, warmup_steps=25000, wd=0.04, wd_final=0.4, clip=None),
        ema=MomentumSchedule(momentum=0.996, momentum_final=1.0),
        log=LogConfig(every=50),
        ckpt=CkptConfig(every=2500, keep_best=0),
    )
    return Config(**{**settings, **overrides})


PRESETS = {
    "tiny-cpu": ("The CPU default: the masked CNN on the embedded digits, targets at its last stage.",
                 Config()),
    "hjepa": ("Hierarchical JEPA on the CPU: the same network, targets at its last 3 stages.",
              Config(run_dir=Path("runs/hjepa"), levels=Levels(depths=(3, 4, 5), weights=(0.25, 0.5, 1.0)))),
    "timeseries": (
        "Time series: a masked temporal CNN on OSULeaf (UCR, inside sktime's wheel), spans masked.",
        Config(run_dir=Path("runs/jepa-timeseries"), batch_size=64,
               data=Data(kind="timeseries", window=128, stride=16),
               model=Model(arch="tcn", widths=(32, 64, 128, 128), strides=(1, 1, 1, 1),
                           dilations=(1, 2, 4, 8), predictor_dim=64, predictor_depth=2),
               mask=Mask(span=16, ratio=0.5), train=TrainConfig(steps=1000), log=LogConfig(every=25))),
    "text": (
        "Text: a token transformer on chatterbot-corpus's topic-labelled sentences, BERT-style masking.",
        Config(run_dir=Path("runs/jepa-text"), batch_size=64,
               data=Data(kind="text", max_len=32),
               model=Model(arch="transformer", transformer_dim=64, transformer_depth=4, transformer_heads=4,
                           predictor_dim=64, predictor_depth=2),
               mask=Mask(ratio=0.15, random_token_p=0.1),
               # without the variance guard the targets collapse to rank ~7 of 64 on this small corpus
               # and the probe learns nothing (0.628 trained and untrained, seed 0)
               loss=Loss(var_weight=1.0, cov_weight=0.04), train=TrainConfig(steps=2000),
               log=LogConfig(every=25))),
    "vit-toy": ("The earlier CPU default: a toy ViT and I-JEPA's transformer predictor on the digits.",
                Config(model=Model(arch="vit-toy", predictor_dim=64, predictor_depth=2), eval=Eval(pool=2))),
    "vit-s16": (
        "One GPU: ViT-S/16 with I-JEPA's masks, predictor and schedules, batch 256 (set --data.root).",
        _vit_h14(batch_size=256,
                 model=Model(arch="vit-small", patch_size=16, predictor_dim=384, predictor_depth=6,
                             predictor_heads=12, pos_embed="sincos"),
                 train=TrainConfig(steps=150000),
                 optim=Optim(lr=2.5e-4, min_lr=1e-6, warmup_steps=10000, wd=0.04, wd_final=0.4, clip=None))),
    "vit-h14": ("The paper's ViT-H/14 settings (I-JEPA, Assran et al. 2023): 300 epochs of ImageNet at "
                "batch 2048.", _vit_h14()),
    "hjepa-vit-h14": ("I-JEPA's ViT-H/14 settings with targets at depths 8, 16, 24 and 32.",
                      _vit_h14(levels=Levels(depths=(8, 16, 24, 32), weights=(0.25, 0.25, 0.5, 1.0)))),
}


def build_encoder(cfg: Config, in_chans: int) -> nn.Module:
    if cfg.model.arch == "cnn":
        return MaskedCNN(img_size=cfg.data.image_size, in_chans=in_chans, widths=cfg.model.widths,
                         strides=cfg.model.strides, dilations=cfg.model.dilations or None)
    preset = cfg.model.arch.removeprefix("vit-")
    overrides = {"patch_size": cfg.model.patch_size} if cfg.model.patch_size else {}
    overrides["pos_embed"] = cfg.model.pos_embed
    return VisionTransformer.preset(preset, img_size=cfg.data.image_size, in_chans=in_chans,
                                    grad_checkpointing=cfg.model.grad_checkpointing, **overrides)


def build_predictor(cfg: Config, encoder: nn.Module, out_dim: int) -> nn.Module:
    m = cfg.model
    if m.arch == "cnn":
        return ConvPredictor(encoder.grid, encoder.dim, m.predictor_dim, m.predictor_depth,
                             m.predictor_kernel, out_dim=out_dim)
    return JEPAPredictor(encoder.grid**2, encoder.dim, m.predictor_dim, m.predictor_depth,
                         m.predictor_heads, out_dim=out_dim, pos_embed=m.pos_embed)


class JEPA(nn.Module):
    """Context encoder + predictor (+ one linear head per level when there are several): what trains.

    ``forward(images, context_idx, target_idx)`` -> ``(predictions, pooled)``:
    one ``(B, M, Kt, dim_l)`` prediction per level, and the context tokens'
    mean ``(B, dim)`` (for the variance guard).
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, head_dims: list[int]) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor
        out = predictor.out
        width = out.out_channels if isinstance(predictor, ConvPredictor) else out.out_features
        self.heads = nn.ModuleList(nn.Linear(width, d) for d in head_dims)  # empty: one level, no head

    def forward(self, images, context_idx, target_idx) -> tuple[list[torch.Tensor], torch.Tensor]:
        context, _ = patch_tokens(self.encoder, images, keep=context_idx)
        return self.levels(self.predictor(context, context_idx, target_idx)), context.mean(dim=1)

    def levels(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """One prediction per level: the predictor's output itself, or each level's head on it."""
        return [head(hidden) for head in self.heads] if len(self.heads) else [hidden]


class SequenceJEPA(JEPA):
    """The same for sequences: ``forward(inputs, visible, masked)`` -> one ``(B, L, dim_l)`` prediction per
    level at every position (the loss reads the masked ones), and the visible tokens' mean."""

    def forward(self, inputs, visible, masked) -> tuple[list[torch.Tensor], torch.Tensor]:
        tokens, _ = sequence_tokens(self.encoder, inputs, visible)
        return self.levels(self.predictor(tokens, masked)), masked_mean(tokens, visible)


def build_sequence_encoder(cfg: Config, seq: dict) -> nn.Module:
    m = cfg.model
    if m.arch == "tcn":
        return MaskedTemporalCNN(in_chans=seq["in_chans"], widths=m.widths, kernel=m.kernel,
                                 dilations=m.dilations or None)
    return TokenTransformer(seq["vocab_size"], length=seq["length"], dim=m.transformer_dim,
                            depth=m.transformer_depth, heads=m.transformer_heads)


def windows_of(series: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """``(C, T)`` -> ``(n, C, window)``: windows every ``stride`` steps, the last one ending at ``T``."""
    starts = list(range(0, series.shape[-1] - window + 1, stride))
    if starts[-1] != series.shape[-1] - window:
        starts.append(series.shape[-1] - window)
    return torch.stack([series[:, s:s + window] for s in starts])


def load_timeseries(data: Data) -> dict:
    """Training windows, whole held-out series and their labels; channels standardised with the
    training series' statistics (missing values, NaN in the archive, become 0 afterwards)."""
    if data.path is not None:
        raw, source = load_series_npz(data.path), str(data.path)
    else:
        raw, source = ucr_uea(data.name), data.name
    train = [torch.as_tensor(x, dtype=torch.float32) for x in raw["train_series"]]
    test = [torch.as_tensor(x, dtype=torch.float32) for x in raw["test_series"]]
    shortest = min(x.shape[-1] for x in train + test)
    if data.window > shortest:
        fail("data.window", data.window, f"at most the shortest series' length, {shortest} ({source})")
    values = torch.cat(train, dim=1)
    mean = values.nanmean(dim=1, keepdim=True)
    std = (values - mean).square().nanmean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
    train, test = ([torch.nan_to_num((x - mean) / std) for x in xs] for xs in (train, test))
    cut = [windows_of(x, data.window, data.stride) for x in train]
    labels = torch.as_tensor(raw["train_labels"])
    window_labels = torch.cat([torch.full((len(w),), int(y)) for w, y in zip(cut, labels)])
    return {"train_set": TensorDataset(torch.cat(cut), window_labels), "in_chans": train[0].shape[0],
            "length": data.window, "train": (train, labels),
            "test": (test, torch.as_tensor(raw["test_labels"]))}


def load_text(data: Data) -> dict:
    """Token ids ``(N, max_len)`` (0 = padding) of the topic-labelled sentences, and what masking needs."""
    d = chat_topics(data.topics, per_topic=data.per_topic, seed=data.seed)
    pretrain = d["unlabelled_texts"] if data.unlabelled else d["train_texts"]
    if data.tokenizer == "word":
        tokenize = WordTokenizer(pretrain)  # the pretraining sentences' words; others are unknown (1)
        vocab_size, mask_id, special = len(tokenize) + 1, len(tokenize), [0]
    else:
        tokenize = pretrained_tokenizer(max_len=data.max_len)
        vocab_size, mask_id, special = pretrained_vocab()

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenize(texts)["input_ids"][:, :data.max_len]
        return F.pad(ids, (0, data.max_len - ids.shape[1]))  # padding id 0 in both vocabularies

    train, test = encode(d["train_texts"]), encode(d["test_texts"])
    labels = torch.as_tensor(d["train_labels"])
    unlabelled = encode(pretrain)
    no_labels = torch.zeros(len(unlabelled), dtype=torch.long)
    return {"train_set": TensorDataset(unlabelled, no_labels), "vocab_size": vocab_size, "mask_id": mask_id,
            "special": torch.tensor(special), "length": data.max_len, "train": (train, labels),
            "test": (test, torch.as_tensor(d["test_labels"]))}


def prediction_loss(loss: Loss, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                    generator: torch.Generator) -> torch.Tensor:
    """One level's loss over ``(B, N, D)`` tokens; ``mask`` ``(B, N)`` the predicted ones (None: all)."""
    if loss.kind in ("smooth_l1", "mse") and mask is None:  # images: every gathered target token counts
        criterion = F.smooth_l1_loss if loss.kind == "smooth_l1" else F.mse_loss
        return criterion(pred.float(), target.float())
    mask = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device) if mask is None else mask
    if loss.kind == "mse":
        return jepa_loss(pred, target, mask)
    if loss.kind == "smooth_l1":
        per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(dim=-1)
        weights = mask.float()
        return (per_token * weights).sum() / weights.sum().clamp_min(1.0)
    if loss.kind == "contrastive":
        return jepa_contrastive_loss(pred, target, mask, temperature=loss.temperature,
                                     negative_samples=loss.negative_samples, generator=generator)
    return multiscale_jepa_loss(pred, target, mask, scales=loss.scales, weights=loss.scale_weights)


def head_level(name: str) -> int:
    """Parameter group id: 1 + the level for ``heads.<level>.*``, 0 for everything else."""
    parts = name.split(".")
    return 1 + int(parts[1]) if parts[0] == "heads" else 0


def shard_units(module: nn.Module) -> list[nn.Module]:
    """FSDP2 units below the root, inner first: a ViT's blocks, the context encoder, the predictor's blocks.

    The encoder is its own unit so the evaluation can call it alone; ``dist.parallelize`` shards the
    root (the JEPA module, or the target encoder) last.
    """
    if isinstance(module, JEPA):
        return [*shard_units(module.encoder), module.encoder, *module.predictor.blocks]
    return list(module.blocks) if isinstance(module, (VisionTransformer, TokenTransformer)) else []


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)
    kind, seq = cfg.data.kind, {}
    if kind != "image":
        seq = load_timeseries(cfg.data) if kind == "timeseries" else load_text(cfg.data)
        train_set = seq["train_set"]
        test_set, mean, std = None, (0.0,), (1.0,)
    elif cfg.data.root is None:
        digits = digits_canvas(seed=cfg.data.seed, size=cfg.data.image_size)
        train_set = TensorDataset(digits["train_images"], digits["train_labels"])
        test_set = TensorDataset(digits["test_images"], digits["test_labels"])
        mean, std = (0.5,), (0.5,)
    else:
        train_set, test_set = image_folders(cfg.data.root, cfg.data.val_root, cfg.data.image_size,
                                            skip_unreadable=cfg.data.skip_unreadable)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    probe_train = len(train_set) if kind == "image" else len(seq["train"][1])
    if cfg.eval.k > probe_train:  # found now, not after training
        fail("eval.k", cfg.eval.k, f"at most the number of training {kind} items ({probe_train})")
    ckpt_dir = start_run(cfg.run_dir, cfg, resume=cfg.resuming, resume_from=cfg.resume_from,
                         allow=cfg.resume_allow, or_start=cfg.resume_or_start)

    seed_everything(cfg.train.seed)
    if kind == "image":
        encoder = build_encoder(cfg, in_chans=train_set[0][0].shape[0])
        grid = (encoder.grid, encoder.grid)
    else:
        encoder = build_sequence_encoder(cfg, seq)
    depths, start_weights = cfg.levels.resolved(cfg.model.depth())
    blocks = tuple(d - 1 for d in depths)  # 0-based, for patch_tokens(layers=...)
    dims = layer_dims(encoder, blocks)
    hierarchical = len(depths) > 1  # a trunk of predictor_dim, then one head per level
    out_dim = cfg.model.predictor_dim if hierarchical else dims[0]
    if kind == "image":
        model = JEPA(encoder, build_predictor(cfg, encoder, out_dim), dims if hierarchical else []).to(device)
    else:
        m = cfg.model
        predictor = SequencePredictor(seq["length"], encoder.dim, m.predictor_dim, m.predictor_depth,
                                      m.predictor_heads, out_dim=out_dim)
        model = SequenceJEPA(encoder, predictor, dims if hierarchical else []).to(device)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False).to(device)
    untrained = copy.deepcopy(target_encoder)  # the baseline of the final evaluation
    prep = lambda x: normalize(to_unit(x.to(device)), mean, std)  # noqa: E731

    def loader(dataset, **kw) -> DataLoader:
        workers = cfg.data.workers if isinstance(dataset, ImageFolder) else 0
        return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers,
                          generator=torch.Generator().manual_seed(cfg.train.seed), **kw)

    wrapped = dist.parallelize(model, cfg.dist.strategy, device, shard=shard_units)
    target_encoder = dist.parallelize(target_encoder, cfg.dist.strategy, device, shard=shard_units)
    if dist.world_size() > 1:
        seed_everything(cfg.train.seed + dist.rank())
    # A parameter group per level's head (the rest in group 0): each head's lr follows its own schedule.
    groups = param_groups(model, layer_of=head_level, layer_scales=[1.0] * (1 + len(model.heads)))
    group_level = [head_level(g["names"][0]) for g in groups]
    state = TrainState(model=wrapped, optimizer=torch.optim.AdamW(groups), target=target_encoder,
                       scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
                       accum=cfg.train.accum, extras={"wall_s": 0.0})
    if cfg.resuming and resume(ckpt_dir, state, checkpoint=cfg.resume_from):
        record_resume(cfg.run_dir, cfg, state.step)  # config.json stays as it was
        if dist.is_main():
            print(f"resumed from {ckpt_dir} at step {state.step}")
    steps = cfg.train.steps
    log = Logger(cfg.run_dir, cfg.log, total_steps=steps, start_step=state.step,
                 run_id=state.run_id, config=to_jsonable(cfg))
    state.run_id = log.run_id
    mask_rng = torch.Generator()
    loss_rng = torch.Generator()  # the contrastive loss's negatives
    levels = cfg.levels

    def make_batch(x: torch.Tensor):
        """Images: (images, context_idx, target_idx). Sequences: (clean input for the target encoder,
        the context encoder's input, visible (B, L), masked (B, L))."""
        if kind == "image":
            images = random_resized_crop(prep(x), cfg.data.image_size, scale=cfg.data.crop_scale)
            context_idx, target_idx = multi_block_masks(len(images), grid, cfg.mask, mask_rng)
            return images, context_idx.to(device), target_idx.to(device)
        if kind == "timeseries":
            masked = span_masks(len(x), x.shape[-1], cfg.mask.span, cfg.mask.ratio, mask_rng).to(device)
            x = x.to(device)
            return x, x, ~masked, masked
        corrupted, masked = token_masks(x, cfg.mask.ratio, mask_id=seq["mask_id"],
                                        vocab_size=seq["vocab_size"], random_token_p=cfg.mask.random_token_p,
                                        special=seq["special"], generator=mask_rng)
        visible = (x != 0) & ~masked  # the context encoder's pooled tokens: real, unmasked ones
        return x.to(device), corrupted.to(device), visible.to(device), masked.to(device)

    def level_pairs(state: TrainState, batch):
        """Each level's (prediction, target, mask) as (B, N, D), (B, N, D), (B, N) or None (all count)."""
        if kind == "image":
            images, context_idx, target_idx = batch
            with torch.no_grad():
                _, outputs = patch_tokens(state.target, images, layers=blocks)
            preds, pooled = state.model(images, context_idx, target_idx)
            b, m, k = target_idx.shape  # one row per target block: multiscale pools within a block
            pairs = [(p.reshape(b * m, k, -1), jepa_targets(o, target_idx).reshape(b * m, k, -1), None)
                     for p, o in zip(preds, outputs)]
            return pairs, pooled, {"context_patches": float(context_idx.shape[1])}
        clean, inputs, visible, masked = batch
        with torch.no_grad():
            _, outputs = sequence_tokens(state.target, clean, layers=blocks)
        preds, pooled = state.model(inputs, visible, masked)
        pairs = [(p, F.layer_norm(o, o.shape[-1:]), masked) for p, o in zip(preds, outputs)]
        return pairs, pooled, {"masked_fraction": masked.float().mean()}

    def loss_fn(state: TrainState, batch):
        pairs, pooled, aux = level_pairs(state, batch)
        weights = level_values_at(state.step, start_weights, levels.weights_final, steps)
        loss = 0.0
        for depth, (pred, targets, mask), weight in zip(depths, pairs, weights):
            level_loss = prediction_loss(cfg.loss, pred, targets, mask, loss_rng)
            loss = loss + weight * level_loss
            d = targets.shape[-1]
            seen = targets if mask is None else targets[mask]
            guess = pred if mask is None else pred[mask]
            aux |= {f"loss_depth{depth}": level_loss, f"weight_depth{depth}": weight,
                    **collapse_metrics(seen.reshape(-1, d)[:1024], f"depth{depth}_target_"),
                    **collapse_metrics(guess.reshape(-1, d)[:1024], f"depth{depth}_pred_")}
        if cfg.loss.var_weight or cfg.loss.cov_weight:
            variance, covariance = variance_covariance_loss(pooled, gamma=cfg.loss.var_gamma)
            loss = loss + cfg.loss.var_weight * variance + cfg.loss.cov_weight * covariance
            aux |= {"var_loss": variance, "cov_loss": covariance}
        aux |= collapse_metrics(pooled, "context_pooled_")
        return loss, aux

    if cfg.tune.find_lr or cfg.tune.find_batch:
        def tune_batch(size: int):
            idx = torch.randint(0, len(train_set), (size,)).tolist()
            return make_batch(torch.stack([train_set[i][0] for i in idx]))

        log.close()
        return tune(cfg.tune, cfg.run_dir, loss_fn, state, tune_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    sampler = ResumableSampler(len(train_set), seed=cfg.train.seed,
                               start=state.data_position * cfg.batch_size, rank=dist.rank(),
                               world=dist.world_size())
    batches = iter(loader(train_set, sampler=sampler, drop_last=True))
    limits = {"effective_rank": cfg.alarm.min_effective_rank, "std": cfg.alarm.min_std}
    below = {f"depth{d}_target_{name}": limit for d in depths for name, limit in limits.items()}
    watch = CollapseWatch(below=below, patience=cfg.alarm.patience)
    started = time.perf_counter() - state.extras["wall_s"]
    with StopSignals(enabled=cfg.stop_on_signal) as signals:  # preemption, Ctrl-C
        while state.step < steps:
            images, _ = next(batches)
            state.data_position += 1
            mask_rng.manual_seed(cfg.train.seed * 1_000_003 + state.data_position * 101 + dist.rank())
            loss_rng.manual_seed(cfg.train.seed * 1_000_033 + state.data_position * 103 + dist.rank())
            batch = make_batch(images)
            loss, aux = forward_loss(loss_fn, state, batch, amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, steps)
            head_scales = level_values_at(state.step, levels.lr_scales or (1.0,) * len(depths),
                                          levels.lr_scales_final, steps)
            scales = [1.0 if level == 0 else head_scales[level - 1] for level in group_level]
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps), group_scales=scales)
            momentum = momentum_at(state.step, cfg.ema, steps)
            ema_update(state.target, model.encoder, momentum)
            means = log({"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "momentum": momentum,
                         **({f"lr_scale_depth{d}": v for d, v in zip(depths, head_scales)} if hierarchical
                            else {})}, step=state.step)
            if means and (warning := watch(means)):
                print(f"step {state.step}: {warning}", flush=True)
                log.write({"collapse_warning": warning}, state.step, kind="alarm")
            picture_due = state.step == 1 or state.step % max(cfg.mask_image_every, 1) == 0
            if kind == "image" and cfg.mask_image_every and picture_due:
                images, context_idx, target_idx = batch
                picture = mask_image(images, context_idx, target_idx, encoder.patch_size)
                log.image("masks", picture, state.step)
            state.extras["wall_s"] = time.perf_counter() - started
            maybe_save(ckpt_dir, state, every=cfg.ckpt.every, keep_last=cfg.ckpt.keep_last)
            if signals.requested():  # every rank stops at the same update
                break
    save_last(ckpt_dir, state)
    if signals.signal_name:  # stopped by a signal: the checkpoint is saved, continue with --resume
        log.close()
        signals.exit(state.step, ckpt_dir)
    train_s = time.perf_counter() - started

    if kind == "image":
        def embed(features, dataset):
            out = [(features(prep(x)).float().cpu(), y) for x, y in loader(dataset)]
            return torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])

        def features(net: nn.Module, layers: int):
            pool = partial(pooled_patches, net, pool=cfg.eval.pool, layers=layers)
            return embed(pool, train_set), embed(pool, test_set)

        raw, raw_name = (embed(nn.Flatten(), train_set), embed(nn.Flatten(), test_set)), "pixels"
    else:
        features = partial(sequence_features, cfg, seq, device=device)
        raw, raw_name = raw_sequence_features(cfg, seq), ("raw" if kind == "timeseries" else "bow")

    def last_width(net: nn.Module) -> int:  # an image's last layer is pooled to eval.pool x eval.pool
        return (cfg.eval.pool ** 2 if kind == "image" else 1) * layer_dims(net, (cfg.model.depth() - 1,))[0]

    nets = {"": target_encoder, "_context_encoder": model.encoder, "_random_init": untrained}
    scores, last_layer_features = evaluate(cfg, nets, features, last_width, raw, raw_name)
    summary = {
        "steps": state.step,
        "skipped_unreadable": len(getattr(train_set, "skipped", [])) + len(getattr(test_set, "skipped", [])),
        "wall_s": round(train_s, 3),
        **scores,
        "params_digest": params_digest(model),
        "ranks": dist.world_size(),
        "run_id": state.run_id,
    }
    (_, _), (held_out, _) = last_layer_features[""]  # collapse check on held-out items: the target's
    final = collapse_metrics(held_out[:256], "")
    summary |= {"effective_rank": float(final["effective_rank"]), "feature_std": float(final["std"]),
                "collapse_warning": watch.last}
    log.write({k: v for k, v in summary.items() if k.startswith(("knn", "linear"))}, state.step)
    log.close()
    write_summary(cfg.run_dir, summary)
    main_process = dist.is_main()
    dist.shutdown()
    if main_process:
        s = summary
        linear = "" if not cfg.eval.linear else (
            f"linear probe: trained {s['linear_acc']:.3f}, untrained {s['linear_acc_random_init']:.3f}, "
            f"{raw_name} {s[f'linear_acc_{raw_name}']:.3f}; ")
        print(f"{linear}k-NN: trained {s['knn_acc']:.3f}, untrained {s['knn_acc_random_init']:.3f}, "
              f"{raw_name} {s[f'knn_acc_{raw_name}']:.3f}; effective rank {s['effective_rank']:.1f}; "
              f"summary in {cfg.run_dir / 'summary.json'}")
    return summary


@torch.no_grad()
def evaluate(cfg: Config, nets: dict[str, nn.Module], features, last_width, raw, raw_name: str):
    """I-JEPA's protocol on held-out items, for each network in ``nets`` (summary-key suffix -> encoder)
    and for the raw input: a linear probe and k-NN on the last layer's and on the last ``eval.layers``
    layers' pooled tokens; ``linear_acc{suffix}`` / ``knn_acc{suffix}`` are the better of the two.

    ``features(net, layers)`` gives ``((train_x, train_y), (test_x, test_y))``, the layers' features
    concatenated, the last layer's last (``last_width(net)`` columns: one pass gives both); ``raw`` is
    that for the raw input (pixels, resampled series, or bag of words), reported as
    ``*_acc_{raw_name}``. Returns the summary's numbers and each net's last-layer features."""
    def probes(split_features, prefix: str, suffix: str) -> dict[str, float]:
        (train_f, train_y), (test_f, test_y) = split_features
        out = {f"knn_acc{prefix}{suffix}": knn_accuracy(train_f, train_y, test_f, test_y, k=cfg.eval.k,
                                                        temperature=cfg.eval.temperature)}
        if cfg.eval.linear:
            out[f"linear_acc{prefix}{suffix}"] = linear_probe(train_f, train_y, test_f, test_y,
                                                              seed=cfg.train.seed)["acc"]
        return out

    result: dict[str, float] = {}
    last_layer_features = {}
    last_k = min(cfg.eval.layers, cfg.model.depth())
    for suffix, net in nets.items():
        was_training = net.training
        net.eval()
        layers = features(net, last_k)
        net.train(was_training)
        width = last_width(net)
        last_layer_features[suffix] = tuple((f[:, -width:], y) for f, y in layers)
        last = probes(last_layer_features[suffix], "_last_layer", suffix)
        concat = probes(layers, "_last_layers", suffix)
        result |= last | concat
        for kind in ("knn", "linear") if cfg.eval.linear else ("knn",):
            result[f"{kind}_acc{suffix}"] = max(last[f"{kind}_acc_last_layer{suffix}"],
                                                concat[f"{kind}_acc_last_layers{suffix}"])
    result |= probes(raw, "", f"_{raw_name}")
    result["probe_layers"] = last_k
    return result, last_layer_features


@torch.no_grad()
def sequence_features(cfg: Config, seq: dict, net: nn.Module, layers: int, *, device: torch.device):
    """Pooled tokens of the last ``layers`` layers, concatenated: a sentence's mean over its real tokens;
    a series' mean over its windows (every ``data.stride`` steps) of each window's mean."""
    depth = cfg.model.depth()
    chosen = tuple(range(depth - layers, depth))

    def pooled(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        _, outs = sequence_tokens(net, x.to(device), None, layers=chosen)
        return torch.cat([masked_mean(o, valid.to(device)) for o in outs], dim=1).float().cpu()

    out = []
    for split in ("train", "test"):
        items, labels = seq[split]
        if cfg.data.kind == "text":
            f = torch.cat([pooled(ids, ids != 0) for ids in items.split(256)])
        else:
            cut = [windows_of(x, cfg.data.window, cfg.data.stride) for x in items]
            f = torch.stack([pooled(w, torch.ones(w.shape[0], w.shape[-1], dtype=torch.bool)).mean(dim=0)
                             for w in cut])
        out.append((f, labels))
    return out[0], out[1]


def raw_sequence_features(cfg: Config, seq: dict):
    """The baselines' features: each series resampled to ``data.window`` steps (linear interpolation),
    or each sentence's bag of words (token counts over the training sentences' vocabulary)."""
    if cfg.data.kind == "timeseries":
        def resampled(items):
            return torch.stack([F.interpolate(x[None], size=cfg.data.window, mode="linear")[0].flatten()
                                for x in items])
        return tuple((resampled(seq[split][0]), seq[split][1]) for split in ("train", "test"))

    def counts(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(ids), seq["vocab_size"]).scatter_add_(1, ids, torch.ones(ids.shape))[:, 1:]

    train, test = counts(seq["train"][0]), counts(seq["test"][0])
    used = train.sum(dim=0) > 0  # words never seen in training carry nothing a probe could fit
    return (train[:, used], seq["train"][1]), (test[:, used], seq["test"][1])


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

"""I-JEPA and hierarchical JEPA: predict the representations of masked image blocks from a visible context.

    python recipes/ijepa.py --run-dir runs/ijepa                   # masked CNN, embedded digits, CPU, minutes
    python recipes/ijepa.py hjepa --run-dir runs/hjepa             # hierarchical: targets at every stage
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

The run ends with I-JEPA's evaluation on held-out images: a linear probe
(logistic regression on standardised, average-pooled patch tokens of the
target encoder, its regularisation chosen on a validation split of the
training set) on the last layer and on the last ``--eval.layers`` layers
concatenated, the better one reported, and a k-NN classifier beside it; each
also for the same network untrained and for raw pixels.
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
from stepkit.check import at_least, fail, integer_at_least
from stepkit.checkpoint import maybe_save, resume, save_last
from stepkit.data import ImageFolder, ResumableSampler, image_folders
from stepkit.datasets import digits_canvas
from stepkit.evaluation import knn_accuracy, linear_probe
from stepkit.log import LogConfig, Logger
from stepkit.losses.jepa import variance_covariance_loss
from stepkit.masking import MultiBlock, mask_image, multi_block_masks
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


@dataclass
class Data:
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

    def __post_init__(self) -> None:
        integer_at_least("image_size", self.image_size, 8)


@dataclass
class Model:
    arch: Literal["cnn", "vit-toy", "vit-tiny", "vit-small", "vit-base", "vit-huge"] = "cnn"
    """cnn: the masked CNN (CNN-JEPA) with the conv predictor; vit-*: a ViT with I-JEPA's transformer
    predictor."""
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

    def depth(self) -> int:
        """Stages of the CNN, blocks of the ViT: what --levels.depths counts."""
        if self.arch == "cnn":
            return len(self.widths)
        return VIT_PRESETS[self.arch.removeprefix("vit-")]["depth"]


@dataclass
class Loss:
    kind: Literal["smooth_l1", "mse"] = "smooth_l1"
    var_weight: float = 0.0
    """Weight of VICReg's variance hinge on the context encoder's pooled embeddings (0: off)."""
    cov_weight: float = 0.0
    """Weight of VICReg's covariance term on the same embeddings (0: off)."""
    var_gamma: float = 1.0
    """The std each embedding dimension is kept above by the variance hinge."""

    def __post_init__(self) -> None:
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
    mask: MultiBlock = field(default_factory=MultiBlock)
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
        depth = self.model.depth()
        if self.levels.depths and self.levels.depths[-1] > depth:
            what = "stages" if self.model.arch == "cnn" else "blocks"
            fail("levels.depths", self.levels.depths, f"{what} up to the encoder's depth, {depth} "
                 f"({self.model.arch})")
        if self.model.arch == "cnn" and self.data.image_size % math.prod(self.model.strides):
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
        mask=MultiBlock(targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
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
        hidden = self.predictor(context, context_idx, target_idx)
        preds = [head(hidden) for head in self.heads] if len(self.heads) else [hidden]
        return preds, context.mean(dim=1)


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
    return list(module.blocks) if isinstance(module, VisionTransformer) else []


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)
    if cfg.data.root is None:
        digits = digits_canvas(seed=cfg.data.seed, size=cfg.data.image_size)
        train_set = TensorDataset(digits["train_images"], digits["train_labels"])
        test_set = TensorDataset(digits["test_images"], digits["test_labels"])
        mean, std = (0.5,), (0.5,)
    else:
        train_set, test_set = image_folders(cfg.data.root, cfg.data.val_root, cfg.data.image_size,
                                            skip_unreadable=cfg.data.skip_unreadable)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if cfg.eval.k > len(train_set):  # found now, not after training
        fail("eval.k", cfg.eval.k, f"at most the number of training images ({len(train_set)})")
    ckpt_dir = start_run(cfg.run_dir, cfg, resume=cfg.resuming, resume_from=cfg.resume_from,
                         allow=cfg.resume_allow, or_start=cfg.resume_or_start)
    in_chans = train_set[0][0].shape[0]

    seed_everything(cfg.train.seed)
    encoder = build_encoder(cfg, in_chans)
    grid = (encoder.grid, encoder.grid)
    depths, start_weights = cfg.levels.resolved(cfg.model.depth())
    blocks = tuple(d - 1 for d in depths)  # 0-based, for patch_tokens(layers=...)
    dims = layer_dims(encoder, blocks)
    hierarchical = len(depths) > 1  # a trunk of predictor_dim, then one head per level
    predictor = build_predictor(cfg, encoder, cfg.model.predictor_dim if hierarchical else dims[0])
    model = JEPA(encoder, predictor, dims if hierarchical else []).to(device)
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
    levels = cfg.levels

    def make_batch(images: torch.Tensor):
        images = random_resized_crop(prep(images), cfg.data.image_size, scale=cfg.data.crop_scale)
        context_idx, target_idx = multi_block_masks(len(images), grid, cfg.mask, mask_rng)
        return images, context_idx.to(device), target_idx.to(device)

    def loss_fn(state: TrainState, batch):
        images, context_idx, target_idx = batch
        with torch.no_grad():
            _, outputs = patch_tokens(state.target, images, layers=blocks)
        preds, pooled = state.model(images, context_idx, target_idx)
        weights = level_values_at(state.step, start_weights, levels.weights_final, steps)
        loss, aux = 0.0, {"context_patches": float(context_idx.shape[1])}
        for depth, out, pred, weight in zip(depths, outputs, preds, weights):
            targets = jepa_targets(out, target_idx)
            if cfg.loss.kind == "smooth_l1":
                level_loss = F.smooth_l1_loss(pred.float(), targets.float())
            else:
                level_loss = F.mse_loss(pred.float(), targets.float())
            loss = loss + weight * level_loss
            d = targets.shape[-1]
            aux |= {f"loss_depth{depth}": level_loss, f"weight_depth{depth}": weight,
                    **collapse_metrics(targets.reshape(-1, d)[:1024], f"depth{depth}_target_"),
                    **collapse_metrics(pred.reshape(-1, d)[:1024], f"depth{depth}_pred_")}
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
            if cfg.mask_image_every and (state.step == 1 or state.step % cfg.mask_image_every == 0):
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

    summary = {
        "steps": state.step,
        "skipped_unreadable": len(getattr(train_set, "skipped", [])) + len(getattr(test_set, "skipped", [])),
        "wall_s": round(train_s, 3),
        **evaluate(cfg, {"": target_encoder, "_context_encoder": model.encoder, "_random_init": untrained},
                   train_set, test_set, prep, loader),
        "params_digest": params_digest(model),
        "ranks": dist.world_size(),
        "run_id": state.run_id,
    }
    with torch.no_grad():  # collapse check on held-out images: the target encoder's pooled features
        probe = torch.stack([test_set[i][0] for i in range(min(256, len(test_set)))])
        target_encoder.eval()
        final = collapse_metrics(pooled_patches(target_encoder, prep(probe), 1), "")
        target_encoder.train()
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
            f"pixels {s['linear_acc_pixels']:.3f}; ")
        print(f"{linear}k-NN: trained {s['knn_acc']:.3f}, untrained {s['knn_acc_random_init']:.3f}, pixels "
              f"{s['knn_acc_pixels']:.3f}; effective rank {s['effective_rank']:.1f}; summary in "
              f"{cfg.run_dir / 'summary.json'}")
    return summary


@torch.no_grad()
def evaluate(cfg: Config, nets: dict[str, nn.Module], train_set, test_set, prep, loader) -> dict[str, float]:
    """I-JEPA's protocol on held-out images, for each network in ``nets`` (summary-key suffix -> encoder)
    and for raw pixels: a linear probe and k-NN on the last layer's and on the last ``eval.layers``
    layers' pooled tokens; ``linear_acc{suffix}`` / ``knn_acc{suffix}`` are the better of the two."""
    def embed(features, dataset):
        out = [(features(prep(x)).float().cpu(), y) for x, y in loader(dataset)]
        return torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])

    def probes(features, prefix: str, suffix: str) -> dict[str, float]:
        (train_f, train_y), (test_f, test_y) = embed(features, train_set), embed(features, test_set)
        out = {f"knn_acc{prefix}{suffix}": knn_accuracy(train_f, train_y, test_f, test_y, k=cfg.eval.k,
                                                        temperature=cfg.eval.temperature)}
        if cfg.eval.linear:
            out[f"linear_acc{prefix}{suffix}"] = linear_probe(train_f, train_y, test_f, test_y,
                                                              seed=cfg.train.seed)["acc"]
        return out

    result: dict[str, float] = {}
    for suffix, net in nets.items():
        was_training = net.training
        net.eval()
        depth = cfg.model.depth()
        last_k = min(cfg.eval.layers, depth)
        last = probes(partial(pooled_patches, net, pool=cfg.eval.pool), "_last_layer", suffix)
        concat = probes(partial(pooled_patches, net, pool=cfg.eval.pool, layers=last_k), "_last_layers",
                        suffix)
        net.train(was_training)
        result |= last | concat
        for kind in ("knn", "linear") if cfg.eval.linear else ("knn",):
            result[f"{kind}_acc{suffix}"] = max(last[f"{kind}_acc_last_layer{suffix}"],
                                                concat[f"{kind}_acc_last_layers{suffix}"])
    result |= probes(nn.Flatten(), "", "_pixels")
    result["probe_layers"] = min(cfg.eval.layers, cfg.model.depth())
    return result


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

"""I-JEPA and hierarchical JEPA on images: predict the representations of masked patches from the rest.

    python recipes/ijepa.py --run-dir runs/ijepa                   # masked CNN, embedded digits, CPU, minutes
    python recipes/ijepa.py hjepa --run-dir runs/hjepa             # hierarchical: targets at every stage
    python recipes/ijepa.py --loss.kind contrastive                # or multiscale: the guide's loss variants
    python recipes/ijepa.py --levels.depths 3 5 --levels.weights 0.5 1 --levels.weights-final 0 1
    python recipes/ijepa.py --loss.var-weight 1 --loss.cov-weight 0.04   # a variance guard (C-JEPA)
    python recipes/ijepa.py --data.root ~/photos --eval.train-root L --eval.val-root V   # your images
    python recipes/ijepa.py --data.shards 'data/{0000..0127}.tar'  # WebDataset shards, resumable
    python recipes/ijepa.py vit-s16 --init.from vit_s16.pth ...    # from a timm / I-JEPA / DINO ViT
    python recipes/ijepa.py vit-s16 --run-dir runs/s16 --data.root /data/imagenet/train   # one GPU
    python recipes/ijepa.py vit-h14 --run-dir runs/h14 --data.root /data/imagenet/train   # the paper, GPUs

Each batch gets I-JEPA's multi-block masks; the context encoder sees only the
context, and a predictor regresses what the EMA target encoder makes of the
target patches (``--levels.depths``: one level, I-JEPA; several, hierarchical
JEPA). The run ends with linear and k-NN probes on held-out images, beside
the network untrained and raw pixels. Series and text: recipes/jepa_sequences.py;
the method, its options and measurements: docs/recipes/ijepa.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from stepkit import dist, param_groups
from stepkit.augment import normalize, to_unit
from stepkit.check import fail, in_range, integer_at_least
from stepkit.cli import cli, run_main
from stepkit.config import Amp, CkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import (
    CropPlan,
    ImageDataConfig,
    ImageSets,
    ProbeImagesConfig,
    image_sets,
    seeded_loader,
    train_batches,
)
from stepkit.ema import ema_update, target_copy
from stepkit.evaluation import frozen_probes, loader_features, probes_line
from stepkit.jepa import (
    JEPALoss,
    Levels,
    TargetAlarm,
    head_level,
    jepa_shard_units,
    level_losses,
    level_lr_scales,
    level_values_at,
    target_collapse_watch,
)
from stepkit.log import LogConfig
from stepkit.masking import MultiBlock, mask_image, multi_block_masks
from stepkit.models import JEPA, ConvPredictor, JEPAPredictor, MaskedCNN, VisionTransformer
from stepkit.models.jepa import jepa_targets, layer_dims, patch_tokens, pooled_patches
from stepkit.models.vit import PRESETS as VIT_PRESETS
from stepkit.monitor import collapse_metrics
from stepkit.online_probe import OnlineProbe
from stepkit.probe import ProbeRecord
from stepkit.run import Run, params_digest, pick_device, seed_everything, set_threads
from stepkit.schedules import LRSchedule, MomentumSchedule, WDSchedule, lr_at, momentum_at, wd_at
from stepkit.seeds import seed_of
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss
from stepkit.tuning import TuneConfig, tune
from stepkit.weights import InitConfig, describe_part


@dataclass
class Data(ImageDataConfig):  # root, shards, seed, workers, skip_unreadable
    image_size: int = 32
    """The side of the crops the encoder sees (image files: evaluation images are resized to
    image_size / 0.875, the field's 256 for 224, and centre-cropped)."""
    crop_scale: tuple[float, float] = (0.6, 1.0)
    """Random resized crop before masking, as a fraction of the image's area (I-JEPA uses (0.3, 1.0)
    on ImageNet)."""
    flip_p: float = 0.5
    """The chance of mirroring a crop left-right (I-JEPA: 0, no flip; its presets say so)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        integer_at_least("image_size", self.image_size, 8)
        in_range("flip_p", self.flip_p, 0.0, 1.0)


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
    class_token: bool = True
    """vit: a class token in the encoders (--model.no-class-token: none, as I-JEPA's ViT; the paper
    presets)."""
    predictor_dim: int = 128
    predictor_depth: int = 3
    """Predictor blocks: residual depthwise-separable conv blocks (cnn), transformer blocks (vit)."""
    predictor_heads: int = 4
    """vit: the predictor's attention heads."""
    predictor_kernel: int = 3
    """cnn: the predictor's depthwise kernel size (odd)."""
    weight_init: Literal["stepkit", "ijepa"] = "stepkit"
    """vit: ijepa: I-JEPA's initialisation (the patch embedding std 0.02, each block's output projections
    divided by sqrt(2 x depth) in the encoders and the predictor; the paper presets); stepkit: the patch
    embedding std 1/sqrt(fan-in), no rescaling (the measured vit-toy numbers)."""
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
        if self.weight_init != "stepkit" and self.arch == "cnn":
            fail("model.weight_init", self.weight_init, "stepkit with --model.arch cnn (I-JEPA's "
                 "initialisation is a ViT's: choose --model.arch vit-...)")

    def depth(self) -> int:
        """Stages of the CNN, blocks of the ViT: what --levels.depths counts."""
        if self.arch == "cnn":
            return len(self.widths)
        return VIT_PRESETS[self.arch.removeprefix("vit-")]["depth"]


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
class Eval(ProbeImagesConfig):  # k, temperature, train_root, val_root
    pool: int = 1
    """Probe features: patch tokens averaged over a pool x pool grid (1: the plain mean, I-JEPA's)."""
    layers: int = 4
    """The second linear probe reads the last this many layers (vit blocks, cnn stages) concatenated."""
    linear: bool = may_change_on_resume(True)
    """Fit the linear probes (--eval.no-linear: k-NN only, a few seconds less)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        integer_at_least("eval.pool", self.pool, 1)
        integer_at_least("eval.layers", self.layers, 1)


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/ijepa")
    init: InitConfig = field(default_factory=InitConfig)
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 64
    """Images per update on each rank."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    mask: MultiBlock = field(default_factory=MultiBlock)
    loss: JEPALoss = field(default_factory=JEPALoss)
    levels: Levels = field(default_factory=Levels)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500))
    optim: Optim = field(default_factory=Optim)
    ema: MomentumSchedule = field(
        default_factory=lambda: MomentumSchedule(momentum=0.99, momentum_final=0.999))
    eval: Eval = field(default_factory=Eval)
    alarm: TargetAlarm = field(default_factory=TargetAlarm)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    mask_image_every: int = may_change_on_resume(250)
    """Updates between two pictures of the masks in TensorBoard / wandb (0: never)."""
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=250))
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 1)
        integer_at_least("mask_image_every", self.mask_image_every, 0)
        arch, depth = self.model.arch, self.model.depth()
        if self.levels.depths and self.levels.depths[-1] > depth:
            what = "stages" if arch == "cnn" else "blocks"
            fail("levels.depths", self.levels.depths, f"{what} up to the encoder's depth, {depth} "
                 f"({self.model.arch})")
        if arch == "cnn" and self.data.image_size % math.prod(self.model.strides):
            fail("data.image_size", self.data.image_size,
                 f"a multiple of the product of model.strides={self.model.strides}")
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


def _vit_h14(**overrides) -> Config:
    """I-JEPA's ViT-H/14 run (Assran et al. 2023; ijepa's in1k_vith14_ep300.yaml): 300 ImageNet epochs, 128
    images x 16 GPUs (625 updates an epoch), no flip, no class token, lr warmed up from 2e-4, EMA to 1."""
    settings = dict(
        device="cuda", amp="bf16", batch_size=128,
        data=Data(image_size=224, crop_scale=(0.3, 1.0), flip_p=0.0),
        model=Model(arch="vit-huge", patch_size=14, predictor_dim=384, predictor_depth=12,
                    predictor_heads=16, pos_embed="sincos", class_token=False, weight_init="ijepa"),
        mask=MultiBlock(targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                        context_scale=(0.85, 1.0), sampler="ijepa", min_keep=10),
        train=TrainConfig(steps=187500),
        optim=Optim(lr=1e-3, warmup_start_lr=2e-4, min_lr=1e-6, warmup_steps=25000, wd=0.04, wd_final=0.4,
                    clip=None),
        ema=MomentumSchedule(momentum=0.996, momentum_final=1.0, momentum_decay="linear"),
        log=LogConfig(every=50),
        ckpt=CkptConfig(every=2500),
    )
    return Config(**{**settings, **overrides})


PRESETS = {
    "tiny-cpu": ("The CPU default: the masked CNN on the embedded digits, targets at its last stage.",
                 Config()),
    "hjepa": ("Hierarchical JEPA on the CPU: the same network, targets at its last 3 stages.",
              Config(run_dir=Path("runs/hjepa"), levels=Levels(depths=(3, 4, 5), weights=(0.25, 0.5, 1.0)))),
    "vit-toy": ("The earlier CPU default: a toy ViT, I-JEPA's transformer predictor and mask sampler.",
                Config(model=Model(arch="vit-toy", predictor_dim=64, predictor_depth=2), eval=Eval(pool=2),
                       mask=MultiBlock(sampler="ijepa"))),
    "vit-s16": (
        "One GPU: ViT-S/16 with I-JEPA's masks, predictor and schedules, batch 256 (set --data.root).",
        _vit_h14(batch_size=256,
                 model=Model(arch="vit-small", patch_size=16, predictor_dim=384, predictor_depth=6,
                             predictor_heads=6, pos_embed="sincos", class_token=False, weight_init="ijepa"),
                 train=TrainConfig(steps=150000),
                 optim=Optim(lr=2.5e-4, warmup_start_lr=5e-5, min_lr=1e-6, warmup_steps=10000, wd=0.04,
                             wd_final=0.4, clip=None))),
    "vit-h14": ("I-JEPA's ViT-H/14 run (in1k_vith14_ep300.yaml): 300 ImageNet epochs, 128 images per rank "
                "on 16 ranks (torchrun: 2 nodes x 8).", _vit_h14()),
    "hjepa-vit-h14": ("I-JEPA's ViT-H/14 settings with targets at depths 8, 16, 24 and 32.",
                      _vit_h14(levels=Levels(depths=(8, 16, 24, 32), weights=(0.25, 0.25, 0.5, 1.0)))),
}


def build_encoder(cfg: Config, in_chans: int) -> nn.Module:
    if cfg.model.arch == "cnn":
        return MaskedCNN(img_size=cfg.data.image_size, in_chans=in_chans, widths=cfg.model.widths,
                         strides=cfg.model.strides, dilations=cfg.model.dilations or None)
    patch = {"patch_size": cfg.model.patch_size} if cfg.model.patch_size else {}  # else the preset's
    return VisionTransformer.preset(cfg.model.arch.removeprefix("vit-"), img_size=cfg.data.image_size,
                                    in_chans=in_chans, grad_checkpointing=cfg.model.grad_checkpointing,
                                    class_token=cfg.model.class_token, init=cfg.model.weight_init,
                                    pos_embed=cfg.model.pos_embed, **patch)


def build_model(cfg: Config, in_chans: int) -> JEPA:
    """The context encoder and the predictor: one level's, or a trunk and a head per level (hjepa)."""
    encoder = build_encoder(cfg, in_chans)
    depths, _ = cfg.levels.resolved(cfg.model.depth())
    dims = layer_dims(encoder, tuple(d - 1 for d in depths))
    hierarchical = len(depths) > 1  # a trunk of predictor_dim, then one head per level
    m, out_dim = cfg.model, cfg.model.predictor_dim if hierarchical else dims[0]
    if m.arch == "cnn":
        predictor: nn.Module = ConvPredictor(encoder.grid, encoder.dim, m.predictor_dim, m.predictor_depth,
                                             m.predictor_kernel, out_dim=out_dim)
    else:
        predictor = JEPAPredictor(encoder.grid**2, encoder.dim, m.predictor_dim, m.predictor_depth,
                                  m.predictor_heads, out_dim=out_dim, pos_embed=m.pos_embed,
                                  init=m.weight_init)
    return JEPA(encoder, predictor, dims if hierarchical else [])


def describe_parts(cfg: Config, encoder: nn.Module, data: ImageSets) -> dict:
    """The target and context encoders as checkpoints describe them (stepkit export / eval)."""
    facts = {"input": {"kind": "image", "size": cfg.data.image_size, "channels": data.channels,
                       "mean": data.mean, "std": data.std},
             "features": f"patch tokens; the probes average them over a {cfg.eval.pool}x{cfg.eval.pool} grid "
                         "(stepkit.models.pooled_patches)"}
    # what `stepkit eval` reproduces; a change to probe_scores changes it too
    probe = ProbeRecord("pooled_patches", pool=cfg.eval.pool, layers=cfg.eval.layers, k=cfg.eval.k,
                        temperature=cfg.eval.temperature, linear=cfg.eval.linear, batch_size=cfg.batch_size,
                        seed=cfg.train.seed, data=data.probe_data).as_dict()
    return {"target": describe_part(encoder, source="target", prefix="", **facts, probe=probe,
                                    about="the EMA target encoder (what I-JEPA evaluates)"),
            "context": describe_part(encoder, source="model", prefix="encoder.", **facts, probe=probe,
                                     about="the context encoder")}


def probe_scores(cfg: Config, nets: dict, data: ImageSets, loader, prep) -> dict:
    """I-JEPA's evaluation: linear and k-NN probes on each net's pooled patches (its last layer and last
    --eval.layers), beside raw pixels; the target's collapse metrics on held-out images."""
    def features(net: nn.Module, layers: int):  # its last `layers` blocks' pooled patches, eval mode
        pool = partial(pooled_patches, net, pool=cfg.eval.pool, layers=layers)
        return tuple(loader_features(pool, loader(d), prep) for d in (data.probe, data.test))

    pixels = tuple(loader_features(nn.Flatten(), loader(d), prep) for d in (data.probe, data.test))
    last_width = lambda net: cfg.eval.pool ** 2 * layer_dims(net, (cfg.model.depth() - 1,))[0]  # noqa: E731
    scores, last_layer_features = frozen_probes(
        nets, features, last_width, pixels, "pixels", layers=min(cfg.eval.layers, cfg.model.depth()),
        k=cfg.eval.k, temperature=cfg.eval.temperature, linear=cfg.eval.linear, seed=cfg.train.seed)
    (_, _), (held_out, _) = last_layer_features[""]  # the target's features of held-out images
    final = collapse_metrics(held_out[:256], "")
    return {**scores, "effective_rank": float(final["effective_rank"]), "feature_std": float(final["std"])}


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)
    # Image files (one crop of the full image per sample, cut in DataLoader workers), shards, or the digits
    plan = CropPlan(views=((cfg.data.image_size, cfg.data.crop_scale),), flip_p=cfg.data.flip_p)
    data = image_sets(cfg.data, cfg.eval, plan=plan, seed=cfg.train.seed, eval_size=cfg.data.image_size,
                      eval_resize=round(cfg.data.image_size / 0.875), digits_size=cfg.data.image_size,
                      min_probe_images=cfg.eval.k)
    files, shards, mean, std = data.files, data.shards, data.mean, data.std
    workers = cfg.data.workers if files else 0  # tensors in memory are read by the main process
    set_threads(cfg.threads, device=device, workers=workers)  # the workers take cores from the model
    if cfg.tune.measures and shards is not None:
        fail("data.shards", cfg.data.shards, "None with --tune.* (tune on a folder of them: --data.root)")
    seed_everything(cfg.train.seed)
    model = build_model(cfg, data.channels)
    encoder = model.encoder
    init = cfg.init.load_into(encoder, part="target") if not cfg.resuming else None  # weights only
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    if init and dist.is_main():
        print(init.line(), flush=True)
    parts = describe_parts(cfg, encoder, data)  # what each checkpoint says of its encoders
    grid = (encoder.grid, encoder.grid)
    depths, start_weights = cfg.levels.resolved(cfg.model.depth())
    blocks = tuple(d - 1 for d in depths)  # 0-based, for patch_tokens(layers=...)
    model = model.to(device)
    target_encoder = target_copy(encoder).to(device)  # deterministic: no stochastic depth, no dropout
    untrained = copy.deepcopy(target_encoder)  # the baseline of the final evaluation (or --init's weights)
    prep = lambda x: normalize(to_unit(x.to(device)), mean, std)  # noqa: E731

    def loader(dataset, **kw) -> DataLoader:  # seeded apart from the global RNG; workers ignore SIGTERM
        return seeded_loader(dataset, seed=cfg.train.seed, workers=workers,
                             timeout=cfg.data.timeout, batch_size=cfg.batch_size, **kw)

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
    probe = OnlineProbe(data.probe, features=partial(pooled_patches, target_encoder, pool=cfg.eval.pool),
                        module=target_encoder, prep=prep, state=state, seed=cfg.train.seed,  # as evaluated
                        enabled=cfg.eval.online)
    steps = cfg.train.steps
    mask_rng, loss_rng = torch.Generator(), torch.Generator()  # the masks; the contrastive loss's negatives

    def make_batch(batch):
        """A loader's batch -> (images, context_idx, target_idx): a crop of each image, normalised; masks."""
        images = normalize(next(data.crops(batch, plan, device)), mean, std)
        context_idx, target_idx = multi_block_masks(len(images), grid, cfg.mask, mask_rng)
        return images, context_idx.to(device), target_idx.to(device)

    def loss_fn(state: TrainState, batch):
        images, context_idx, target_idx = batch
        with torch.no_grad():
            _, outputs = patch_tokens(state.target, images, layers=blocks)
        preds, pooled = state.model(images, context_idx, target_idx)
        b, m, k = target_idx.shape  # one row per target block: multiscale pools within a block
        pairs = [(p.reshape(b * m, k, -1), jepa_targets(o, target_idx).reshape(b * m, k, -1), None)
                 for p, o in zip(preds, outputs)]
        weights = level_values_at(state.step, start_weights, cfg.levels.weights_final, steps)
        loss, aux = level_losses(pairs, pooled, depths=depths, weights=weights, loss=cfg.loss,
                                 generator=loss_rng)
        return loss, {"context_patches": float(context_idx.shape[1]), **aux}

    if cfg.tune.measures:  # measure instead of training: no run, no checkpoint, no log
        def tune_batch(size: int):
            idx = torch.randint(0, len(data.train), (size,)).tolist()
            return make_batch(default_collate([data.train[i] for i in idx]))  # files: epoch 0's crops

        return tune(cfg.tune, cfg.run_dir, loss_fn, state, tune_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    # An epoch-seeded order, or each shard reader's place, continued from the checkpoint; every batch
    # counted in the state as consumed.
    batches = train_batches(data.train, state, seed=cfg.train.seed, batch_size=cfg.batch_size,
                            workers=workers, shards=shards, skip_unreadable=cfg.data.skip_unreadable,
                            timeout=cfg.data.timeout)
    watch = target_collapse_watch(cfg.alarm, depths)
    with run.start(state, steps=steps, meta={"parts": parts}):  # resumed when asked; log; signals
        for raw in run.batches(batches):  # saved between updates; ends at the last step or a signal
            mask_rng.manual_seed(seed_of(cfg.train.seed, "masks", state.data_position, dist.rank()))
            loss_rng.manual_seed(seed_of(cfg.train.seed, "negatives", state.data_position, dist.rank()))
            batch = make_batch(raw)
            loss, aux = forward_loss(loss_fn, state, batch, amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, steps)
            scales, level_terms = level_lr_scales(state.step, cfg.levels, depths, group_level, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps), group_scales=scales)
            momentum = momentum_at(state.step, cfg.ema, steps)
            ema_update(state.target, model.encoder, momentum)
            terms = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "momentum": momentum,
                     **level_terms, **probe.update(state.step)}  # online_train_acc
            means = run.after_update(terms)  # NaN watch (exit 65 after a storm), log
            watch.report(means, run.log, state.step)  # a new collapse warning: printed and logged
            if cfg.mask_image_every and (state.step == 1 or state.step % cfg.mask_image_every == 0):
                run.log.image("masks", mask_image(*batch, encoder.patch_size), state.step)
    # left the run: last.pt saved (after a signal: exit 75)

    summary = run.summary(skipped_unreadable=data.skipped, params_digest=params_digest(model),
                          collapse_warning=watch.last, **({"init": init.as_dict()} if init else {}))
    if data.probe is None:  # no labelled images: the reason was printed before training
        if run.finish(summary):
            print(f"evaluation skipped (no labelled images); summary in {cfg.run_dir / 'summary.json'}")
        return summary
    start = "_init" if init else "_random_init"  # the weights it started from
    nets = {"": target_encoder, "_context_encoder": model.encoder, start: untrained}
    summary.update(probe_scores(cfg, nets, data, loader, prep), **probe.summary(data.test))
    run.log.write({k: v for k, v in summary.items() if k.startswith(("knn", "linear", "online"))}, state.step)
    if run.finish(summary):  # summary.json written; only rank 0 prints
        print(f"{probes_line(summary, baseline=start, raw_name='pixels', linear=cfg.eval.linear)}; "
              f"summary in {cfg.run_dir / 'summary.json'}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

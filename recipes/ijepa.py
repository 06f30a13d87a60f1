"""I-JEPA: predict the representations of masked image blocks from a visible context block.

    python recipes/ijepa.py --run-dir runs/ijepa                   # embedded digits, CPU, minutes
    python recipes/ijepa.py --run-dir runs/ijepa --optim.lr 1e-3
    python recipes/ijepa.py vit-h14 --run-dir runs/h14 --data.root /data/imagenet/train   # GPUs, paper
    python recipes/ijepa.py --help

A context encoder (ViT) sees only the patches of one large context block;
a narrow predictor, given the context tokens and mask tokens at the
positions of M target blocks, predicts what the target encoder (an EMA of
the context encoder, seeing the whole image) makes of those patches,
layer-normed. The loss (smooth L1 or MSE) covers the target patches only.
Collapse metrics of targets and predictions are logged; the run ends with a
k-NN evaluation of the target encoder's pooled patch tokens on held-out
images, beside the same network untrained and raw pixels.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    wd_at,
)
from stepkit.augment import normalize, random_resized_crop, to_unit
from stepkit.check import fail, integer_at_least
from stepkit.checkpoint import maybe_save, resume, save_last
from stepkit.data import ImageFolder, ResumableSampler, digits_canvas, image_folders
from stepkit.log import LogConfig, Logger
from stepkit.masking import MultiBlock, mask_image, multi_block_masks
from stepkit.models import VisionTransformer
from stepkit.models.jepa import JEPAPredictor, jepa_targets, pooled_patches
from stepkit.monitor import collapse_metrics
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
from stepkit.tools import TuneConfig, knn_accuracy, tune


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
    arch: Literal["vit-toy", "vit-tiny", "vit-small", "vit-base", "vit-huge"] = "vit-toy"
    patch_size: int = 0
    """ViT patch size (0: the preset's)."""
    pos_embed: Literal["learned", "sincos"] = "learned"
    """Encoder and predictor positions: learned, or I-JEPA's fixed 2-D sine-cosine (the vit-h14
    preset). On the tiny default, fixed positions ended with position-dominated features (held-out
    effective rank 2.6 vs 7.2, k-NN 0.231 vs 0.265)."""
    predictor_dim: int = 64
    predictor_depth: int = 2
    predictor_heads: int = 4
    grad_checkpointing: bool = False
    """Recompute each encoder block in the backward pass instead of storing its activations (less
    memory, about one more forward; the same gradients)."""

    def __post_init__(self) -> None:
        integer_at_least("predictor_dim", self.predictor_dim, 1)
        integer_at_least("predictor_depth", self.predictor_depth, 1)


@dataclass
class Loss:
    kind: Literal["smooth_l1", "mse"] = "smooth_l1"


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    wd: float = 0.04
    wd_final: float | None = 0.4
    clip: float | None = 1.0


@dataclass
class Eval:
    pool: int = 2
    """k-NN features: the target encoder's patch tokens averaged over a pool x pool grid."""
    k: int = 20
    temperature: float = 0.07


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
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500))
    optim: Optim = field(default_factory=Optim)
    ema: MomentumSchedule = field(
        default_factory=lambda: MomentumSchedule(momentum=0.99, momentum_final=0.999))
    eval: Eval = field(default_factory=Eval)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    mask_image_every: int = 250
    """Updates between two pictures of the masks in TensorBoard / wandb (0: never)."""
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=250, keep_best=0))
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 1)
        integer_at_least("mask_image_every", self.mask_image_every, 0)
        if self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


PRESETS = {
    "tiny-cpu": ("The CPU default: a toy ViT on the embedded digits.", Config()),
    "vit-h14": (
        "The paper's ViT-H/14 settings (I-JEPA, Assran et al. 2023): 300 epochs of ImageNet at batch 2048.",
        Config(
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
        ),
    ),
}


def build_encoder(cfg: Config, in_chans: int) -> VisionTransformer:
    preset = cfg.model.arch.removeprefix("vit-")
    overrides = {"patch_size": cfg.model.patch_size} if cfg.model.patch_size else {}
    overrides["pos_embed"] = cfg.model.pos_embed
    if preset == "huge":
        preset, overrides = "base", {"dim": 1280, "depth": 32, "heads": 16, **overrides}
    return VisionTransformer.preset(preset, img_size=cfg.data.image_size, in_chans=in_chans,
                                    grad_checkpointing=cfg.model.grad_checkpointing, **overrides)


class JEPA(nn.Module):
    """Context encoder + predictor (what trains); ``forward(images, context_idx, target_idx)``."""

    def __init__(self, encoder: VisionTransformer, predictor: JEPAPredictor) -> None:
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images, context_idx, target_idx):
        context = self.encoder(images, keep=context_idx, all_tokens=True)[:, 1:]  # only the context patches
        return self.predictor(context, context_idx, target_idx)


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
    predictor = JEPAPredictor(encoder.grid**2, encoder.dim, cfg.model.predictor_dim,
                              cfg.model.predictor_depth, cfg.model.predictor_heads,
                              pos_embed=cfg.model.pos_embed)
    model = JEPA(encoder, predictor).to(device)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False).to(device)
    prep = lambda x: normalize(to_unit(x.to(device)), mean, std)  # noqa: E731

    def loader(dataset, **kw) -> DataLoader:
        workers = cfg.data.workers if isinstance(dataset, ImageFolder) else 0
        return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers,
                          generator=torch.Generator().manual_seed(cfg.train.seed), **kw)

    @torch.no_grad()
    def knn(features) -> float:
        def embed(dataset):
            out = [(features(prep(x)).float().cpu(), y) for x, y in loader(dataset)]
            return torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])

        (train_f, train_y), (test_f, test_y) = embed(train_set), embed(test_set)
        return knn_accuracy(train_f, train_y, test_f, test_y, k=cfg.eval.k, temperature=cfg.eval.temperature)

    def encoder_knn(net: VisionTransformer) -> float:
        was_training = net.training
        net.eval()
        acc = knn(lambda x: pooled_patches(net, x, cfg.eval.pool))
        net.train(was_training)
        return acc

    knn_random_init = encoder_knn(target_encoder)
    wrapped = dist.parallelize(model, cfg.dist.strategy, device,
                               shard=lambda m: [*m.encoder.blocks, m.encoder, *m.predictor.blocks])
    target_encoder = dist.parallelize(target_encoder, cfg.dist.strategy, device,
                                      shard=lambda m: list(m.blocks))
    if dist.world_size() > 1:
        seed_everything(cfg.train.seed + dist.rank())
    state = TrainState(model=wrapped, optimizer=torch.optim.AdamW(param_groups(model)), target=target_encoder,
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

    def make_batch(images: torch.Tensor):
        images = random_resized_crop(prep(images), cfg.data.image_size, scale=cfg.data.crop_scale)
        context_idx, target_idx = multi_block_masks(len(images), grid, cfg.mask, mask_rng)
        return images, context_idx.to(device), target_idx.to(device)

    def loss_fn(state: TrainState, batch):
        images, context_idx, target_idx = batch
        with torch.no_grad():
            targets = jepa_targets(state.target(images, all_tokens=True)[:, 1:], target_idx)
        pred = state.model(images, context_idx, target_idx)
        if cfg.loss.kind == "smooth_l1":
            loss = F.smooth_l1_loss(pred.float(), targets.float())
        else:
            loss = F.mse_loss(pred.float(), targets.float())
        d = targets.shape[-1]
        aux = {**collapse_metrics(targets.reshape(-1, d)[:1024], "target_"),
               **collapse_metrics(pred.reshape(-1, d)[:1024], "pred_"),
               "context_patches": float(context_idx.shape[1])}
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
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps))
            momentum = momentum_at(state.step, cfg.ema, steps)
            ema_update(state.target, model.encoder, momentum)
            log({"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "momentum": momentum},
                step=state.step)
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

    with torch.no_grad():  # collapse check on held-out images: the target encoder's pooled features
        probe = torch.stack([test_set[i][0] for i in range(min(256, len(test_set)))])
        target_encoder.eval()
        final = collapse_metrics(pooled_patches(target_encoder, prep(probe), 1), "")
        target_encoder.train()
    summary = {
        "steps": state.step,
        "skipped_unreadable": len(getattr(train_set, "skipped", [])) + len(getattr(test_set, "skipped", [])),
        "wall_s": round(train_s, 3),
        "knn_acc": encoder_knn(target_encoder),
        "knn_acc_context_encoder": encoder_knn(model.encoder),
        "knn_acc_random_init": knn_random_init,
        "knn_acc_pixels": knn(nn.Flatten()),
        "effective_rank": float(final["effective_rank"]),
        "feature_std": float(final["std"]),
        "params_digest": params_digest(model),
        "ranks": dist.world_size(),
        "run_id": state.run_id,
    }
    log.write({k: v for k, v in summary.items() if k.startswith("knn")}, state.step)
    log.close()
    write_summary(cfg.run_dir, summary)
    main_process = dist.is_main()
    dist.shutdown()
    if main_process:
        print(f"k-NN accuracy: trained {summary['knn_acc']:.3f} (context encoder "
              f"{summary['knn_acc_context_encoder']:.3f}), untrained {knn_random_init:.3f}, pixels "
              f"{summary['knn_acc_pixels']:.3f}; effective rank {summary['effective_rank']:.1f}; "
              f"summary in {cfg.run_dir / 'summary.json'}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

"""DINO: self-distillation with no labels, a student matching an EMA teacher across multi-crop views.

    python recipes/dino.py --run-dir runs/dino                     # embedded digits, CPU, minutes
    python recipes/dino.py --run-dir runs/dino --optim.lr 1e-3
    python recipes/dino.py --data.root ~/photos --eval.train-root L --eval.val-root V   # your images
    python recipes/dino.py --data.shards 'data/{0000..0127}.tar'   # WebDataset shards, resumable
    python recipes/dino.py --init.from runs/dino --run-dir runs/d2 # start from a run's teacher
    python recipes/dino.py vit-s16 --run-dir runs/s16 --data.root /data/imagenet/train   # GPU, paper
    python recipes/dino.py vit-s16 --compile reduce-overhead ...   # compiled, as CUDA graphs
    python recipes/dino.py --help

The student (backbone + DINO head) sees 2 global and N local crops; the
teacher, an exponential moving average of the student, sees the global
ones; the loss is the cross-entropy between the teacher's sharpened,
centred (or Sinkhorn-Knopp balanced) distribution and the student's, over
every pair of different views. The run ends with a k-NN evaluation of the
frozen backbone on held-out images, beside the same architecture untrained
and raw pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from stepkit import dist
from stepkit.augment import MultiCrop, normalize, to_unit, view_colors
from stepkit.check import fail, integer_at_least
from stepkit.cli import cli, run_main
from stepkit.config import Amp, CkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import (
    CropPlan,
    ImageDataConfig,
    ImageSets,
    ProbeImagesConfig,
    image_sets,
    random_images,
    seeded_loader,
    train_batches,
)
from stepkit.ema import ema_update, target_copy
from stepkit.evaluation import knn_accuracy, loader_features
from stepkit.log import LogConfig
from stepkit.losses.dino import (
    DINOLossConfig,
    dino_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax,
    teacher_temp_at,
    update_center,
)
from stepkit.models import DINOHead, DINOModel, SmallCNN, VisionTransformer, cancel_last_layer_gradients
from stepkit.monitor import DistillationAlarm, collapse_metrics, mean_entropy
from stepkit.online_probe import OnlineProbe
from stepkit.probe import ProbeRecord
from stepkit.run import Run, params_digest, pick_device, seed_everything, set_threads
from stepkit.schedules import (
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    lr_at,
    momentum_at,
    param_groups,
    scaled_lr,
    wd_at,
)
from stepkit.seeds import seed_of
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss
from stepkit.tuning import TuneConfig, tune
from stepkit.weights import InitConfig, describe_part


@dataclass
class Data(ImageDataConfig):  # root, shards, seed, workers, skip_unreadable
    image_size: int = 32
    """Embedded digits, --data.synthetic: the images' side. Image files: the evaluation images' shorter
    side before their centre crop of crops.global_size (training crops come from the full image)."""
    synthetic: int = 0
    """N random images of image_size instead of a data set (for speed runs: the labels are random,
    so k-NN accuracy means nothing; 0: off)."""
    prefetch: Literal["auto", "on", "off"] = may_change_on_resume("auto")
    """Prepare the next batch's crops while the step runs (on CUDA a side stream; auto: on CUDA only).
    Checkpoints keep the RNG as of the consumed batch, so resume stays exact."""

    def __post_init__(self) -> None:
        super().__post_init__()
        integer_at_least("image_size", self.image_size, 8)
        integer_at_least("synthetic", self.synthetic, 0)
        if self.synthetic and (self.root is not None or self.shards is not None):
            fail("synthetic", self.synthetic, "0 with --data.root or --data.shards (one source of images)")


@dataclass
class Model:
    arch: Literal["cnn", "vit-toy", "vit-tiny", "vit-small", "vit-base"] = "cnn"
    cnn_widths: tuple[int, ...] = (32, 64, 128)
    """CNN channels per stage (the first at stride 1, then stride 2)."""
    cnn_pool: int = 4
    """CNN output: average-pooled to a pool x pool grid and flattened. A 4 x 4 grid keeps the
    coarse layout that tells digits apart (global pooling, 1, lost it: k-NN 0.41 instead of 0.67)."""
    channels_last: bool = True
    """CNN weights (so its activations) in channels-last layout: oneDNN's and cuDNN's faster kernels
    (forward and backward ~20 % faster on 2 CPU cores); the numbers differ from torch's default by rounding.
    Not under --dist.strategy fsdp (FSDP2 shards contiguous parameters only)."""
    patch_size: int = 0
    """ViT patch size (0: the preset's)."""
    drop_path: float = 0.1
    out_dim: int = 128
    """Prototypes of the DINO head."""
    head_hidden: int = 512
    bottleneck: int = 64
    head_batch_norm: bool = True
    norm_last_layer: bool = True
    freeze_last_layer_steps: int = 0
    grad_checkpointing: bool = False
    """ViT only: recompute each block in the backward pass instead of storing its activations (less
    memory, about one more forward; the same gradients)."""
    weight_init: Literal["stepkit", "dino"] = "stepkit"
    """dino: DINO's initialisation (a ViT's patch embedding at PyTorch's Conv2d default, the head's last
    layer at nn.Linear's; the vit-s16 preset); stepkit: truncated normals there (the measured CPU
    numbers)."""

    def __post_init__(self) -> None:
        if self.grad_checkpointing and self.arch == "cnn":
            fail("grad_checkpointing", True, "a ViT arch (--model.arch vit-...): the CNN has no blocks")
        integer_at_least("out_dim", self.out_dim, 2)
        integer_at_least("head_hidden", self.head_hidden, 1)
        integer_at_least("bottleneck", self.bottleneck, 1)
        integer_at_least("freeze_last_layer_steps", self.freeze_last_layer_steps, 0)


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 3e-3
    min_lr: float = 1e-5
    warmup_steps: int | None = None
    """Updates of linear warm-up; None: 30, or a tenth of --train.steps when that is shorter."""
    default_warmup: ClassVar[int] = 30
    wd: float = 0.04
    wd_final: float | None = 0.4
    clip: float | None = 3.0
    """Largest global gradient norm (None: no clipping)."""
    clip_per_param: float | None = None
    """Largest gradient norm of each parameter on its own, as DINO clips (None: off)."""
    lr_per_batch: int | None = None
    """--optim.lr is for this many images per update: the run uses lr x (batch-size x ranks x accum) /
    lr-per-batch, DINO's linear scaling rule with 256 (None: --optim.lr as it is)."""


@dataclass
class Eval(ProbeImagesConfig):  # k, temperature, train_root, val_root
    every: int = may_change_on_resume(0)
    """Updates between k-NN evaluations during training (0: only at the end)."""
    knn: bool = may_change_on_resume(True)
    """The k-NN evaluations before and after training (--eval.no-knn: none, e.g. for speed runs)."""


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/dino")
    init: InitConfig = field(default_factory=InitConfig)
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    compile: Literal["none", "default", "reduce-overhead"] = may_change_on_resume("none")
    """torch.compile the student's and the teacher's forward (backward too); "reduce-overhead" also
    replays them as CUDA graphs (on CUDA; the GPU benchmark's fastest loop)."""
    batch_size: int = 64
    """Images per update on each rank (under torchrun the global batch is this x ranks)."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    crops: MultiCrop = field(
        # no solarisation: it erases the white strokes of the embedded digits
        default_factory=lambda: MultiCrop(global_size=32, local_size=16, local_crops=4,
                                          global_scale=(0.4, 1.0), local_scale=(0.1, 0.4), solarize_p=0.0,
                                          blur_relative=True)
    )
    loss: DINOLossConfig = field(default_factory=DINOLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500))
    optim: Optim = field(default_factory=Optim)
    # Not DINO's cosine to 1.0: in a run this short a teacher frozen for the last few hundred
    # steps lags the student (teacher k-NN, seeds 1 and 2: 0.621 / 0.627 ending at 1.0, 0.641 / 0.671
    # ending at 0.996).
    ema: MomentumSchedule = field(
        default_factory=lambda: MomentumSchedule(momentum=0.99, momentum_final=0.996))
    eval: Eval = field(default_factory=Eval)
    alarm: DistillationAlarm = field(default_factory=DistillationAlarm)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=100))
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 2)
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


# DINO's vanilla ViT-S/16 run (Caron et al. 2021; facebookresearch/dino main_dino.py defaults: 100 epochs
# of ImageNet, 64 images per GPU on 8 GPUs, lr 5e-4 x global batch / 256, teacher temperature 0.04, the
# last layer weight-normalised and frozen for the first epoch, per-parameter clipping at 3.0; k-NN 69.3%).
# An epoch is 2,502 updates at that global batch of 512. bf16 instead of fp16 (docs/recipes/dino.md).
PRESETS = {
    "tiny-cpu": (
        "The CPU default: a small CNN on the embedded digits, Sinkhorn-Knopp targets and KoLeo.",
        Config(),
    ),
    "vit-s16": (
        "DINO's vanilla ViT-S/16 run: 100 ImageNet epochs, 64 images per rank on 8 ranks "
        "(torchrun --nproc_per_node=8), lr 5e-4 x 512/256.",
        Config(
            device="cuda", amp="bf16", batch_size=64,
            data=Data(image_size=256),
            model=Model(arch="vit-small", drop_path=0.1, out_dim=65536, head_hidden=2048, bottleneck=256,
                        head_batch_norm=False, norm_last_layer=True, freeze_last_layer_steps=2502,
                        weight_init="dino"),
            crops=MultiCrop(global_size=224, local_size=96, local_crops=8),
            loss=DINOLossConfig(targets="centering", teacher_temp=0.04, warmup_teacher_temp=0.04,
                      teacher_temp_warmup_steps=0, koleo_weight=0.0),
            train=TrainConfig(steps=250200),
            optim=Optim(lr=5e-4, lr_per_batch=256, min_lr=1e-6, warmup_steps=25020, wd=0.04,
                        wd_final=0.4, clip=None, clip_per_param=3.0),
            ema=MomentumSchedule(momentum=0.996, momentum_final=1.0),
            log=LogConfig(every=50),
            ckpt=CkptConfig(every=2502),
        ),
    ),
}


def build_model(cfg: Config, in_chans: int) -> DINOModel:
    """The student: a backbone (the small CNN or a ViT) and DINO's projection head over its features."""
    m = cfg.model
    if m.arch == "cnn":
        backbone: nn.Module = SmallCNN(in_chans, m.cnn_widths, m.cnn_pool)
        if m.channels_last and cfg.dist.strategy != "fsdp":  # FSDP2 shards contiguous parameters only
            backbone = backbone.to(memory_format=torch.channels_last)
    else:
        overrides = {"patch_size": m.patch_size} if m.patch_size else {}
        backbone = VisionTransformer.preset(m.arch.removeprefix("vit-"), img_size=cfg.crops.global_size,
                                            in_chans=in_chans, drop_path=m.drop_path, init=m.weight_init,
                                            grad_checkpointing=m.grad_checkpointing, **overrides)
    head = DINOHead(backbone.dim, m.out_dim, hidden=m.head_hidden, bottleneck=m.bottleneck,
                    batch_norm=m.head_batch_norm, norm_last_layer=m.norm_last_layer,
                    last_layer_init=m.weight_init)
    return DINOModel(backbone, head)


def load_images(cfg: Config, plan: CropPlan) -> ImageSets:
    """The training images and the k-NN probe's labelled ones: image files (crops cut from the full image in
    DataLoader workers), shards, the digits, or --data.synthetic random images (only speed means anything)."""
    need = cfg.eval.k if cfg.eval.knn else 1
    if cfg.data.synthetic:
        return random_images(cfg.data.synthetic, cfg.data.image_size, seed=cfg.data.seed,
                             min_probe_images=need)
    return image_sets(cfg.data, cfg.eval, plan=plan, seed=cfg.train.seed, eval_size=cfg.crops.global_size,
                      eval_resize=cfg.data.image_size, digits_size=cfg.data.image_size, min_probe_images=need)


def describe_parts(cfg: Config, backbone: nn.Module, data: ImageSets) -> dict:
    """The teacher's and the student's backbones as checkpoints describe them (stepkit export / eval)."""
    size = cfg.crops.global_size if data.files else cfg.data.image_size
    facts = {"input": {"kind": "image", "size": size, "channels": data.channels, "mean": data.mean,
                       "std": data.std},
             "features": "the class token (ViT) or pooled grid (CNN), (B, dim): what the k-NN probe uses"}
    # what `stepkit eval` reproduces; a change to main's evaluation changes it too
    probe = ProbeRecord("forward", k=cfg.eval.k, temperature=cfg.eval.temperature, linear=False,
                        batch_size=cfg.batch_size, seed=cfg.train.seed, data=data.probe_data).as_dict()
    return {"teacher": describe_part(backbone, source="target", prefix="backbone.", **facts, probe=probe,
                                     about="the EMA teacher's backbone (what DINO evaluates)"),
            "student": describe_part(backbone, source="model", prefix="backbone.", **facts, probe=probe,
                                     about="the student's backbone")}


def dino_objective(cfg: Config, student: nn.Module, teacher: nn.Module, state: TrainState,
                   views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """DINO's loss of a batch's views: the student's distributions over every view against the teacher's
    sharpened, centred (or Sinkhorn-Knopp) targets of the global ones, plus KoLeo on the global features."""
    features, student_out = student(views)
    with torch.no_grad():
        _, teacher_out = teacher(views[:2])
    temp = teacher_temp_at(state.step, warmup_temp=cfg.loss.warmup_teacher_temp,
                           temp=cfg.loss.teacher_temp, warmup_steps=cfg.loss.teacher_temp_warmup_steps)
    if cfg.loss.targets == "sinkhorn":
        targets = sinkhorn_knopp(teacher_out, temp)
    else:
        targets = teacher_softmax(teacher_out, state.extras["center"], temp)
        update_center(state.extras["center"], teacher_out, cfg.loss.center_momentum)
    distill = dino_loss(student_out, targets, student_temp=cfg.loss.student_temp, n_student_views=len(views))
    n_global = 2 * len(views[0])
    koleo = sum(koleo_loss(f) for f in features[:n_global].chunk(2)) / 2
    student_p = torch.softmax(student_out[:n_global].float() / cfg.loss.student_temp, dim=-1)
    aux = {"dino": distill, "koleo": koleo, "teacher_entropy": mean_entropy(targets),
           "student_entropy": mean_entropy(student_p), **collapse_metrics(features[:n_global], "feat_")}
    return distill + cfg.loss.koleo_weight * koleo, aux


def lr_schedule(cfg: Config) -> Optim:
    """--optim, with --optim.lr-per-batch's lr scaled to this run's global batch (DINO's linear rule)."""
    if not cfg.optim.lr_per_batch:
        return cfg.optim
    images = cfg.batch_size * dist.world_size() * cfg.train.accum
    schedule = dataclasses.replace(cfg.optim, lr=scaled_lr(cfg.optim.lr, images, cfg.optim.lr_per_batch))
    if dist.is_main():
        print(f"lr {cfg.optim.lr:g} x {images} images per update / {cfg.optim.lr_per_batch} = "
              f"{schedule.lr:g} (--optim.lr-per-batch)", flush=True)
    return schedule


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)  # torchrun: join the group, one device each
    c = cfg.crops  # 2 global views, then the local ones
    plan = CropPlan(views=((c.global_size, c.global_scale),) * 2
                    + ((c.local_size, c.local_scale),) * c.local_crops)
    data = load_images(cfg, plan)
    shards, mean, std = data.shards, data.mean, data.std
    workers = cfg.data.workers if data.files else 0  # tensors in memory are read by the main process
    set_threads(cfg.threads, device=device, workers=workers)  # the workers take cores from the model
    evaluate = cfg.eval.knn and data.probe is not None
    if cfg.tune.measures and shards is not None:
        fail("data.shards", cfg.data.shards, "None with --tune.* (tune on a folder of them: --data.root)")

    seed_everything(cfg.train.seed)
    model = build_model(cfg, data.channels)
    backbone = model.backbone
    init = cfg.init.load_into(backbone, part="teacher") if not cfg.resuming else None  # weights only
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    if init and dist.is_main():
        print(init.line(), flush=True)
    parts = describe_parts(cfg, backbone, data)  # what each checkpoint says of its backbones
    model = model.to(device)

    def augment(view: torch.Tensor, i: int) -> torch.Tensor:
        """View ``i`` of a batch (0, 1: global; 2...: local), cropped, in [0, 1], on the device -> what the
        networks see. Every source's views pass here: the place for an augmentation of your own."""
        return normalize(view_colors(view, cfg.crops, i), mean, std)

    def prepare(batch) -> list[torch.Tensor]:
        """A loader's batch -> its views, cut in the workers (files, shards) or here (memory), augmented."""
        return [augment(view, i) for i, view in enumerate(data.crops(batch, plan, device))]

    def loader(dataset, **kw) -> DataLoader:  # seeded apart from the global RNG; workers ignore SIGTERM
        return seeded_loader(dataset, seed=cfg.train.seed, workers=workers,
                             timeout=cfg.data.timeout, batch_size=cfg.batch_size,
                             pin_memory=device.type == "cuda", **kw)

    probe_prep = lambda x: normalize(to_unit(x).to(device), mean, std)  # noqa: E731  the probes' images

    def knn(net: nn.Module) -> float:  # the frozen net's features of the labelled images, eval mode
        fit, held = (loader_features(net, loader(d), probe_prep) for d in (data.probe, data.test))
        return knn_accuracy(*fit, *held, k=cfg.eval.k, temperature=cfg.eval.temperature)

    knn_start = knn(backbone) if evaluate else None  # same architecture and seed, untrained (or --init)
    teacher = target_copy(model)  # no stochastic depth: DINO's teacher is deterministic
    # Under torchrun: DDP, or FSDP2 with the backbone's blocks, the backbone and the head sharded on
    # their own (so evaluation can call the backbone alone); the teacher sharded the same way.
    shard = lambda m: [*getattr(m.backbone, "blocks", []), m.backbone, m.head]  # noqa: E731
    dtype = torch.bfloat16 if cfg.amp == "bf16" else None
    wrapped = dist.parallelize(model, cfg.dist.strategy, device, shard=shard, param_dtype=dtype)
    teacher = dist.parallelize(teacher, cfg.dist.strategy, device, shard=shard, param_dtype=dtype)
    if dist.world_size() > 1:  # the same initial weights everywhere; each rank its own crops
        seed_everything(seed_of(cfg.train.seed, "rank", dist.rank()))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    state = TrainState(model=wrapped, optimizer=adamw(param_groups(model), device=device),  # fused
                       target=teacher, scaler=scaler, accum=cfg.train.accum,
                       extras={"center": torch.zeros(1, cfg.model.out_dim, device=device)})
    steps, schedule = cfg.train.steps, lr_schedule(cfg)  # --optim.lr-per-batch: scaled to the global batch
    mode = None if cfg.compile == "default" else cfg.compile
    run_student = wrapped if cfg.compile == "none" else torch.compile(wrapped, mode=mode)
    run_teacher = teacher if cfg.compile == "none" else torch.compile(teacher, mode=mode)
    loss_fn = partial(dino_objective, cfg, run_student, run_teacher)  # (state, views) -> (loss, aux)
    probe = OnlineProbe(data.probe, features=teacher.backbone, prep=probe_prep, state=state,  # the teacher's
                        seed=cfg.train.seed, enabled=cfg.eval.online)

    if cfg.tune.measures:  # measure instead of training: no run, no checkpoint, no log
        def make_batch(size: int) -> list[torch.Tensor]:  # files: epoch 0's crops
            idx = torch.randint(0, len(data.train), (size,)).tolist()
            return prepare(default_collate([data.train[i] for i in idx]))
        return tune(cfg.tune, cfg.run_dir, loss_fn, state, make_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    # An epoch-seeded order, or each shard reader's place, continued from the checkpoint; each batch
    # counted in the state as consumed, with the global RNG (colours, crops) as of it, prefetched or not.
    prefetch = cfg.data.prefetch == "on" or (cfg.data.prefetch == "auto" and device.type == "cuda")
    batches = train_batches(data.train, state, seed=cfg.train.seed, batch_size=cfg.batch_size,
                            workers=workers, shards=shards, skip_unreadable=cfg.data.skip_unreadable,
                            timeout=cfg.data.timeout, prepare=prepare, prefetch=prefetch, device=device,
                            pin_memory=device.type == "cuda")
    watch = cfg.alarm.watch(cfg.model.out_dim)  # the teacher's uniform collapse, the features' dimensional
    with run.start(state, steps=steps, meta={"parts": parts}):  # resumed when asked; log; signals
        for views in run.batches(batches):  # saved between updates; ends at the last step or a signal
            if cfg.compile == "reduce-overhead":  # the graphs' outputs of the last step may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            loss, aux = forward_loss(loss_fn, state, views, amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            cancel_last_layer_gradients(model.head, state.step, cfg.model.freeze_last_layer_steps)
            grad_norm = clip(state, max_norm=cfg.optim.clip, max_norm_per_param=cfg.optim.clip_per_param)
            lr = lr_at(state.step, schedule, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps))
            momentum = momentum_at(state.step, cfg.ema, steps)
            ema_update(state.target, state.model, momentum)
            terms = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "momentum": momentum,
                     **probe.update(state.step)}  # online_train_acc
            means = run.after_update(terms)  # NaN watch (exit 65 after a storm), log
            watch.report(means, run.log, state.step)  # a new collapse warning: printed and logged
            if evaluate and cfg.eval.every and state.step % cfg.eval.every == 0:
                run.log.write({"knn_acc": knn(teacher.backbone), "knn_acc_student": knn(model.backbone)},
                              state.step)

    images_per_update = cfg.batch_size * dist.world_size() * cfg.train.accum
    summary = run.summary(  # knn_acc is the teacher's, as DINO evaluates it; the student's is beside it
        images_per_s=round(images_per_update * run.updates_per_s, 1), skipped_unreadable=data.skipped,
        params_digest=params_digest(model), collapse_warning=watch.last,
        **({"init": init.as_dict()} if init else {}), **probe.summary(data.test))  # online_acc: held out
    if evaluate:  # the raw pixels: the same images, unlearned, the bar to clear
        summary.update({"knn_acc": knn(teacher.backbone), "knn_acc_student": knn(model.backbone),
                        ("knn_acc_init" if init else "knn_acc_random_init"): knn_start,
                        "knn_acc_pixels": knn(nn.Flatten())})
    if cfg.dist.strategy == "ddp":  # every replica must hold the same parameters (buffers differ:
        weights = dict(model.named_parameters())  # each rank's last BatchNorm statistics are its own)
        summary["replicas_identical"] = dist.same_on_all_ranks(params_digest(weights))
    run.log.write({k: v for k, v in summary.items() if k.startswith(("knn", "online"))}, state.step)
    if not run.finish(summary):  # summary.json written; only rank 0 prints
        return summary
    where = f"summary in {cfg.run_dir / 'summary.json'}"
    print(f"k-NN accuracy: trained {summary['knn_acc']:.3f} (student {summary['knn_acc_student']:.3f}), "
          f"{'at init' if init else 'untrained'} {knn_start:.3f}, pixels {summary['knn_acc_pixels']:.3f}; "
          f"{where}" if evaluate else f"{summary['images_per_s']} images/s; {where}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

"""DINOv2: DINO's self-distillation plus iBOT's masked-patch prediction, a ViT with registers, LayerScale.

    python recipes/dinov2.py --run-dir runs/dinov2                 # a toy ViT on the embedded digits, CPU
    python recipes/dinov2.py vitl16-short --data.root /data/imagenet/train   # the official default, GPUs
    python recipes/dinov2.py vitl14 --data.root /data/imagenet22k  # the released ViT-L/14's run
    python recipes/dinov2.py --init.from released.safetensors --continued.head-warmup-steps 500

The student sees 2 global crops (some patches swapped for a mask token) and N local ones; the teacher,
an EMA of the student, sees the global crops whole. DINO's loss matches class tokens across views, iBOT's
each masked patch to the teacher's view of it, KoLeo spreads the global features. Released weights come
without heads: --continued.head-warmup-steps trains fresh heads on the frozen backbone first, then sets the
teacher to the student; --continued.backbone-lr and --continued.anchor keep the backbone near its start. An
online linear probe is logged; the run ends with a k-NN evaluation of the frozen backbone on held-out images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stepkit import dist
from stepkit.augment import MultiCrop, normalize, to_unit, view_colors
from stepkit.check import at_least, fail, in_range, integer_at_least
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
from stepkit.ema import ema_copy, ema_update, target_copy
from stepkit.evaluation import knn_accuracy, loader_features
from stepkit.log import LogConfig
from stepkit.losses.dino import (
    DINOLossConfig,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax,
    teacher_temp_at,
    update_center,
    update_patch_center,
)
from stepkit.masking import ibot_masks
from stepkit.models import DINOHead, VisionTransformer, cancel_last_layer_gradients
from stepkit.monitor import DistillationAlarm, collapse_metrics, mean_entropy
from stepkit.online_probe import OnlineProbe
from stepkit.probe import ProbeRecord
from stepkit.run import Run, params_digest, pick_device, seed_everything, set_threads
from stepkit.schedules import (
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    layer_decay_scales,
    lr_at,
    momentum_at,
    no_decay_dinov2,
    param_groups,
    scaled_lr,
    vit_layer_id,
    wd_at,
)
from stepkit.seeds import seed_of
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss
from stepkit.weights import InitConfig, describe_part


@dataclass
class Data(ImageDataConfig):  # root, shards, seed, workers, skip_unreadable
    image_size: int = 32
    """The digits' side; image files: the probe images' shorter side before their centre crop."""
    prefetch: Literal["auto", "on", "off"] = may_change_on_resume("auto")
    """Prepare the next batch's crops and masks while the step runs (auto: on CUDA only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        integer_at_least("image_size", self.image_size, 8)


@dataclass
class Model:
    arch: Literal["vit-toy", "vit-tiny", "vit-small", "vit-base", "vit-large"] = "vit-toy"
    patch_size: int = 0  # 0: the arch's
    registers: int = 4  # register tokens (Darcet et al. 2024; the released *_reg4 models: 4)
    layer_scale: float = 1.0
    """LayerScale's initial value (DINOv2: 1e-5; a toy ViT's few hundred updates need 1)."""
    ffn: Literal["mlp", "swiglu"] = "mlp"
    drop_path: float = 0.1
    drop_path_uniform: bool = True  # every block at --model.drop-path (DINOv2), not rising linearly to it
    out_dim: int = 128  # prototypes of the DINO head (and of iBOT's, when shared)
    head_hidden: int = 512
    bottleneck: int = 64
    head_batch_norm: bool = True  # BatchNorm in the heads (DINOv2's use_bn, off in its configs; toys need it)
    separate_ibot_head: bool = False  # iBOT's own head for the patches (vitl14) instead of DINO's
    ibot_out_dim: int = 128
    ibot_bottleneck: int = 64
    freeze_last_layer_steps: int = 0
    grad_checkpointing: bool = False  # recompute each block in the backward pass: less memory

    def __post_init__(self) -> None:
        for name in ("out_dim", "ibot_out_dim"):
            integer_at_least(name, getattr(self, name), 2)
        integer_at_least("registers", self.registers, 0)
        integer_at_least("freeze_last_layer_steps", self.freeze_last_layer_steps, 0)


@dataclass
class IBOT:
    weight: float = 1.0  # iBOT's masked-patch loss beside DINO's (0: DINO alone)
    mask_probability: float = 0.5  # the share of global crops that are masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # a masked crop's share of masked patches, stratified
    center_momentum: float = 0.9

    def __post_init__(self) -> None:
        at_least("weight", self.weight, 0.0)
        in_range("mask_probability", self.mask_probability, 0.0, 1.0)
        if not 0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1:
            fail("ibot.mask_ratio", self.mask_ratio, "(low, high) with 0 <= low <= high <= 1")


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int | None = None  # linear warm-up's updates; None: 30, or a tenth of --train.steps if less
    default_warmup: ClassVar[int] = 30
    wd: float = 0.04
    wd_final: float | None = 0.4
    clip: float | None = 3.0
    lr_per_batch: int | None = None
    """--optim.lr is for this many images per update; the run scales it to its global batch by
    --optim.lr-rule (DINOv2: 1024, sqrt; None: --optim.lr as it is)."""
    lr_rule: Literal["linear", "sqrt"] = "sqrt"
    layer_decay: float = 1.0  # block i of L at decay ** (L - i), embeddings ** (L + 1) (DINOv2: 0.9)
    patch_embed_lr: float = 1.0  # the patch embedding's lr factor (DINOv2: 0.2)


@dataclass
class Continued:
    head_warmup_steps: int = 0  # updates of fresh heads on the frozen backbone; then teacher = student
    backbone_lr: float = 1.0  # the backbone's lr as a factor of --optim.lr (a released backbone: e.g. 0.1)
    anchor: float = 0.0  # L2-SP, decoupled: each update also does w -= lr * anchor * (w - w_start); 0: off

    def __post_init__(self) -> None:
        integer_at_least("head_warmup_steps", self.head_warmup_steps, 0)
        at_least("backbone_lr", self.backbone_lr, 0.0), at_least("anchor", self.anchor, 0.0)


@dataclass
class Eval(ProbeImagesConfig):  # k, temperature, train_root, val_root
    every: int = may_change_on_resume(0)  # updates between k-NN evaluations while training (0: at the end)


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/dinov2")
    init: InitConfig = field(default_factory=InitConfig)
    continued: Continued = field(default_factory=Continued)
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 64
    """Images per update on each rank (under torchrun the global batch is this x ranks)."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    crops: MultiCrop = field(  # no solarisation: it erases the white strokes of the embedded digits
        default_factory=lambda: MultiCrop(global_size=32, local_size=16, local_crops=4, solarize_p=0.0,
                                          global_scale=(0.4, 1.0), local_scale=(0.1, 0.4),
                                          blur_relative=True))
    loss: DINOLossConfig = field(default_factory=lambda: DINOLossConfig(koleo_weight=0.1))
    ibot: IBOT = field(default_factory=IBOT)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400))
    optim: Optim = field(default_factory=Optim)
    ema: MomentumSchedule = field(default_factory=lambda: MomentumSchedule(momentum=0.99,
                                                                           momentum_final=0.996))
    eval: Eval = field(default_factory=Eval)
    alarm: DistillationAlarm = field(default_factory=DistillationAlarm)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    ckpt: CkptConfig = field(default_factory=lambda: CkptConfig(every=100))
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 2)
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


def official(**changes) -> Config:
    """DINOv2's ssl_default_config.yaml (ViT-L/16, ImageNet-1k, 64 images per rank), with ``changes`` (a dict
    for a group's fields); an epoch is OFFICIAL_EPOCH_LENGTH = 1,250 updates whatever the ranks."""
    epoch = 1250
    cfg = Config(
        device="cuda", amp="bf16", batch_size=64, data=Data(image_size=256),
        model=Model(arch="vit-large", patch_size=16, registers=0, layer_scale=1e-5, ffn="mlp", drop_path=0.3,
                    drop_path_uniform=True, out_dim=65536, head_hidden=2048, bottleneck=256,
                    head_batch_norm=False, separate_ibot_head=False, ibot_out_dim=65536, ibot_bottleneck=256,
                    freeze_last_layer_steps=epoch),
        crops=MultiCrop(global_size=224, local_size=96, local_crops=8, global_scale=(0.32, 1.0),
                        local_scale=(0.05, 0.32)),
        loss=DINOLossConfig(targets="centering", teacher_temp=0.07, warmup_teacher_temp=0.04,
                            teacher_temp_warmup_steps=30 * epoch, koleo_weight=0.1),
        ibot=IBOT(weight=1.0, mask_probability=0.5, mask_ratio=(0.1, 0.5)),
        train=TrainConfig(steps=100 * epoch),
        optim=Optim(lr=4e-3, lr_per_batch=1024, lr_rule="sqrt", min_lr=1e-6, warmup_steps=10 * epoch,
                    wd=0.04, wd_final=0.4, clip=3.0, layer_decay=0.9, patch_embed_lr=0.2),
        ema=MomentumSchedule(momentum=0.992, momentum_final=1.0),
        log=LogConfig(every=50), ckpt=CkptConfig(every=epoch))
    nested = {k: dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict) else v
              for k, v in changes.items()}
    return dataclasses.replace(cfg, **nested)


PRESETS = {
    "tiny-cpu": ("The CPU default: a toy ViT with 4 registers on the embedded digits, DINO + iBOT + KoLeo.",
                 Config()),
    "vitl16-short": ("DINOv2's default (ssl_default_config.yaml, train/vitl16_short.yaml): ViT-L/16 on "
                     "ImageNet-1k, 100 epochs of 1,250 updates, lr 4e-3 x sqrt(global batch / 1024).",
                     official()),
    "vitl14": ("DINOv2's released ViT-L/14 run (train/vitl14.yaml): SwiGLU, iBOT's own head, "
               "Sinkhorn-Knopp, 131,072 prototypes, 32 images per rank, 500 epochs.",
               official(batch_size=32,
                        model=dict(patch_size=14, drop_path=0.4, ffn="swiglu", bottleneck=384, out_dim=131072,
                                   separate_ibot_head=True, ibot_out_dim=131072),
                        loss=dict(targets="sinkhorn"), train=dict(steps=500 * 1250),
                        optim=dict(lr=2e-4, warmup_steps=80 * 1250, wd_final=0.2, layer_decay=1.0),
                        ema=dict(momentum=0.994), crops=dict(local_size=98))),
}


class DINOv2Model(nn.Module):
    """A ViT, DINO's head over its class tokens and iBOT's over its masked patch tokens (DINO's own head
    unless ``patch_head`` is given): the student, and as an EMA copy the teacher."""

    def __init__(self, backbone: VisionTransformer, head: nn.Module, patch_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone, self.head, self.patch_head = backbone, head, patch_head

    def forward(self, global_views: Tensor, local_views: Tensor | None, masks: Tensor,
                masked_input: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(global class tokens, class logits of the global then the local views, logits of the patches
        ``masks`` marks); ``masked_input``: those patches enter as the mask token (the student)."""
        tokens = self.backbone(global_views, all_tokens=True, mask=masks if masked_input else None)
        cls, patches = tokens[:, 0], tokens[:, self.backbone.prefix:][masks]
        local = self.backbone(local_views) if local_views is not None else cls[:0]
        if self.patch_head is not None:
            return cls, self.head(torch.cat([cls, local])), self.patch_head(patches)
        out = self.head(torch.cat([cls, local, patches]))  # one pass through the shared head
        return cls, out[: len(cls) + len(local)], out[len(cls) + len(local):]


def build_model(cfg: Config, in_chans: int) -> DINOv2Model:
    """The student: a ViT with DINOv2's pieces (registers, LayerScale, a mask token), DINO's head, iBOT's."""
    m = cfg.model
    backbone = VisionTransformer.preset(
        m.arch.removeprefix("vit-"), img_size=cfg.crops.global_size, in_chans=in_chans, drop_path=m.drop_path,
        drop_path_uniform=m.drop_path_uniform, layer_scale=m.layer_scale, registers=m.registers, ffn=m.ffn,
        mask_token=True, pos_offset=0.1, init="dinov2", grad_checkpointing=m.grad_checkpointing,
        **({"patch_size": m.patch_size} if m.patch_size else {}))
    head = partial(DINOHead, backbone.dim, hidden=m.head_hidden, batch_norm=m.head_batch_norm,
                   norm_last_layer=False, last_layer_init="dino")  # DINOv2's: the last layer's scale trains
    patch_head = head(m.ibot_out_dim, bottleneck=m.ibot_bottleneck) if m.separate_ibot_head else None
    return DINOv2Model(backbone, head(m.out_dim, bottleneck=m.bottleneck), patch_head)


def optimizer_groups(cfg: Config, model: DINOv2Model) -> list[dict]:
    """DINOv2's parameter groups: layer-wise lr decay, the patch embedding's lr factor, no decay for
    biases, norms and LayerScale; the backbone's lr times --continued.backbone-lr."""
    depth = len(model.backbone.blocks)
    o, c = cfg.optim, cfg.continued
    return param_groups(
        model, no_weight_decay=no_decay_dinov2, layer_of=lambda name: vit_layer_id(name, depth),
        layer_scales=layer_decay_scales(depth, o.layer_decay),
        lr_scale_of=lambda name: ((o.patch_embed_lr if "patch_embed" in name else 1.0)
                                  * (c.backbone_lr if name.startswith("backbone.") else 1.0)))


def describe_parts(cfg: Config, backbone: nn.Module, data: ImageSets) -> dict:
    """The teacher's and the student's backbones as checkpoints describe them (stepkit export / eval)."""
    size = cfg.crops.global_size if data.files else cfg.data.image_size
    facts = {"features": "the class token, (B, dim): what the k-NN probe uses",
             "input": {"kind": "image", "size": size, "channels": data.channels, "mean": data.mean,
                       "std": data.std}}
    probe = ProbeRecord("forward", k=cfg.eval.k, temperature=cfg.eval.temperature, linear=False,
                        batch_size=cfg.batch_size, seed=cfg.train.seed, data=data.probe_data).as_dict()
    return {"teacher": describe_part(backbone, source="target", prefix="backbone.", **facts, probe=probe,
                                     about="the EMA teacher's backbone (what DINOv2 evaluates)"),
            "student": describe_part(backbone, source="model", prefix="backbone.", **facts, probe=probe,
                                     about="the student's backbone")}


def dinov2_objective(cfg: Config, student: nn.Module, teacher: nn.Module, state: TrainState,
                     batch: tuple[list[Tensor], Tensor]) -> tuple[Tensor, dict]:
    """DINOv2's loss: DINO's over the class tokens of every pair of different views, iBOT's over the masked
    patches, KoLeo over each global crop's class tokens (DINOv2's sum over the two)."""
    views, masks = batch
    global_views, local_views = torch.cat(views[:2]), (torch.cat(views[2:]) if len(views) > 2 else None)
    temp = teacher_temp_at(state.step, warmup_temp=cfg.loss.warmup_teacher_temp, temp=cfg.loss.teacher_temp,
                           warmup_steps=cfg.loss.teacher_temp_warmup_steps)
    with torch.no_grad():
        _, teacher_cls, teacher_patches = teacher(global_views, None, masks, masked_input=False)
    features, student_cls, student_patches = student(global_views, local_views, masks, masked_input=True)
    if cfg.loss.targets == "sinkhorn":
        targets, patch_targets = sinkhorn_knopp(teacher_cls, temp), sinkhorn_knopp(teacher_patches, temp)
    else:
        targets = teacher_softmax(teacher_cls, state.extras["center"], temp)
        patch_targets = teacher_softmax(teacher_patches, state.extras["patch_center"], temp)
        update_center(state.extras["center"], teacher_cls, cfg.loss.center_momentum)
        update_patch_center(state.extras["patch_center"], teacher_patches, cfg.ibot.center_momentum)
    distill = dino_loss(student_cls, targets, student_temp=cfg.loss.student_temp,
                        n_student_views=len(views))
    ibot = ibot_patch_loss(student_patches, patch_targets, masks, student_temp=cfg.loss.student_temp)
    koleo = sum(koleo_loss(f) for f in features.chunk(2))
    student_p = torch.softmax(student_cls[: len(features)].float() / cfg.loss.student_temp, dim=-1)
    aux = {"dino": distill, "ibot": ibot, "koleo": koleo, "teacher_entropy": mean_entropy(targets),
           "student_entropy": mean_entropy(student_p), **collapse_metrics(features, "feat_")}
    return distill + cfg.ibot.weight * ibot + cfg.loss.koleo_weight * koleo, aux


def lr_schedule(cfg: Config) -> Optim:
    """--optim, with --optim.lr-per-batch's lr scaled to this run's global batch by --optim.lr-rule."""
    if not cfg.optim.lr_per_batch:
        return cfg.optim
    images = cfg.batch_size * dist.world_size() * cfg.train.accum
    lr = scaled_lr(cfg.optim.lr, images, cfg.optim.lr_per_batch, rule=cfg.optim.lr_rule)
    if dist.is_main():
        print(f"lr {cfg.optim.lr:g} for {images} images per update: {lr:g} (--optim.lr-rule)", flush=True)
    return dataclasses.replace(cfg.optim, lr=lr)


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)  # torchrun: join the group, one device each
    c = cfg.crops  # 2 global views, then the local ones
    plan = CropPlan(views=((c.global_size, c.global_scale),) * 2
                    + ((c.local_size, c.local_scale),) * c.local_crops)
    data = image_sets(cfg.data, cfg.eval, plan=plan, seed=cfg.train.seed, eval_size=c.global_size,
                      eval_resize=cfg.data.image_size, digits_size=cfg.data.image_size,
                      min_probe_images=cfg.eval.k)  # files and shards: crops cut in the DataLoader workers
    workers = cfg.data.workers if data.files else 0  # tensors in memory are read by the main process
    set_threads(cfg.threads, device=device, workers=workers)  # the workers take cores from the model
    seed_everything(cfg.train.seed)
    model = build_model(cfg, data.channels)
    backbone, grid = model.backbone, c.global_size // model.backbone.patch_size
    init = cfg.init.load_into(backbone, part="teacher") if not cfg.resuming else None  # weights only
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    if init and dist.is_main():
        print(init.line(), flush=True)
    parts = describe_parts(cfg, backbone, data)  # what each checkpoint says of its backbones
    model = model.to(device)

    def prepare(batch) -> tuple[list[Tensor], Tensor]:
        """A loader's batch -> its views, cut in the workers (files, shards) or here, augmented, and the
        masks of the global views' patches (DINOv2's collate; the global RNG, so resume replays them)."""
        views = [normalize(view_colors(v, c, i), data.mean, data.std)
                 for i, v in enumerate(data.crops(batch, plan, device))]
        masks = ibot_masks(2 * len(views[0]), (grid, grid), torch.default_generator,
                           probability=cfg.ibot.mask_probability, ratio=cfg.ibot.mask_ratio)
        return views, masks.to(device)

    def loader(dataset) -> DataLoader:  # seeded apart from the global RNG; workers ignore SIGTERM
        return seeded_loader(dataset, seed=cfg.train.seed, workers=workers, timeout=cfg.data.timeout,
                             batch_size=cfg.batch_size, pin_memory=device.type == "cuda")

    prep = lambda x: normalize(to_unit(x).to(device), data.mean, data.std)  # noqa: E731  the probes' images

    def knn(net: nn.Module) -> float:  # the frozen net's features of the labelled images, eval mode
        fit, held = (loader_features(net, loader(d), prep) for d in (data.probe, data.test))
        return knn_accuracy(*fit, *held, k=cfg.eval.k, temperature=cfg.eval.temperature)

    knn_start = knn(backbone)  # same architecture and seed, untrained (or --init.from's weights)
    teacher = target_copy(model)  # no stochastic depth
    shard = lambda m: [*m.backbone.blocks, m.backbone, m.head, *filter(None, [m.patch_head])]  # noqa: E731
    dtype = torch.bfloat16 if cfg.amp == "bf16" else None
    wrapped = dist.parallelize(model, cfg.dist.strategy, device, shard=shard, param_dtype=dtype)
    teacher = dist.parallelize(teacher, cfg.dist.strategy, device, shard=shard, param_dtype=dtype)
    if dist.world_size() > 1:  # the same initial weights everywhere; each rank its own crops and masks
        seed_everything(seed_of(cfg.train.seed, "rank", dist.rank()))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    m = cfg.model  # the centres of DINO's and iBOT's teacher outputs (iBOT's own width with its own head)
    centers = {k: torch.zeros(1, d, device=device) for k, d in (
        ("center", m.out_dim), ("patch_center", m.ibot_out_dim if m.separate_ibot_head else m.out_dim))}
    start = {f"anchor.{k}": v for k, v in ema_copy(model.backbone).items()} if cfg.continued.anchor else {}
    state = TrainState(model=wrapped, optimizer=adamw(optimizer_groups(cfg, model), device=device),
                       target=teacher, scaler=scaler, accum=cfg.train.accum, extras=centers | start)
    anchor = {k.removeprefix("anchor."): v for k, v in start.items()}  # the same tensors: a resume fills them
    probe = OnlineProbe(data.probe, features=teacher.backbone, prep=prep, state=state, seed=cfg.train.seed,
                        enabled=cfg.eval.online)  # a linear head on the teacher's features, beside
    steps, schedule, warmup = cfg.train.steps, lr_schedule(cfg), cfg.continued.head_warmup_steps
    loss_fn = partial(dinov2_objective, cfg, wrapped, teacher)  # (state, (views, masks)) -> (loss, aux)
    prefetch = cfg.data.prefetch == "on" or (cfg.data.prefetch == "auto" and device.type == "cuda")
    batches = train_batches(data.train, state, seed=cfg.train.seed, batch_size=cfg.batch_size,
                            workers=workers, shards=data.shards, skip_unreadable=cfg.data.skip_unreadable,
                            timeout=cfg.data.timeout, prepare=prepare, prefetch=prefetch, device=device,
                            pin_memory=device.type == "cuda")
    watch = cfg.alarm.watch(m.out_dim)  # the teacher's uniform collapse, the features' dimensional
    with run.start(state, steps=steps, meta={"parts": parts}):  # resumed when asked; log; signals
        for batch in run.batches(batches):  # saved between updates; ends at the last step or a signal
            loss, aux = forward_loss(loss_fn, state, batch, amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            if state.step < warmup:  # fresh heads learn the frozen backbone's features first
                for p in backbone.parameters():
                    p.grad = None
            cancel_last_layer_gradients(model.head, state.step, m.freeze_last_layer_steps)
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, schedule, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps))
            if anchor:  # L2-SP; no change while the backbone is frozen at the anchor
                ema_update(model.backbone, anchor, 1.0 - min(1.0, lr * cfg.continued.anchor))
            momentum = momentum_at(state.step, cfg.ema, steps) if state.step != warmup else 0.0
            ema_update(state.target, state.model, momentum)  # at the switch: the teacher is the student
            terms = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "momentum": momentum,
                     **probe.update(state.step)}  # online_train_acc
            watch.report(run.after_update(terms), run.log, state.step)  # NaN watch, log, collapse warning
            if cfg.eval.every and state.step % cfg.eval.every == 0:
                run.log.write({"knn_acc": knn(teacher.backbone), "knn_acc_student": knn(model.backbone)},
                              state.step)

    images_per_update = cfg.batch_size * dist.world_size() * cfg.train.accum
    summary = run.summary(images_per_s=round(images_per_update * run.updates_per_s, 1),
                          skipped_unreadable=data.skipped, params_digest=params_digest(model),
                          collapse_warning=watch.last, knn_acc=knn(teacher.backbone),
                          knn_acc_student=knn(model.backbone), knn_acc_pixels=knn(nn.Flatten()),
                          **{"knn_acc_init" if init else "knn_acc_random_init": knn_start},
                          **({"init": init.as_dict()} if init else {}), **probe.summary(data.test))
    run.log.write({k: v for k, v in summary.items() if k.startswith(("knn", "online"))}, state.step)
    if run.finish(summary):  # summary.json written; only rank 0 prints
        print(f"k-NN accuracy: trained {summary['knn_acc']:.3f} (student {summary['knn_acc_student']:.3f}), "
              f"{'at init' if init else 'untrained'} {knn_start:.3f}, pixels "
              f"{summary['knn_acc_pixels']:.3f}; summary in {cfg.run_dir / 'summary.json'}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

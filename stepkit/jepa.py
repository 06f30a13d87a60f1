"""What the JEPA recipes share: the levels of hierarchical JEPA, the loss choice, the collapse alarm,
and the sequence features the probes read.

``recipes/ijepa.py`` (patches of images) and ``recipes/jepa_sequences.py``
(spans of time series, tokens of text) build their own data, models and
masks, and run their own loop; the pieces here are the same for both:

- ``Levels`` / ``level_values_at``: which encoder outputs are predicted, each
  level's loss weight and head learning rate on its own cosine schedule;
- ``JEPALoss`` / ``prediction_loss`` / ``level_losses``: the loss variants
  (smooth L1, MSE, contrastive, multi-scale) over every level, plus the
  optional VICReg variance guard;
- ``TargetAlarm`` / ``target_collapse_watch``: a warning when the targets collapse;
- ``sequence_features`` / ``raw_sequence_features``: what the probes read for
  series and sentences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepkit.check import at_least, fail, integer_at_least
from stepkit.data import series_windows
from stepkit.losses.jepa import (
    jepa_contrastive_loss,
    jepa_loss,
    multiscale_jepa_loss,
    variance_covariance_loss,
)
from stepkit.models.jepa import JEPA
from stepkit.models.sequence import TokenTransformer, sequence_tokens
from stepkit.models.text import masked_mean
from stepkit.models.vit import VisionTransformer
from stepkit.monitor import CollapseWatch, collapse_metrics
from stepkit.schedules import warmup_decay

__all__ = ["JEPALoss", "Levels", "TargetAlarm", "head_level", "level_lr_scales", "jepa_shard_units",
           "level_losses", "level_values_at", "prediction_loss", "raw_sequence_features",
           "sequence_features", "sequence_token_sets", "target_collapse_watch"]


@dataclass
class Levels:
    """Which encoder outputs are predicted (``--levels.*``): one entry per level.

    Examples:
        >>> Levels(depths=(3, 5)).resolved(encoder_depth=5)
        ((3, 5), (1.0, 1.0))
        >>> Levels().resolved(encoder_depth=5)  # I-JEPA: the last block alone
        ((5,), (1.0,))
    """

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
        """The levels' depths and start weights: () means the last block, weight 1.

        Args:
            encoder_depth: The encoder's blocks or stages.

        Returns:
            ``(depths, start_weights)``.
        """
        depths = self.depths or (encoder_depth,)
        return depths, self.weights or (1.0,) * len(depths)


def level_values_at(
    step: int, start: tuple[float, ...], final: tuple[float, ...] | None, total_steps: int
) -> list[float]:
    """Each level's value at ``step``: cosine from ``start`` to ``final`` over the run (constant if None).

    Args:
        step: The update.
        start: Each level's value at step 0.
        final: Each level's value at ``total_steps``, or None for constant values.
        total_steps: The run's length.

    Returns:
        One float per level.

    Examples:
        >>> level_values_at(50, (1.0, 0.0), (0.0, 1.0), total_steps=100)
        [0.5, 0.5]
        >>> level_values_at(50, (0.25, 1.0), None, total_steps=100)
        [0.25, 1.0]
    """
    if final is None:
        return [float(v) for v in start]
    return [float(warmup_decay(step, peak=a, final=b, total_steps=total_steps)) for a, b in zip(start, final)]


def level_lr_scales(step: int, levels: Levels, depths: tuple[int, ...], group_levels: list[int],
                    total_steps: int) -> tuple[list[float], dict[str, float]]:
    """Each parameter group's lr scale at ``step``: 1 for the encoder and trunk (level 0), each level's
    head its own (``--levels.lr-scales``, cosine to ``--levels.lr-scales-final``).

    Args:
        step: The update.
        levels: The run's levels.
        depths: The levels' depths (``levels.resolved``).
        group_levels: Each optimizer group's ``head_level`` (0, or 1 + the level).
        total_steps: The run's length.

    Returns:
        ``(group_scales, log_terms)``: ``apply_update``'s ``group_scales``, and with two or more levels
        each level's scale as ``lr_scale_depth<d>`` (empty with one).

    Examples:
        >>> level_lr_scales(0, Levels(depths=(2, 4), lr_scales=(0.5, 1.0)), (2, 4), [0, 1, 2], 100)
        ([1.0, 0.5, 1.0], {'lr_scale_depth2': 0.5, 'lr_scale_depth4': 1.0})
    """
    start = levels.lr_scales or (1.0,) * len(depths)
    heads = level_values_at(step, start, levels.lr_scales_final, total_steps)
    scales = [1.0 if level == 0 else heads[level - 1] for level in group_levels]
    return scales, ({f"lr_scale_depth{d}": v for d, v in zip(depths, heads)} if len(depths) > 1 else {})


def head_level(name: str) -> int:
    """Parameter group id of a JEPA module's parameter: 1 + the level for ``heads.<level>.*``, else 0.

    Args:
        name: The parameter's name in the module (``param_groups``'s ``layer_of``).

    Returns:
        0 for the encoder and predictor, ``1 + level`` for a level's head.

    Examples:
        >>> head_level("heads.1.weight"), head_level("predictor.out.weight")
        (2, 0)
    """
    parts = name.split(".")
    return 1 + int(parts[1]) if parts[0] == "heads" else 0


def jepa_shard_units(module: nn.Module) -> list[nn.Module]:
    """FSDP2 units below the root, inner first: a ViT's (or token transformer's) blocks, the context
    encoder, the predictor's blocks (``dist.parallelize``'s ``shard``).

    The encoder is its own unit so the evaluation can call it alone;
    ``dist.parallelize`` shards the root (the JEPA module, or the target encoder) last.

    Args:
        module: A ``JEPA`` / ``SequenceJEPA``, or a target encoder.

    Returns:
        The modules to shard on their own, inner first.

    Examples:
        >>> from stepkit.models import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=4, dim=16, depth=2, heads=2)
        >>> len(jepa_shard_units(vit))  # its two blocks
        2
    """
    if isinstance(module, JEPA):
        predictor_blocks = cast(nn.ModuleList, module.predictor.blocks)
        return [*jepa_shard_units(module.encoder), module.encoder, *predictor_blocks]
    return list(module.blocks) if isinstance(module, (VisionTransformer, TokenTransformer)) else []


@dataclass
class JEPALoss:
    """Which loss each level's predictions get (``--loss.*``), and the optional variance guard.

    Examples:
        >>> JEPALoss(kind="multiscale").scales
        (1, 2, 4)
    """

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


def prediction_loss(loss: JEPALoss, pred: Tensor, target: Tensor, mask: Tensor | None,
                    generator: torch.Generator) -> Tensor:
    """One level's loss over ``(B, N, D)`` tokens; ``mask`` ``(B, N)`` the predicted ones (None: all).

    Args:
        loss: Which loss (``loss.kind``) and its settings.
        pred: ``(B, N, D)`` predictions.
        target: ``(B, N, D)`` targets (layer-normed by the caller).
        mask: ``(B, N)`` the tokens that count, or None for all of them.
        generator: The contrastive loss's sampled negatives draw from it.

    Returns:
        A 0-d tensor.

    Examples:
        >>> pred, target = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
        >>> prediction_loss(JEPALoss(kind="mse"), pred, target, None, torch.Generator()).item()
        1.0
        >>> mask = torch.tensor([[True, False]])
        >>> prediction_loss(JEPALoss(), pred, target, mask, torch.Generator()).item()  # smooth L1
        0.5
    """
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


def level_losses(
    pairs: list[tuple[Tensor, Tensor, Tensor | None]],
    pooled: Tensor,
    *,
    depths: tuple[int, ...],
    weights: list[float],
    loss: JEPALoss,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Any]]:
    """The JEPA objective: each level's ``prediction_loss`` times its weight, plus the variance guard.

    ``loss = sum_l w_l * prediction_loss(pred_l, target_l) + var_weight * var + cov_weight * cov``,
    with VICReg's terms on the context encoder's pooled embeddings. Every
    level's loss, weight, and the collapse metrics of its targets and
    predictions (``depth<d>_target_*``, ``depth<d>_pred_*``) are logged.

    Args:
        pairs: One ``(prediction, target, mask)`` per level: ``(B, N, D)``, ``(B, N, D)``, and
            ``(B, N)`` or None.
        pooled: ``(B, dim)`` the context encoder's pooled tokens.
        depths: The levels' depths (for the metric names).
        weights: Each level's loss weight now (``level_values_at``).
        loss: The loss settings.
        generator: For the contrastive loss's sampled negatives.

    Returns:
        ``(loss, aux)``, as a ``forward_loss`` loss function returns them.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> pairs = [(torch.zeros(2, 3, 4), torch.ones(2, 3, 4), None)]
        >>> total, aux = level_losses(pairs, torch.randn(2, 4), depths=(5,), weights=[2.0],
        ...                           loss=JEPALoss(), generator=torch.Generator())
        >>> total.item(), aux["loss_depth5"].item()  # smooth L1 of 1 is 0.5, weighted by 2
        (1.0, 0.5)
    """
    total: Tensor | float = 0.0
    aux: dict[str, Any] = {}
    for depth, (pred, targets, mask), weight in zip(depths, pairs, weights):
        level_loss = prediction_loss(loss, pred, targets, mask, generator)
        total = total + weight * level_loss
        d = targets.shape[-1]
        seen = targets if mask is None else targets[mask]
        guess = pred if mask is None else pred[mask]
        aux |= {f"loss_depth{depth}": level_loss, f"weight_depth{depth}": weight,
                **collapse_metrics(seen.reshape(-1, d)[:1024], f"depth{depth}_target_"),
                **collapse_metrics(guess.reshape(-1, d)[:1024], f"depth{depth}_pred_")}
    if loss.var_weight or loss.cov_weight:
        variance, covariance = variance_covariance_loss(pooled, gamma=loss.var_gamma)
        total = total + loss.var_weight * variance + loss.cov_weight * covariance
        aux |= {"var_loss": variance, "cov_loss": covariance}
    aux |= collapse_metrics(pooled, "context_pooled_")
    assert isinstance(total, Tensor), "at least one level"
    return total, aux


@dataclass
class TargetAlarm:
    """A collapse warning (``--alarm.*``): printed and logged when every level's targets stay low.

    Examples:
        >>> TargetAlarm().patience
        3
    """

    MAY_CHANGE_ON_RESUME: ClassVar[bool] = True  # a warning only: it never changes the run

    min_effective_rank: float = 1.5
    """Warn when a level's targets' effective rank stays below this..."""
    min_std: float = 0.05
    """...or their per-dimension std below this..."""
    patience: int = 3
    """...for this many log intervals in a row."""

    def __post_init__(self) -> None:
        integer_at_least("alarm.patience", self.patience, 1)


def target_collapse_watch(alarm: TargetAlarm, depths: tuple[int, ...]) -> CollapseWatch:
    """A ``CollapseWatch`` over every level's ``depth<d>_target_effective_rank`` and ``..._std``.

    Args:
        alarm: The thresholds and patience.
        depths: The levels' depths.

    Returns:
        The watch; feed it each log interval's means.

    Examples:
        >>> watch = target_collapse_watch(TargetAlarm(patience=1), (5,))
        >>> watch({"depth5_target_effective_rank": 1.0, "depth5_target_std": 0.5})
        'collapse warning: depth5_target_effective_rank below 1.5 for 1 intervals (last 1)'
    """
    limits = {"effective_rank": alarm.min_effective_rank, "std": alarm.min_std}
    below = {f"depth{d}_target_{name}": limit for d in depths for name, limit in limits.items()}
    return CollapseWatch(below=below, patience=alarm.patience)


@torch.no_grad()
def sequence_features(net: nn.Module, splits: dict[str, Any], layers: tuple[int, ...], *,
                      window: int | None, stride: int, device: torch.device) -> tuple[Any, Any]:
    """Pooled tokens of ``layers``, concatenated: a sentence's mean over its real tokens (``window``
    None: ``splits`` hold token ids, 0 = padding); a series' mean over its windows (every ``stride``
    steps) of each window's mean.

    Args:
        net: A sequence encoder (``sequence_tokens`` takes it).
        splits: ``{"train": (items, labels), "test": (items, labels)}``: ``(N, L)`` token ids, or a list of
            ``(C, T)`` series.
        layers: 0-based layers whose outputs are pooled.
        window: Time steps per window (series), or None (token ids).
        stride: Steps between two windows of a series.
        device: Where ``net`` runs.

    Returns:
        ``((train_features, train_labels), (test_features, test_labels))``, features on the CPU.

    Examples:
        >>> from stepkit.models import TokenTransformer
        >>> net = TokenTransformer(vocab_size=10, length=4, dim=8, depth=2, heads=2).eval()
        >>> ids = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 0]])
        >>> splits = {"train": (ids, torch.tensor([0, 1])), "test": (ids, None)}
        >>> (train, _), _ = sequence_features(net, splits, (0, 1), window=None, stride=1,
        ...                                   device=torch.device("cpu"))
        >>> train.shape  # two layers of width 8
        torch.Size([2, 16])
    """
    def pooled(x: Tensor, valid: Tensor) -> Tensor:
        _, outs = sequence_tokens(net, x.to(device), None, layers=layers)
        return torch.cat([masked_mean(o, valid.to(device)) for o in outs], dim=1).float().cpu()

    out = []
    for split in ("train", "test"):
        items, labels = splits[split]
        if window is None:
            f = torch.cat([pooled(ids, ids != 0) for ids in items.split(256)])
        else:
            cut = [series_windows(x, window, stride) for x in items]
            f = torch.stack([pooled(w, torch.ones(w.shape[0], w.shape[-1], dtype=torch.bool)).mean(dim=0)
                             for w in cut])
        out.append((f, labels))
    return out[0], out[1]


@torch.no_grad()
def sequence_token_sets(net: nn.Module, splits: dict[str, Any], layer: int, *, window: int | None,
                        stride: int, device: torch.device) -> tuple[Any, Any]:
    """Each item's tokens of ``layer`` for an attentive probe: a sentence's real tokens (``window`` None:
    token ids, 0 = padding), or every token of every window of a series (every ``stride`` steps), padded
    to the longest item (``stepkit.attentive_probe.pad_tokens``).

    Returns:
        ``((train_tokens, train_padding, train_labels), (test_tokens, test_padding, test_labels))``:
        ``(N, T, dim)`` tokens on the CPU, ``(N, T)`` True where padded.

    Examples:
        >>> from stepkit.models import TokenTransformer
        >>> net = TokenTransformer(vocab_size=10, length=4, dim=8, depth=2, heads=2).eval()
        >>> ids = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 0]])
        >>> splits = {"train": (ids, torch.tensor([0, 1])), "test": (ids, torch.tensor([0, 1]))}
        >>> (tokens, padding, _), _ = sequence_token_sets(net, splits, 1, window=None, stride=1,
        ...                                               device=torch.device("cpu"))
        >>> tuple(tokens.shape), padding.sum(dim=1).tolist()  # the longest sentence's 3 real tokens
        ((2, 3, 8), [1, 0])
    """
    from stepkit.attentive_probe import pad_tokens

    def tokens_of(x: Tensor) -> Tensor:
        return sequence_tokens(net, x.to(device), None, layers=(layer,))[1][0].float().cpu()

    out = []
    for split in ("train", "test"):
        items, labels = splits[split]
        if window is None:
            sets = [t[ids != 0] for chunk in items.split(256) for t, ids in zip(tokens_of(chunk), chunk)]
        else:
            sets = [tokens_of(series_windows(x, window, stride)).flatten(0, 1) for x in items]
        tokens, padding = pad_tokens(sets)
        out.append((tokens, padding, torch.as_tensor(labels)))
    return out[0], out[1]


def raw_sequence_features(splits: dict[str, Any], *, window: int | None,
                          vocab_size: int = 0) -> tuple[Any, Any]:
    """The baselines' features: each series resampled to ``window`` steps (linear interpolation), or
    (``window`` None) each sentence's bag of words over the training sentences' vocabulary.

    Args:
        splits: As ``sequence_features`` takes them.
        window: The steps a series is resampled to, or None for token ids.
        vocab_size: The vocabulary's size (token ids).

    Returns:
        ``((train_features, train_labels), (test_features, test_labels))``.

    Examples:
        >>> ids = torch.tensor([[1, 2, 2, 0]])
        >>> (train, _), _ = raw_sequence_features({"train": (ids, None), "test": (ids, None)}, window=None,
        ...                                       vocab_size=4)
        >>> train.tolist()  # counts of ids 1 and 2 (3 never occurs in training; 0 is padding)
        [[1.0, 2.0]]
    """
    if window is not None:
        def resampled(items):
            return torch.stack([F.interpolate(x[None], size=window, mode="linear")[0].flatten()
                                for x in items])
        return ((resampled(splits["train"][0]), splits["train"][1]),
                (resampled(splits["test"][0]), splits["test"][1]))

    def counts(ids: Tensor) -> Tensor:
        return torch.zeros(len(ids), vocab_size).scatter_add_(1, ids, torch.ones(ids.shape))[:, 1:]

    train, test = counts(splits["train"][0]), counts(splits["test"][0])
    used = train.sum(dim=0) > 0  # words never seen in training carry nothing a probe could fit
    return (train[:, used], splits["train"][1]), (test[:, used], splits["test"][1])

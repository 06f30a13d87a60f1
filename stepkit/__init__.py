"""stepkit: the pieces of a PyTorch training loop, as small functions. No trainer class."""

from stepkit.ema import ema_copy, ema_update
from stepkit.schedules import (
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    layer_decay_scales,
    lr_at,
    momentum_at,
    param_groups,
    warmup_decay,
    wd_at,
)
from stepkit.state import TrainState, unwrap
from stepkit.step import accumulate, apply_update, clip, forward_loss, grad_norm

__version__ = "0.1.0"

__all__ = [
    "LRSchedule",
    "MomentumSchedule",
    "TrainState",
    "WDSchedule",
    "accumulate",
    "apply_update",
    "clip",
    "ema_copy",
    "ema_update",
    "forward_loss",
    "grad_norm",
    "layer_decay_scales",
    "lr_at",
    "momentum_at",
    "param_groups",
    "unwrap",
    "warmup_decay",
    "wd_at",
]

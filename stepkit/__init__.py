"""stepkit: the pieces of a PyTorch training loop, as small functions. No trainer class."""

from stepkit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    maybe_save,
    restore,
    resume,
    save_best,
    save_checkpoint,
    save_last,
)
from stepkit.ema import ema_copy, ema_update
from stepkit.gradcache import gradcache
from stepkit.log import LogConfig, Logger, read_history, should_stop
from stepkit.monitor import collapse_metrics, norms_by_group, system_metrics
from stepkit.run import CkptConfig, TrainConfig, params_digest, pick_device, seed_everything, start_run
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
    "CheckpointError",
    "CkptConfig",
    "LRSchedule",
    "LogConfig",
    "Logger",
    "MomentumSchedule",
    "TrainConfig",
    "TrainState",
    "WDSchedule",
    "accumulate",
    "apply_update",
    "clip",
    "collapse_metrics",
    "ema_copy",
    "ema_update",
    "forward_loss",
    "grad_norm",
    "gradcache",
    "layer_decay_scales",
    "load_checkpoint",
    "lr_at",
    "maybe_save",
    "momentum_at",
    "norms_by_group",
    "param_groups",
    "params_digest",
    "pick_device",
    "read_history",
    "restore",
    "resume",
    "save_best",
    "save_checkpoint",
    "save_last",
    "seed_everything",
    "should_stop",
    "start_run",
    "system_metrics",
    "unwrap",
    "warmup_decay",
    "wd_at",
]

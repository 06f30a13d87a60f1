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
from stepkit.config import CkptConfig, TrainConfig
from stepkit.ema import ema_copy, ema_update
from stepkit.gradcache import gradcache
from stepkit.log import LogConfig, Logger, read_history, should_stop
from stepkit.monitor import collapse_metrics, norms_by_group, system_metrics
from stepkit.run import params_digest, pick_device, seed_everything
from stepkit.rundir import start_run
from stepkit.schedules import (
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    layer_decay_scales,
    lr_at,
    momentum_at,
    param_groups,
    warmup_decay,
    warmup_steps_of,
    wd_at,
)
from stepkit.state import TrainState, unwrap
from stepkit.step import accumulate, apply_update, clip, forward_loss, grad_norm

__version__ = "0.1.0"

# The loop's core (the README's first API table, tested). The run machinery imported above stays
# importable from here, as before; its home is the module each name comes from.
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
    "gradcache",
    "layer_decay_scales",
    "lr_at",
    "momentum_at",
    "param_groups",
    "unwrap",
    "warmup_decay",
    "warmup_steps_of",
    "wd_at",
]

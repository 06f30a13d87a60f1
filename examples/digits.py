"""A complete stepkit run on scikit-learn's digits: CLI, run directory, checkpoints, logs, resume.

    python examples/digits.py --run-dir runs/digits
    python examples/digits.py --run-dir runs/digits --resume    # continue after a crash
    python examples/digits.py --help                            # every flag

The shape every recipe follows: config dataclasses at the top (tyro makes
them the CLI), data and model in plain code, then the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import functional_call
from torch.utils.data import TensorDataset

from stepkit.check import integer_at_least
from stepkit.checkpoint import save_best
from stepkit.cli import cli, run_main
from stepkit.config import Amp, BestCkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import train_batches
from stepkit.ema import ema_copy, ema_update
from stepkit.log import LogConfig, should_stop
from stepkit.monitor import collapse_metrics
from stepkit.run import Run, params_digest, pick_device, seed_everything
from stepkit.schedules import (
    LRSchedule,
    MomentumSchedule,
    WDSchedule,
    lr_at,
    momentum_at,
    param_groups,
    wd_at,
)
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 3e-3
    warmup_steps: int | None = None
    """Updates of linear warm-up; None: 20, or a tenth of --train.steps when that is shorter."""
    default_warmup: ClassVar[int] = 20
    wd: float = 0.05
    clip: float | None = 1.0
    """Largest global gradient norm (None: no clipping)."""


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/digits")
    """Where config.json, metrics.jsonl, checkpoints/ and summary.json go."""
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 32
    hidden: int = 128
    eval_every: int = 50
    """Updates between two held-out evaluations."""
    patience: int = 0
    """Stop after this many evaluations without a better val_acc (0: never)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: Optim = field(default_factory=Optim)
    ema: MomentumSchedule = field(default_factory=lambda: MomentumSchedule(momentum=0.95))
    log: LogConfig = field(default_factory=lambda: LogConfig(every=25))
    ckpt: BestCkptConfig = field(default_factory=lambda: BestCkptConfig(every=50))
    """Checkpoints; the best ones by validation accuracy (--ckpt.keep-best)."""

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 1)
        integer_at_least("hidden", self.hidden, 1)
        integer_at_least("eval_every", self.eval_every, 1)
        integer_at_least("patience", self.patience, 0)
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} is not allowed: expected at most "
                f"train.steps={self.train.steps}"
            )


def main(cfg: Config) -> dict:
    device = pick_device(cfg.device)
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    seed_everything(cfg.train.seed)

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32, device=device), torch.tensor(y, device=device)
    (x_train, y_train), (x_val, y_val) = (x[:1400], y[:1400]), (x[1400:], y[1400:])

    model = torch.nn.Sequential(
        torch.nn.Linear(64, cfg.hidden), torch.nn.GELU(), torch.nn.Linear(cfg.hidden, 10)
    ).to(device)
    state = TrainState(
        model=model,
        optimizer=adamw(param_groups(model), device=device),
        target=ema_copy(model),
        scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
        accum=cfg.train.accum,
        extras={"val_history": []},
    )
    steps = cfg.train.steps

    def loss_fn(state, batch):
        features = state.model[:2](batch[0])
        logits = state.model[2](features)
        acc = (logits.argmax(1) == batch[1]).float().mean()
        return F.cross_entropy(logits, batch[1]), {"acc": acc, **collapse_metrics(features, "feat_")}

    @torch.no_grad()
    def val_acc(weights) -> float:  # one host read per evaluation
        logits = functional_call(model, weights, (x_val,))
        return (logits.argmax(1) == y_val).float().mean().item()

    # An epoch-seeded order; each batch counted in the state as consumed, so a resume starts at the next
    batches = train_batches(TensorDataset(x_train, y_train), state, batch_size=cfg.batch_size,
                            seed=cfg.train.seed)
    with run.start(state, steps=steps):  # resumed when asked; the log; SIGTERM / Ctrl-C stop after the update
        for batch in run.batches(batches):  # saved between updates; ends at the last step, a signal or stop()
            loss, aux = forward_loss(loss_fn, state, batch, amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps))
            ema_update(state.target, state.model, momentum_at(state.step, cfg.ema, steps))
            run.after_update({"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr})  # NaN watch, log

            if state.step % cfg.eval_every == 0 or state.step == steps:
                acc = val_acc(state.target)
                state.extras["val_history"].append(acc)
                run.log.write({"val_acc": acc}, state.step)
                if cfg.ckpt.keep_best:
                    save_best(run.ckpt_dir, state, acc, keep_best=cfg.ckpt.keep_best, mode="max")
                history = state.extras["val_history"]
                if cfg.patience > 0 and should_stop(history, patience=cfg.patience, mode="max"):
                    run.stop(f"early stop at step {state.step}: no better val_acc in {cfg.patience} "
                             "evaluations")
    # left the run: last.pt saved (after a signal: exit 75 with the command that continues)

    online = dict(model.named_parameters())
    summary = run.summary(val_acc=val_acc(state.target), val_acc_online=val_acc(online),
                          params_digest=params_digest(model))
    if run.finish(summary):  # summary.json written; only rank 0 prints
        print(f"val_acc {summary['val_acc']:.3f} (EMA weights), {summary['val_acc_online']:.3f} (online); "
              f"summary in {cfg.run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    # config or data errors: one line, no traceback
    run_main(main, lambda: cli(Config, description=__doc__.splitlines()[0]))

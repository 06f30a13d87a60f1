"""Multimodal autoencoder matched to fMRI: video, audio and text features -> voxels -> features.

    python recipes/autoencoder.py --run-dir runs/ae                  # embedded synthetic data
    python recipes/autoencoder.py --run-dir runs/ae --optim.lr 1e-3
    python recipes/autoencoder.py --run-dir runs/ae --data.path my_subject.npz
    python recipes/autoencoder.py --help

Each modality's window of the last ``--data.window`` time points goes
through its own temporal encoder; the fused code is a bottleneck of one unit
per voxel, matched to the measured responses (1 - Pearson r per voxel, or
MSE), and decoders reconstruct every modality's window from it. Training
uses AdamW with warm-up + cosine, clipping, fp16/bf16, accumulation, a
validation pass per epoch with early stopping on validation loss, and
periodic, best and final checkpoints. The held-out test block is scored
with the best checkpoint, beside the field's standard baseline: ridge
regression from the same windows of concatenated features to the voxels,
its regularisation chosen per voxel on the validation block (and, beside
it, one alpha shared by all voxels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch.utils.data import TensorDataset

from stepkit import dist
from stepkit.check import at_least, fail, integer_at_least
from stepkit.checkpoint import SHARDED_SUFFIX, best_checkpoints, load_checkpoint, load_sharded, save_best
from stepkit.cli import cli, run_main
from stepkit.config import Amp, BestCkptConfig, Device, RunArgs, TrainConfig, may_change_on_resume
from stepkit.data import (
    MODALITIES,
    load_fmri_npz,
    stimulus_windows,
    synthetic_fmri,
    time_blocks,
    train_batches,
)
from stepkit.evaluation import ridge_regression
from stepkit.log import LogConfig, should_stop
from stepkit.losses import autoencoder_fmri_loss, pearson_per_voxel, voxel_corr_summary
from stepkit.models import MultimodalAutoencoder
from stepkit.probe import ProbeRecord
from stepkit.run import Run, params_digest, pick_device, seed_everything, set_threads
from stepkit.schedules import LRSchedule, WDSchedule, lr_at, param_groups, wd_at
from stepkit.state import TrainState
from stepkit.step import accumulate, adamw, apply_update, clip, forward_loss
from stepkit.tuning import TuneConfig, tune
from stepkit.weights import describe_part


@dataclass
class Data:
    path: Path | None = None
    """A .npz with arrays video, audio, text, fmri (time first); None: the embedded synthetic set."""
    window: int = 6
    """Time points of stimulus each sample sees (the haemodynamic lag spans about 6 TRs)."""
    time_points: int = 3000
    """Synthetic set: length of the time series."""
    voxels: int = 100
    """Synthetic set: voxels (the bottleneck's size)."""
    seed: int = 0
    """Synthetic set: the seed that generates it."""

    def __post_init__(self) -> None:
        integer_at_least("window", self.window, 1)
        integer_at_least("time_points", self.time_points, 100)
        integer_at_least("voxels", self.voxels, 1)


@dataclass
class Model:
    hidden: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        integer_at_least("hidden", self.hidden, 1)
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", self.dropout, "a number in [0, 1)")


@dataclass
class Loss:
    fmri: Literal["correlation", "mse"] = "correlation"
    """How the bottleneck is matched to the voxels."""
    fmri_weight: float = 1.0
    video_weight: float = 0.05
    audio_weight: float = 0.05
    text_weight: float = 0.05

    def __post_init__(self) -> None:
        for name in ("fmri_weight", "video_weight", "audio_weight", "text_weight"):
            at_least(name, getattr(self, name), 0.0)


@dataclass
class Optim(LRSchedule, WDSchedule):
    lr: float = 1e-3
    warmup_steps: int | None = None
    """Updates of linear warm-up; None: 50, or a tenth of --train.steps when that is shorter."""
    default_warmup: ClassVar[int] = 50
    min_lr: float = 1e-5
    wd: float = 0.05
    clip: float | None = 1.0
    """Largest global gradient norm (None: no clipping)."""


@dataclass
class Config(RunArgs):
    run_dir: Path = Path("runs/autoencoder")
    device: Device = may_change_on_resume("auto")
    amp: Amp = "none"
    batch_size: int = 128
    patience: int = 8
    """Epochs without a lower validation loss before stopping (0: never stop early)."""
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    loss: Loss = field(default_factory=Loss)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500))
    optim: Optim = field(default_factory=Optim)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=16))
    ckpt: BestCkptConfig = field(default_factory=lambda: BestCkptConfig(every=160))
    """Checkpoints; the best ones by validation loss (--ckpt.keep-best)."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    dist: dist.DistConfig = field(default_factory=dist.DistConfig)

    def __post_init__(self) -> None:
        integer_at_least("batch_size", self.batch_size, 2)  # a correlation needs two time points
        integer_at_least("patience", self.patience, 0)
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.steps:
            fail("optim.warmup_steps", self.optim.warmup_steps, f"at most train.steps={self.train.steps}")


PRESETS = {
    "tiny-cpu": ("The default: the embedded synthetic set, correlation matching, early stopping.", Config()),
    "mse": ("Match the voxels by mean squared error instead of correlation.", Config(loss=Loss(fmri="mse"))),
}


def flat_windows(series: dict[str, torch.Tensor], t: torch.Tensor, window: int) -> torch.Tensor:
    """Every modality's window, flattened and concatenated: ``(B, window x sum(d))``."""
    return torch.cat([w.flatten(1) for w in stimulus_windows(series, t, window).values()], 1)


def describe_parts(cfg: Config, model: MultimodalAutoencoder) -> dict:
    """The model as checkpoints describe it: ``stepkit eval`` rebuilds the series and scores the test block
    (``--checkpoint best`` gives the summary's voxel_corr; ``--plot`` maps the predicted responses)."""
    data = ({"kind": "fmri_npz", "path": str(cfg.data.path.resolve())} if cfg.data.path else
            {"kind": "synthetic_fmri", "seed": cfg.data.seed, "time_points": cfg.data.time_points,
             "voxels": cfg.data.voxels})
    probe = ProbeRecord("voxels", data=data, window=cfg.data.window).as_dict()
    return {"autoencoder": describe_part(model, source="model", prefix="", probe=probe,
                                         about="stimulus windows -> voxel responses, and back")}


def main(cfg: Config) -> dict:
    device = dist.init_from_env(pick_device(cfg.device).type)  # torchrun: join the group, one device each
    set_threads(cfg.threads, device=device, workers=0)  # --threads
    arrays = load_fmri_npz(cfg.data.path) if cfg.data.path else synthetic_fmri(
        seed=cfg.data.seed, time_points=cfg.data.time_points, voxels=cfg.data.voxels
    )
    blocks = time_blocks(len(arrays["fmri"]), window=cfg.data.window)  # too short? said before any work
    run = Run(cfg)  # the run directory checked (a fresh or a resumed run) before any work
    seed_everything(cfg.train.seed)
    series = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    train_t, val_t, test_t = (torch.from_numpy(b).to(device) for b in blocks)

    dims = {m: series[m].shape[1] for m in MODALITIES}
    voxels = series["fmri"].shape[1]
    model = MultimodalAutoencoder(dims, window=cfg.data.window, voxels=voxels,
                                  hidden=cfg.model.hidden, dropout=cfg.model.dropout).to(device)
    meta = {"parts": describe_parts(cfg, model)}  # every checkpoint's (stepkit eval); before FSDP2 wraps it
    wrapped = dist.parallelize(model, cfg.dist.strategy, device)
    state = TrainState(
        model=wrapped,
        optimizer=adamw(param_groups(model), device=device),  # fused: no host read per update
        scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
        accum=cfg.train.accum,
        extras={"val_losses": [], "wall_s": 0.0},
    )
    steps = cfg.train.steps
    recon_weights = {m: getattr(cfg.loss, f"{m}_weight") for m in MODALITIES}

    def losses(model, t):
        inputs = stimulus_windows(series, t, cfg.data.window)
        fmri_pred, recon = model(inputs)
        loss, parts = autoencoder_fmri_loss(
            recon, inputs, fmri_pred, series["fmri"][t],
            recon_weights=recon_weights, fmri_weight=cfg.loss.fmri_weight, fmri_kind=cfg.loss.fmri,
        )
        return loss, parts, fmri_pred

    def loss_fn(state, t):
        loss, parts, _ = losses(state.model, t)
        return loss, parts

    @torch.no_grad()
    def evaluate(t: torch.Tensor) -> dict[str, float]:
        model.eval()
        loss, parts, fmri_pred = losses(model, t)  # the whole block at once: r over all its time points
        r = pearson_per_voxel(fmri_pred, series["fmri"][t])
        model.train()
        return {k: float(v) for k, v in {"loss": loss, **parts, **voxel_corr_summary(r)}.items()}

    if cfg.tune.measures:  # measure instead of training: no run, no checkpoint, no log
        def make_batch(size: int) -> torch.Tensor:
            return train_t[torch.randint(0, len(train_t), (size,), device=device)]

        return tune(cfg.tune, cfg.run_dir, loss_fn, state, make_batch, batch_size=cfg.batch_size, amp=cfg.amp)

    # Epochs: a fresh permutation of the training time points each, seeded by the run's seed and
    # the epoch, so a resumed run draws the same batches (each batch counted in the state as consumed).
    positions = TensorDataset(torch.arange(len(train_t)))  # indexed on the host, train_t once a batch
    batches = train_batches(positions, state, batch_size=cfg.batch_size, seed=cfg.train.seed,
                            prepare=lambda b: train_t[b[0].to(device)])  # this rank's share of the epoch
    per_epoch = len(train_t) // dist.world_size() // cfg.batch_size
    updates_per_epoch = max(per_epoch // cfg.train.accum, 1)
    with run.start(state, steps=steps, meta=meta):  # resumed when asked; log; signals
        for batch in run.batches(batches):  # saved between updates; ends at the last step, a signal or stop()
            loss, parts = forward_loss(loss_fn, state, batch, amp=cfg.amp)
            if not accumulate(state, loss):
                continue
            grad_norm = clip(state, max_norm=cfg.optim.clip)
            lr = lr_at(state.step, cfg.optim, steps)
            apply_update(state, lr=lr, wd=wd_at(state.step, cfg.optim, steps))
            terms = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": lr}
            run.after_update(terms)  # NaN watch (exit 65 after a storm), log
            if state.step % updates_per_epoch == 0 or state.step == steps:  # one validation per epoch
                val = evaluate(val_t)
                state.extras["val_losses"].append(val["loss"])
                run.log.write({f"val_{k}": v for k, v in val.items()}, state.step)
                if cfg.ckpt.keep_best:
                    save_best(run.ckpt_dir, state, val["loss"], keep_best=cfg.ckpt.keep_best, meta=meta)
                if cfg.patience > 0 and should_stop(state.extras["val_losses"], patience=cfg.patience):
                    run.stop(f"early stop at step {state.step}: no lower validation loss in {cfg.patience} "
                             "epochs")
    # left the run: last.pt saved (after a signal: exit 75)
    run.log.close()
    final_digest = params_digest(model)

    best = best_checkpoints(run.ckpt_dir)
    if best:  # score the test block with the weights that did best on validation
        best_file = run.ckpt_dir / best[0]["file"]
        if dist.is_sharded(model):  # FSDP2: the best checkpoint is a folder of shards
            load_sharded(best_file.with_suffix(SHARDED_SUFFIX), state)
        else:
            model.load_state_dict(load_checkpoint(best_file)["state"]["model"])
    test = evaluate(test_t)

    flat = lambda t: flat_windows(series, t, cfg.data.window)  # noqa: E731  ridge's input
    fit_args = (flat(train_t), series["fmri"][train_t], flat(val_t), series["fmri"][val_t])
    ridge = ridge_regression(*fit_args, per_target=True)  # the field's standard: an alpha per voxel
    shared = ridge_regression(*fit_args)  # one alpha for every voxel, beside it
    r_ridge = pearson_per_voxel(ridge(flat(test_t)), series["fmri"][test_t].double())
    r_shared = pearson_per_voxel(shared(flat(test_t)), series["fmri"][test_t].double())
    summary = run.summary(**{
        "best_step": best[0]["step"] if best else state.step,
        **{k: v for k, v in test.items() if k.startswith("voxel_corr")},
        **{f"test_{k}": v for k, v in test.items() if not k.startswith("voxel_corr")},
        **{f"{k}_ridge": float(v) for k, v in voxel_corr_summary(r_ridge).items()},
        "ridge_alpha": ridge.alpha,  # the median of the voxels' alphas
        "voxel_corr_ridge_shared_alpha": float(r_shared.mean()),
        "ridge_shared_alpha": shared.alpha,
        "params_digest": final_digest,
    })
    if "fmri_clean" in series:  # the synthetic set knows its noise-free responses: the ceiling
        ceiling = pearson_per_voxel(series["fmri_clean"][test_t], series["fmri"][test_t])
        summary["voxel_corr_ceiling"] = float(ceiling.mean())
    if not run.finish(summary):  # summary.json written; only rank 0 prints
        return summary
    print(f"test voxel_corr {summary['voxel_corr']:.3f} (model, best step {summary['best_step']}) vs "
          f"{summary['voxel_corr_ridge']:.3f} (ridge, an alpha per voxel; one shared alpha "
          f"{summary['voxel_corr_ridge_shared_alpha']:.3f}); summary in "
          f"{cfg.run_dir / 'summary.json'}")
    return summary


def parse(argv: list[str] | None = None) -> Config:
    return cli(Config, PRESETS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main, parse)  # config or data errors: one line, no traceback

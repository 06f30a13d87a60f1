"""The smallest complete stepkit loop: an MLP on scikit-learn's digits, with an EMA copy."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import functional_call

from stepkit import (
    LRSchedule,
    MomentumSchedule,
    TrainState,
    accumulate,
    apply_update,
    clip,
    ema_copy,
    ema_update,
    forward_loss,
    lr_at,
    momentum_at,
    param_groups,
)

STEPS, BATCH, ACCUM, LOG_EVERY = 300, 32, 2, 50
torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
opt = torch.optim.AdamW(param_groups(model))  # no weight decay on biases
state = TrainState(model=model, optimizer=opt, target=ema_copy(model))
lr, ema = LRSchedule(lr=3e-3, warmup_steps=20), MomentumSchedule(momentum=0.95)


def loss_fn(state, batch):
    logits = state.model(batch[0])
    return F.cross_entropy(logits, batch[1]), {"acc": (logits.argmax(1) == batch[1]).float().mean()}


while state.step < STEPS:
    idx = torch.randint(0, 1400, (BATCH,))  # rows 1400+ are held out
    loss, aux = forward_loss(loss_fn, state, (x[idx], y[idx]), amp="bf16")
    if accumulate(state, loss, every=ACCUM):
        grad_norm = clip(state, max_norm=1.0)
        apply_update(state, lr=lr_at(state.step, lr, STEPS), wd=0.05)
        ema_update(state.target, state.model, momentum_at(state.step, ema, STEPS))
        if state.step % LOG_EVERY == 0:  # the only host reads: once per interval
            print(f"step {state.step} loss {loss.item():.3f} acc {aux['acc'].item():.2f} "
                  f"grad_norm {grad_norm.item():.2f}")

with torch.no_grad():
    held_out = {"online": model(x[1400:]), "EMA": functional_call(model, state.target, x[1400:])}
    for name, logits in held_out.items():
        print(f"held-out accuracy, {name} weights: {(logits.argmax(1) == y[1400:]).float().mean():.3f}")

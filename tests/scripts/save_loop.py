"""Save a checkpoint over and over, each with the weights filled with its step, printing ``saved N``.

``python save_loop.py DIR`` writes single-file ``DIR/last.pt``; under ``torchrun`` with ``--fsdp`` every
rank writes its shards of ``DIR/last.dcp``. The fault tests kill it while a save is being written.
"""

import sys

import torch

from stepkit import TrainState, dist
from stepkit.checkpoint import save_last

ckpt_dir, strategy = sys.argv[1], "fsdp" if "--fsdp" in sys.argv else "ddp"
device = dist.init_from_env("cpu")
model = dist.parallelize(torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(6))), strategy,
                         device)
state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
while True:
    state.step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(state.step)
    save_last(ckpt_dir, state)
    if dist.is_main():
        print("saved", state.step, flush=True)

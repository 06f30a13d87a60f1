"""Gradient caching against the plain step: peak activation memory and step time at growing batches.

The contrastive recipe's towers (a GroupNorm CNN for 32x32 images; a small
text encoder, or MiniLM with LoRA) and CLIP's loss, on random data. For each
batch size, in one run: ``plain`` (both towers forward with a graph over
the whole batch, one backward) and ``cached`` (``stepkit.gradcache`` with
``--chunk`` rows per encoder pass).

    python benchmarks/gradcache.py                         # CPU, batches 64..512
    python benchmarks/gradcache.py --towers minilm         # MiniLM + LoRA text tower
    python benchmarks/gradcache.py --device cuda --batches 256,1024,4096,16384 --chunk 256
    python benchmarks/gradcache.py --batches 16,32 --chunk 8 --repeats 1   # smoke test (CI)

Memory: the bytes autograd holds for the backward pass at its peak
(``stepkit.monitor.SavedActivations``, any device) and, on CUDA, the
allocator's peak. Prints a table; writes benchmarks/results/gradcache_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkit import TrainState  # noqa: E402
from stepkit.gradcache import gradcache  # noqa: E402
from stepkit.losses.contrastive import LogitScale, clip_loss  # noqa: E402
from stepkit.models import SmallCNN  # noqa: E402
from stepkit.models.text import TinyTextEncoder  # noqa: E402
from stepkit.monitor import SavedActivations  # noqa: E402


class Towers(nn.Module):
    def __init__(self, text: nn.Module, dim: int = 128) -> None:
        super().__init__()
        self.image = SmallCNN(1, (32, 64, 128), pool=2, norm="group")
        self.text = text
        self.image_proj, self.text_proj = nn.Linear(self.image.dim, dim), nn.Linear(text.dim, dim)
        self.scale = LogitScale()

    def forward(self, batch):
        images, ids, mask = batch
        return (F.normalize(self.image_proj(self.image(images)), dim=-1),
                F.normalize(self.text_proj(self.text(ids, mask)), dim=-1))


def build(towers: str, device: torch.device) -> Towers:
    if towers == "minilm":
        from stepkit.models.text import PretrainedTextEncoder, add_lora

        text = PretrainedTextEncoder()
        text.model = add_lora(text.model, r=8, alpha=16.0)
        vocab = text.model.config.vocab_size
    else:
        vocab = 64
        text = TinyTextEncoder(vocab, dim=64)
    model = Towers(text).to(device)
    model.vocab = vocab
    return model


def make_batch(model: Towers, size: int, device: torch.device):
    g = torch.Generator().manual_seed(size)
    images = torch.rand(size, 1, 32, 32, generator=g)
    ids = torch.randint(2, model.vocab, (size, 12), generator=g)
    return images.to(device), ids.to(device), torch.ones_like(ids, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device) -> tuple[float, int, int]:
    """Seconds, peak saved-activation bytes, peak allocator bytes (CUDA; 0 on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    with SavedActivations() as saved:
        fn()
    sync(device)
    seconds = time.perf_counter() - t0
    allocated = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, saved.peak, allocated


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--towers", choices=("tiny", "minilm"), default="tiny")
    ap.add_argument("--batches", default="64,128,256,512")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.towers, device)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    loss_fn = lambda i, t: clip_loss(i, t, model.scale())  # noqa: E731

    def plain(batch):
        loss_fn(*model(batch)).backward()
        model.zero_grad(set_to_none=True)

    def cached(batch):
        gradcache(state, model, batch, loss_fn, chunk=args.chunk)
        model.zero_grad(set_to_none=True)

    rows = []
    for size in (int(b) for b in args.batches.split(",")):
        batch = make_batch(model, size, device)
        runs: dict[str, list[tuple[float, int, int]]] = {"plain": [], "cached": []}
        for r in range(args.repeats + 1):
            for name, fn in (("plain", plain), ("cached", cached)):
                result = measure(lambda fn=fn, batch=batch: fn(batch), device)
                if r > 0 or args.repeats == 0:  # round 0 warms up
                    runs[name].append(result)
        for name, results in runs.items():
            rows.append(dict(
                batch=size, method=name, chunk=args.chunk if name == "cached" else None,
                step_ms=round(statistics.median(r[0] for r in results) * 1e3, 2),
                saved_activations_mb=round(max(r[1] for r in results) / 2**20, 2),
                cuda_peak_mb=round(max(r[2] for r in results) / 2**20, 2),
            ))
    result = dict(
        benchmark="gradcache",
        towers=args.towers,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        repeats=args.repeats,
        rows=rows,
    )
    print(f"gradient caching vs plain, {args.towers} towers, on {result['device']} "
          f"({result['threads']} threads), "
          f"torch {torch.__version__}, {result['date']}, median of {args.repeats}")
    print(f"{'batch':>6} {'method':<8}{'step ms':>10}{'saved MB':>10}{'CUDA peak MB':>14}"
          f"{'time vs plain':>15}")
    plain_ms = {r["batch"]: r["step_ms"] for r in rows if r["method"] == "plain"}
    for row in rows:
        print(f"{row['batch']:>6} {row['method']:<8}{row['step_ms']:>10.1f}"
              f"{row['saved_activations_mb']:>10.1f}"
              f"{row['cuda_peak_mb']:>14.1f}{row['step_ms'] / plain_ms[row['batch']]:>14.2f}x")
    out = args.out or Path(__file__).parent / "results" / f"gradcache_{device.type}_{args.towers}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

"""Data preparation speed: on-device multi-crop against the step (``--case device``), image files
decoded and cropped per DataLoader worker against a plain Pillow pipeline (``--case files``), and what
stepkit's watched loader adds to a plain DataLoader per batch (``--case loader``).

``--case device``, in one run: ``stepkit.augment.multi_crop`` on batches of decoded images
already on the device (random resized crops, flip, colour jitter,
grayscale, blur, solarisation; DINO's 2 global + N local views), and the
stepkit DINO step of ``benchmarks/dino_step.py`` at the same size. Headroom
= augmentation images/s / step images/s: above 1 the step never waits on
augmentation (augmenting serially before each step costs 1/headroom of it).

    python benchmarks/data.py --device cuda                 # 256 px images -> 2x224 + 8x96, ViT-S/16 step
    python benchmarks/data.py --size tiny --steps 3         # smoke test (CPU, CI)

``--case files``: photo-like JPEGs the benchmark writes (500 x 375 and
1024 x 768), read one after the other in one process with one torch thread
(what one DataLoader worker does) into DINO's crops (2 x 224 at scale 0.4-1
+ 8 x 96 at 0.05-0.4, flipped): a plain Pillow pipeline (open, decode,
RandomResizedCrop on the full image with Pillow's bicubic resize, to tensor:
what torchvision-style loaders do), stepkit's ``read_crops`` on the files
(``TrainImages``), and the same images from tar shards (``ShardStream``).
Each is measured twice: with the files in the page cache (a small set read
again), and read from the disk (their cached pages dropped before every
pass, with ``posix_fadvise``: a set larger than memory, what shards are for).
Target: stepkit >= 1.5x the plain pipeline, shards >= folders from disk.

    python benchmarks/data.py --case files                  # 200 images of each size
    python benchmarks/data.py --case files --images 8       # smoke test (CI)

``--case loader``: ``stepkit.data.WatchedLoader`` (its batch timer armed,
``timeout=600``, as the recipes run it) against ``torch.utils.data.DataLoader``
over the same small in-memory samples, with 0 and 2 workers, rounds
alternating the two; the median round's microseconds per batch. Target: the
watched loader's extra cost per batch is small against any step (tens of
microseconds).

    python benchmarks/data.py --case loader
    python benchmarks/data.py --case loader --batches 20 --steps 1   # smoke test (CI)

``--case tar``: a shard of 500 x 375 JPEGs read by ``shard_samples`` (``tarfile`` in stream mode)
against the whole pipeline that turns its samples into DINO's crops (``ShardStream`` with
``ShardCrops``), one worker; the read's share bounds what any faster tar reader could gain: a reader
that took no time makes the pipeline at most ``1 / (1 - share)`` times as fast. Target: < 1.2x, so
the standard library reads the untrusted bytes (#42: a hand parser must win 1.2x to stay).

    python benchmarks/data.py --case tar
    python benchmarks/data.py --case tar --images 8 --steps 1   # smoke test (CI)

Prints a table; writes benchmarks/results/data_<device>_<size>.json
(``data_files_cpu.json`` for the files case, ``data_loader_cpu.json`` for the loader case).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dino_step import SIZES, Dino, stepkit_loop, sync  # noqa: E402

from stepkit.augment import MultiCrop, multi_crop, normalize  # noqa: E402
from stepkit.rundir import environment  # noqa: E402

IMAGE_SIZE = {"vit-s16": 256, "tiny": 40}


def timed(fn, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def photo(width: int, height: int, rng) -> bytes:
    """A photo-like JPEG: smooth colour fields, a few shapes and fine grain, quality 90."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                    Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, min(width, height) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(field).astype(np.float32) + rng.normal(0, 8, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def files_case(args) -> dict:
    """Decoded and cropped images per second per worker: plain Pillow, stepkit folders, stepkit shards."""
    import shutil
    import tarfile
    import tempfile

    import numpy as np
    from PIL import Image

    from stepkit.data import CropPlan, ShardCrops, ShardStream, TrainImages, crop_box

    torch.set_num_threads(1)  # a DataLoader worker's setting
    plan = CropPlan(views=((224, (0.4, 1.0)),) * 2 + ((96, (0.05, 0.4)),) * 8)

    def plain(path, rng):
        with Image.open(path) as image:
            image = image.convert("RGB")
        crops = []
        for size, scale in plan.views:
            left, top, w, h = crop_box(image.width, image.height, scale, plan.ratio, rng)
            crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
            if rng.random() < plan.flip_p:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crops.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
        return crops

    rows, folder = [], Path(tempfile.mkdtemp(prefix="stepkit-data-", dir=args.dir))
    # "disk": every pass reads its files from the disk (their pages evicted from the page cache first, as
    # for a data set larger than memory); "cache": from memory, as a small set read again is
    caches = ("cache", "disk") if hasattr(os, "posix_fadvise") else ("cache",)
    for width, height in ((500, 375), (1024, 768)):
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            paths.append(folder / f"{width}x{height}_{i:05d}.jpg")
            paths[-1].write_bytes(photo(width, height, rng))
        shard = folder / f"{width}x{height}.tar"
        with tarfile.open(shard, "w") as tar:
            for path in paths:
                tar.add(path, arcname=path.name)
        images = TrainImages(paths, plan, seed=0)
        stream = ShardStream([shard], ShardCrops(plan), seed=0)

        indices, shard_samples = range(len(paths)), iter(stream)  # the stream's epoch e: the e-th pass
        runs = {"plain": partial(_each, paths, plain), "folder": partial(_each, indices, None, images),
                "shards": partial(_each, indices, None, shard_samples)}
        files = {"plain": paths, "folder": paths, "shards": [shard]}
        os.sync()  # written pages are dirty until then, and dirty pages are not evicted
        for cache in caches:
            times = {name: [] for name in runs}
            for _ in range(args.steps):  # interleaved, so drift on a noisy machine hits all three alike
                for name, fn in runs.items():  # each pass draws new crops (a new epoch), as training does
                    if cache == "disk":
                        _evict(files[name])
                    t0 = time.perf_counter()
                    fn(epoch=len(times[name]) + (args.steps if cache == "disk" else 0))
                    times[name].append(time.perf_counter() - t0)
            rate = {name: len(paths) / statistics.median(t) for name, t in times.items()}
            for name, label in (("plain", "plain Pillow pipeline"), ("folder", "stepkit, image files"),
                                ("shards", "stepkit, tar shards")):
                rows.append(dict(image=f"{width}x{height}", read_from=cache, pipeline=label,
                                 images_per_s=round(rate[name], 1),
                                 vs_plain=round(rate[name] / rate["plain"], 2)))
    worst = min(r["vs_plain"] for r in rows if r["pipeline"] != "plain Pillow pipeline")
    ratios = {cache: round(min(a["images_per_s"] / b["images_per_s"] for a, b in zip(rows[2::3], rows[1::3])
                               if a["read_from"] == cache), 2) for cache in caches}
    result = dict(
        benchmark="data_files", crops="2x224 (0.4-1) + 8x96 (0.05-0.4), bicubic, flip 0.5",
        images_per_size=args.images, repeats=args.steps, cpu=environment()["cpu"], threads=1,
        torch=torch.__version__,
        pillow=Image.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        rows=rows, worst_vs_plain=worst, shards_vs_folders=ratios,
        meets_target=bool(worst >= 1.5 and ratios.get("disk", ratios["cache"]) >= 1.0),
    )
    print(f"image files -> DINO's crops, one worker (1 thread), {result['cpu']}, torch {torch.__version__}, "
          f"Pillow {result['pillow']}, {result['date']}; {args.images} JPEGs of each size, median of "
          f"{args.steps}")
    print(f"{'image':<10}{'read from':<11}{'pipeline':<26}{'images/s':>10}{'vs plain':>10}")
    for r in rows:
        print(f"{r['image']:<10}{r['read_from']:<11}{r['pipeline']:<26}{r['images_per_s']:>10.1f}"
              f"{r['vs_plain']:>9.2f}x")
    print(f"target: >= 1.5x the plain pipeline (worst {worst:.2f}x), shards >= folders read from disk "
          f"(shards / folders: " + ", ".join(f"{v:.2f}x from {k}" for k, v in ratios.items()) + "): "
          f"{'met' if result['meets_target'] else 'NOT met'}")
    shutil.rmtree(folder)
    out = args.out or Path(__file__).parent / "results" / "data_files_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


def _evict(paths) -> None:
    """Drop the files' pages from the page cache (no root needed: clean pages of one's own files)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _each(items, plain=None, source=None, *, epoch: int = 0) -> None:
    """Read every item of an epoch: through ``plain(path, rng)``, a ``TrainImages``
    (``source[(i, epoch)]``) or a stream (whose next pass is the next epoch)."""
    from stepkit.data import sample_rng

    for i, item in enumerate(items):
        if plain is not None:
            plain(item, sample_rng(0, epoch, i))
        elif hasattr(source, "__getitem__"):
            source[(item, epoch)]
        else:
            next(source)


def loader_case(args) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from stepkit.data import WatchedLoader

    samples = TensorDataset(torch.randn(args.batches * 16, 64), torch.arange(args.batches * 16))
    rows = []
    for workers in (0, 2):
        loaders = {"DataLoader": DataLoader(samples, batch_size=16, num_workers=workers),
                   "WatchedLoader": WatchedLoader(samples, batch_size=16, num_workers=workers, timeout=600)}
        rounds: dict[str, list[float]] = {name: [] for name in loaders}
        for r in range(args.steps + 1):  # round 0 warms up (workers started, pages touched)
            for name in sorted(loaders, reverse=bool(r % 2)):
                started = time.perf_counter()
                for _ in loaders[name]:
                    pass
                if r:
                    rounds[name].append((time.perf_counter() - started) / args.batches * 1e6)
        plain, watched = (statistics.median(rounds[n]) for n in ("DataLoader", "WatchedLoader"))
        rows.append(dict(workers=workers, dataloader_us=round(plain, 1), watched_us=round(watched, 1),
                         extra_us=round(watched - plain, 1)))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    result = dict(benchmark="data", case="loader", batches=args.batches, batch=16, rounds=args.steps,
                  torch=torch.__version__, date=date, rows=rows)
    print(f"microseconds per batch, {args.batches} batches of 16, median of {args.steps} rounds, "
          f"torch {torch.__version__}, {result['date']}")
    print(f"{'workers':>8}{'DataLoader':>12}{'WatchedLoader':>15}{'extra':>8}")
    for r in rows:
        print(f"{r['workers']:>8}{r['dataloader_us']:>12.1f}{r['watched_us']:>15.1f}{r['extra_us']:>8.1f}")
    out = args.out or Path(__file__).parent / "results" / "data_loader_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


def tar_case(args) -> dict:
    """What reading the tar costs in the whole shard pipeline: the bound on any faster tar reader."""
    import shutil
    import tarfile
    import tempfile

    import numpy as np

    from stepkit.data import CropPlan, ShardCrops, ShardStream, shard_samples

    torch.set_num_threads(1)  # a DataLoader worker's setting
    plan = CropPlan(views=((224, (0.4, 1.0)),) * 2 + ((96, (0.05, 0.4)),) * 8)
    folder = Path(tempfile.mkdtemp(prefix="stepkit-tar-", dir=args.dir))
    rng = np.random.default_rng(0)
    shard = folder / "0.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(args.images):
            members = ((f"{i:05d}.jpg", photo(500, 375, rng)), (f"{i:05d}.cls", str(i % 10).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = iter(ShardStream([shard], ShardCrops(plan), seed=0))
    runs = {"read": lambda: sum(1 for _ in shard_samples(shard)),
            "pipeline": lambda: [next(stream) for _ in range(args.images)]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.steps + 1):  # round 0 warms the page cache
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - started) / args.images * 1e3)
    read, whole = (statistics.median(times[n]) for n in ("read", "pipeline"))
    bound = whole / max(whole - read, 1e-9)  # a reader that took no time at all
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    result = dict(benchmark="data", case="tar", images=args.images, image="500x375 JPEG", rounds=args.steps,
                  cpu=environment()["cpu"], torch=torch.__version__, date=date, read_ms=round(read, 4),
                  pipeline_ms=round(whole, 3), read_share=round(read / whole, 4),
                  faster_reader_bound=round(bound, 3), meets_target=bool(bound < 1.2))
    print(f"ms per sample, {args.images} samples of one shard (500x375 JPEG + .cls) into DINO's crops, one "
          f"worker (1 thread), median of {args.steps}, {result['cpu']}, torch {torch.__version__}, {date}")
    print(f"tarfile stream read {read:.4f} ms; whole pipeline {whole:.3f} ms; read share {read / whole:.2%}; "
          f"a reader taking no time: at most {bound:.3f}x the pipeline (target: < 1.2x, tarfile stays)")
    shutil.rmtree(folder)
    out = args.out or Path(__file__).parent / "results" / "data_tar_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["device", "files", "loader", "tar"], default="device")
    ap.add_argument("--batches", type=int, default=2000, help="--case loader: batches a round")
    ap.add_argument("--images", type=int, default=200, help="--case files: JPEGs written of each size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-s16")
    ap.add_argument("--steps", type=int, default=None, help="repeats (default: 20; --case files: 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=None, help="--case files: where the JPEGs are written "
                    "(default: the temporary folder; pick one on the disk your data lives on)")
    args = ap.parse_args(argv)
    if args.case == "files":
        args.steps = args.steps or 5
        return files_case(args)
    if args.case == "loader":
        args.steps = args.steps or 5
        return loader_case(args)
    if args.case == "tar":
        args.steps = args.steps or 5
        return tar_case(args)
    args.steps = args.steps or 20
    device = torch.device(args.device)
    size = SIZES[args.size]
    crops = MultiCrop(global_size=size["global_size"], local_size=size["local_size"],
                      local_crops=size["local_crops"])
    g = torch.Generator().manual_seed(0)  # crop parameters are drawn on the host
    side = IMAGE_SIZE[args.size]
    images = torch.randint(0, 256, (size["batch"], 3, side, side), dtype=torch.uint8, device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def augment():
        return [normalize(v, mean, std) for v in multi_crop(images.float() / 255, crops, generator=g)]

    views = augment()
    torch.manual_seed(0)
    step = stepkit_loop(copy.deepcopy(Dino(size).to(device)), device, compiled=False)
    aug_s = timed(augment, device, args.steps, args.warmup)
    step_s = timed(lambda: step(views), device, args.steps, args.warmup)
    rows = [dict(stage=stage, ms=round(s * 1e3, 2), images_per_s=round(size["batch"] / s, 1))
            for stage, s in (("multi_crop (on device)", aug_s), ("DINO step (stepkit)", step_s))]
    headroom = step_s / aug_s
    result = dict(
        benchmark="data", size=args.size, image_size=side, crops=dict(global_size=crops.global_size,
        local_size=crops.local_size, local_crops=crops.local_crops), batch=size["batch"],
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(), torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        rows=rows, headroom=round(headroom, 2), meets_target=bool(headroom >= 1.0),
    )
    print(f"multi-crop augmentation vs the DINO step, {args.size} (batch {size['batch']} of {side} px "
          f"images -> "
          f"2x{crops.global_size} + {crops.local_crops}x{crops.local_size}) on {result['device']}, "
          f"torch {torch.__version__}, {result['date']}")
    print(f"{'stage':<26}{'ms':>10}{'images/s':>12}")
    for r in rows:
        print(f"{r['stage']:<26}{r['ms']:>10.1f}{r['images_per_s']:>12.1f}")
    print(f"headroom (augmentation rate / step rate): {headroom:.2f}x "
          f"({'the step never waits' if headroom >= 1 else 'augmentation is the bottleneck'})")
    out = args.out or Path(__file__).parent / "results" / f"data_{device.type}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return result


if __name__ == "__main__":
    main()

"""Image data sets for the recipes: training crops and evaluation views of folders, shards or the digits.

``image_sets`` turns ``--data.*`` and ``--eval.*`` flags into the training set and the labelled probe / test
sets DINO and I-JEPA read; ``random_images`` is its stand-in for tests and benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepkit import check as _check
from stepkit.config import may_change_on_resume
from stepkit.data.crops import CropPlan, center_view, read_crops, sample_rng
from stepkit.data.folders import (
    DECODE_ERRORS,
    LabelledFolder,
    drop_unreadable,
    find_images,
    labelled_folder,
    unreadable_error,
)
from stepkit.data.shards import class_field, image_field, json_texts, text_field

__all__ = ["TrainImages", "ShardCrops", "ShardPairs", "EvalImages", "ImageData", "find_image_data",
           "ImageDataConfig", "ProbeImagesConfig", "IMAGENET_MEAN", "IMAGENET_STD", "ImageSets", "image_sets",
           "random_images"]


class TrainImages:
    """Image files as training samples: ``dataset[(index, epoch)]`` -> ``(crops, index)``.

    The crops follow ``plan``, drawn from ``sample_rng(seed, epoch, index)``
    (use ``ResumableSampler(..., with_epoch=True)``). Unreadable files are
    checked up front (``drop_unreadable``); one that fails later raises
    ``UnreadableImage`` naming it.

    Args:
        paths: The image files.
        plan: The crops of each sample.
        seed: The run's seed.
        flag: The CLI flag the files came from, named in errors.

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (60, 40)).save(path)
        >>> images = TrainImages([path], CropPlan(views=((16, (0.5, 1.0)),)), seed=0)
        >>> crops, index = images[(0, 3)]
        >>> tuple(crops[0].shape), index
        ((3, 16, 16), 0)
    """

    with_epoch = True  # train_batches: sample (index, epoch) pairs

    def __init__(self, paths: Sequence[Path], plan: CropPlan, *, seed: int, flag: str = "data.root") -> None:
        self.paths, self.plan, self.seed, self.flag = list(paths), plan, seed, flag

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[list[Any], int]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)  # an index alone: epoch 0's crops
        try:
            return read_crops(self.paths[index], self.plan, sample_rng(self.seed, epoch, index)), index
        except DECODE_ERRORS as err:
            raise unreadable_error(self.paths[index], err, self.flag) from None


class ShardCrops:
    """``make_sample`` for image shards: ``(crops of the image, its .cls class or -1)``.

    A picklable callable (DataLoader workers may be started by spawning).

    Examples:
        >>> import io
        >>> from PIL import Image
        >>> from stepkit.data import CropPlan
        >>> buffer = io.BytesIO(); Image.new("RGB", (40, 30)).save(buffer, format="PNG")
        >>> crops, label = ShardCrops(CropPlan(views=((16, (0.5, 1.0)),)))(
        ...     {"png": buffer.getvalue(), "cls": b"3"}, sample_rng(0, 0, 0), "s.tar:a")
        >>> tuple(crops[0].shape), label
        ((3, 16, 16), 3)
    """

    def __init__(self, plan: Any) -> None:
        self.plan = plan

    def __call__(self, fields: dict[str, bytes], rng: Any, where: str) -> tuple[list[Any], int]:
        return _crops(fields, self.plan, rng, where), class_field(fields, where)


def _crops(fields: dict[str, bytes], plan: Any, rng: Any, where: str) -> list[Any]:
    """The sample's image decoded once and cut into ``plan``'s crops; ValueError naming it if unreadable."""
    image = image_field(fields, where)
    try:
        return read_crops(image, plan, rng)
    except DECODE_ERRORS as err:
        raise ValueError(
            f"{where}: not a readable image ({type(err).__name__}: {err}); pass "
            "--data.skip-unreadable to skip such samples (from --data.shards)"
        ) from None


class ShardPairs:
    """``make_sample`` for image-text shards (img2dataset's layout): ``(crops of the image, its caption)``,
    or ``(crops, its hard negatives, its caption)`` with ``negative_keys``.

    The caption is the sample's ``.txt``, else the ``"caption"`` of its ``.json``; the hard negatives are
    the texts under ``negative_keys`` of its ``.json``.

    Examples:
        >>> import io
        >>> from PIL import Image
        >>> from stepkit.data import CropPlan
        >>> buffer = io.BytesIO(); Image.new("RGB", (40, 30)).save(buffer, format="PNG")
        >>> crops, caption = ShardPairs(CropPlan(views=((16, (0.5, 1.0)),)))(
        ...     {"png": buffer.getvalue(), "txt": b"a black square"}, sample_rng(0, 0, 0), "s.tar:a")
        >>> tuple(crops[0].shape), caption
        ((3, 16, 16), 'a black square')
        >>> sample = {"png": buffer.getvalue(), "json": b'{"caption": "a black square", "neg": "a dog"}'}
        >>> with_negatives = ShardPairs(CropPlan(views=((16, (0.5, 1.0)),)), negative_keys=("neg",))
        >>> with_negatives(sample, sample_rng(0, 0, 0), "s.tar:a")[1:]
        (('a dog',), 'a black square')
    """

    def __init__(self, plan: Any, negative_keys: Sequence[str] = ()) -> None:
        self.plan, self.negative_keys = plan, tuple(negative_keys)

    def __call__(self, fields: dict[str, bytes], rng: Any, where: str) -> tuple[Any, ...]:
        caption = text_field(fields, where)  # before decoding: a sample without one is refused cheaply
        if not self.negative_keys:
            return _crops(fields, self.plan, rng, where), caption
        negatives = tuple(json_texts(fields, self.negative_keys, where))
        return _crops(fields, self.plan, rng, where), negatives, caption


class EvalImages:
    """Labelled image files for evaluation: ``dataset[i]`` -> ``(uint8 (3, size, size), label)``
    (``center_view``).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (60, 40)).save(path)
        >>> image, label = EvalImages([path], [3], size=16)[0]
        >>> tuple(image.shape), label
        ((3, 16, 16), 3)
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        *,
        size: int,
        resize: int | None = None,
        flag: str = "eval.val_root",
    ) -> None:
        self.paths, self.labels, self.flag = list(paths), list(labels), flag
        self.size, self.resize = size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            return center_view(self.paths[index], self.size, self.resize), self.labels[index]
        except DECODE_ERRORS as err:
            raise unreadable_error(self.paths[index], err, self.flag) from None


@dataclass
class ImageData:
    """What ``find_image_data`` found: the training files, the labelled evaluation sets, and notes.

    Examples:
        >>> ImageData([], None, None, [], ["evaluation: skipped"]).eval_train is None
        True
    """

    train: list[Path]
    eval_train: LabelledFolder | None
    """The probe's labelled training images (None: evaluation is skipped)."""
    eval_val: LabelledFolder | None
    """The held-out images, labelled with ``eval_train``'s class numbers."""
    skipped: list[Path]
    """Unreadable files left out (``--data.skip-unreadable``)."""
    notes: list[str]
    """Lines to print before training: what was found, and warnings."""


def find_image_data(
    root: str | os.PathLike | None,
    eval_train_root: str | os.PathLike | None = None,
    eval_val_root: str | os.PathLike | None = None,
    *,
    skip_unreadable: bool = False,
    check_up_to: int = 10_000,
) -> ImageData:
    """The training images under ``root`` (any layout) and the labelled sets the probe evaluates on.

    Training takes every image under ``root``, at any depth. Evaluation takes
    ``eval_train_root`` and ``eval_val_root`` (class-per-folder); without
    them, ``root`` itself when it is class-per-folder (two or more class
    folders, no image beside them) with ``val/`` beside it. Otherwise evaluation is skipped, and a
    note says how to get it. Held-out images are labelled by class *name*;
    those of a class the training set lacks are left out, with a warning.

    Args:
        root: ``--data.root`` (None: training reads elsewhere, e.g. shards; only the evaluation folders).
        eval_train_root: ``--eval.train-root`` (None: see above).
        eval_val_root: ``--eval.val-root`` (None: ``val`` beside ``root`` or the probe's training set).
        skip_unreadable: Leave unreadable files out (counted) instead of stopping.
        check_up_to: Decode every file up front when there are at most this many.

    Raises:
        ValueError: naming the flag, for a missing or empty folder, or one of the two evaluation
            folders without the other.
        UnreadableImage: naming the first unreadable file (unless ``skip_unreadable``).

    Examples:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> data = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("photos/1.png", "photos/trip/2.png"):
        ...     (data / name).parent.mkdir(parents=True, exist_ok=True)
        ...     Image.new("RGB", (8, 8)).save(data / name)
        >>> found = find_image_data(data / "photos")
        >>> len(found.train), found.eval_train is None
        (2, True)
        >>> print(found.notes[-1].split(";")[0])
        evaluation: skipped: data.root is not a labelled set (it is not one folder per class)
    """
    notes: list[str] = []
    train: list[Path] = []
    skipped: list[Path] = []
    folders: list[str] = []
    root = None if root is None else Path(root)
    if root is not None:
        train = find_images(root, flag="data.root")
        kept, skipped = drop_unreadable(
            train, skip=skip_unreadable, flag="data.root", check_up_to=check_up_to
        )
        train = [train[i] for i in kept]
        folders = sorted({p.relative_to(root).parts[0] for p in train if len(p.relative_to(root).parts) > 1})
        found = f"data.root {str(root)!r}: {len(train)} images ({len(folders)} sub-folders)"
        notes.append(found + (f"; {len(skipped)} unreadable files skipped" if skipped else ""))
    if eval_val_root is None and eval_train_root is not None:
        raise ValueError(
            "eval.val_root=None is not allowed with --eval.train-root: pass --eval.val-root DIR "
            "too (the held-out images, one sub-folder per class)"
        )
    if eval_train_root is None and root is None:
        if eval_val_root is not None:
            raise ValueError(
                "eval.train_root=None is not allowed with --eval.val-root: pass --eval.train-root "
                "DIR too (labelled images to fit the probe, one sub-folder per class)"
            )
        notes.append(
            "evaluation: skipped: pass --eval.train-root DIR and --eval.val-root DIR (one sub-folder "
            "per class) for the k-NN / linear probe"
        )
        return ImageData(train, None, None, skipped, notes)
    if eval_train_root is None:
        assert root is not None  # both None returned above
        val_beside = root.parent / "val"
        if len(folders) < 2 and eval_val_root is not None:
            raise ValueError(
                "eval.train_root=None is not allowed here: data.root is not one folder per "
                "class, so --eval.val-root needs --eval.train-root DIR (labelled images to fit the probe)"
            )
        loose = sum(len(p.relative_to(root).parts) == 1 for p in train)
        if len(folders) < 2 or loose:
            why = (
                f"{loose} images lie beside its sub-folders"
                if loose and len(folders) > 1
                else "it is not one folder per class"
            )
            notes.append(
                f"evaluation: skipped: data.root is not a labelled set ({why}); pass --eval.train-root "
                "DIR and --eval.val-root DIR (one sub-folder per class) for the k-NN / linear probe"
            )
            return ImageData(train, None, None, skipped, notes)
        if eval_val_root is None and not val_beside.is_dir():
            notes.append(
                f"evaluation: skipped: no held-out images ({str(val_beside)!r}, a 'val' folder beside "
                "--data.root, does not exist); pass --eval.val-root DIR"
            )
            return ImageData(train, None, None, skipped, notes)
        eval_train_root, train_flag = root, "data.root"
        if eval_val_root is None:
            eval_val_root, val_flag = val_beside, "eval.val_root (default: 'val' beside --data.root)"
        else:
            val_flag = "eval.val_root"
    else:
        train_flag, val_flag = "eval.train_root", "eval.val_root"
    assert eval_train_root is not None and eval_val_root is not None
    sets = []
    for folder, flag in ((Path(eval_train_root), train_flag), (Path(eval_val_root), val_flag)):
        labelled = labelled_folder(folder, flag=flag)
        bad: list[Path] = []
        if folder == root:  # data.root is the probe's set: checked above
            readable = set(train)
            keep = [i for i, p in enumerate(labelled.paths) if p in readable]
        else:
            keep, bad = drop_unreadable(labelled.paths, skip=skip_unreadable, flag=flag,
                                        check_up_to=check_up_to)
        skipped += bad
        labelled.paths = [labelled.paths[i] for i in keep]
        labelled.labels = [labelled.labels[i] for i in keep]
        if labelled.loose:
            notes.append(
                f"warning: {len(labelled.loose)} images directly in {flag.split(' ')[0]} "
                f"{str(folder)!r}, beside its class folders, are in no class: left out of evaluation"
            )
        sets.append(labelled)
    fit, held = sets
    index = {name: i for i, name in enumerate(fit.classes)}
    unknown = [name for name in held.classes if name not in index]
    missing = [name for name in fit.classes if name not in set(held.classes)]
    if unknown or missing:
        notes.append(
            f"warning: the evaluation's class folders differ: held-out only {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''} (their images left out), training only "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    pairs = [(p, index[held.classes[y]]) for p, y in zip(held.paths, held.labels) if held.classes[y] in index]
    if not pairs:
        raise ValueError(
            f"{val_flag}={str(held.root)!r} is not allowed: none of its classes "
            f"{held.classes[:5]} is among the training classes {fit.classes[:5]}"
        )
    held.paths, held.labels = [p for p, _ in pairs], [y for _, y in pairs]
    held.classes = fit.classes
    notes.append(
        f"evaluation: {len(fit.classes)} classes, {len(fit.paths)} labelled training images "
        f"({str(fit.root)!r}), {len(held.paths)} held-out ({str(held.root)!r})"
    )
    return ImageData(train, fit, held, skipped, notes)


@dataclass
class ImageDataConfig:
    """Where an image recipe's training images come from (its ``--data.*``; a recipe's ``Data``
    extends it with its crops' settings).

    Examples:
        >>> ImageDataConfig(root=Path("photos")).shards is None
        True
        >>> ImageDataConfig(root=Path("photos"), shards="d/{0..3}.tar")
        Traceback (most recent call last):
        ...
        ValueError: shards='d/{0..3}.tar' is not allowed: expected None when --data.root is set (one ...
    """

    root: Path | None = None
    """Training images: a folder of any layout, searched recursively (no labels needed; the probes'
    labelled images: --eval.train-root); None: the embedded digits."""
    shards: str | None = None
    """Training images from tar shards in the WebDataset layout, a brace pattern
    ('data/{0000..0127}.tar'); streamed, and resumed to the sample."""
    seed: int = 0
    """Embedded digits: the seed that draws each digit's placement."""
    workers: int = may_change_on_resume(default_factory=lambda: min(4, os.cpu_count() or 1))
    """DataLoader workers decoding and cropping image files (with --data.shards: fixed for the run)."""
    skip_unreadable: bool = False
    """Image files and shards: leave out what cannot be decoded (folders are checked before training;
    the count is in the summary) instead of stopping with an error naming the first one."""
    timeout: float = may_change_on_resume(600.0)
    """Seconds the loop waits for one batch before it stops, naming the DataLoader workers it waited for
    (a read hung on a network filesystem, a pipe); 0: wait forever."""

    def __post_init__(self) -> None:
        _check.integer_at_least("workers", self.workers, 0)
        _check.at_least("timeout", self.timeout, 0.0)  # finite: 0 is the way to wait forever
        if self.root is not None and self.shards is not None:
            _check.fail("shards", self.shards, "None when --data.root is set (one source of training images)")


@dataclass
class ProbeImagesConfig:
    """The labelled images an image recipe's probes read (its ``--eval.*``; a recipe's ``Eval`` extends
    it). Either may change on resume.

    Examples:
        >>> ProbeImagesConfig(k=5).train_root is None
        True
    """

    k: int = 20
    """k-NN: the neighbours that vote."""
    temperature: float = 0.07
    """k-NN: the temperature of their cosine-similarity weights."""
    train_root: Path | None = may_change_on_resume(None)
    """Image files: labelled images (one sub-folder per class) the probes are fitted on;
    None: --data.root itself when it is one folder per class."""
    val_root: Path | None = may_change_on_resume(None)
    """Image files: held-out labelled images; None: a 'val' folder beside --data.root."""
    online: bool = may_change_on_resume(True)
    """An online linear probe: a ridge-regression head fitted every 200 updates on the latest features of
    the probe images, 8 of them embedded an update in turn (never changing the training); online_acc in
    the log (on held-back probe images) and in the summary (on the held-out images): stepkit.online_probe."""

    def __post_init__(self) -> None:
        _check.integer_at_least("eval.k", self.k, 1)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageSets:
    """An image recipe's data: what it trains on, the labelled sets its probes read, and how to
    normalise them (what ``image_sets`` returns).

    Examples:
        >>> sets = ImageSets(train=None, probe=None, test=None, shards=None, files=True, channels=3,
        ...                  mean=IMAGENET_MEAN, std=IMAGENET_STD, probe_data={}, skipped=0)
        >>> sets.probe is None  # no labelled images: the recipe skips its probes
        True
    """

    train: Any
    """What ``stepkit.data.train_batches`` reads: a ``TensorDataset`` of ``(image, label)`` (the embedded
    digits), ``TrainImages`` (``(index, epoch) -> (crops, index)``), or with ``shards`` the sample maker
    ``ShardCrops``."""
    probe: Any | None
    """Labelled images the probes fit on (None: no labels; evaluation is skipped)."""
    test: Any | None
    """Held-out labelled images."""
    shards: list[Path] | None
    """The training shards, streamed by ``stepkit.data.streams`` (None: ``train``)."""
    files: bool
    """Images from files or shards (uint8, crops cut in DataLoader workers), not float tensors in memory."""
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    probe_data: dict
    """Where the probes' images come from: recorded with each checkpoint's parts (``stepkit eval``)."""
    skipped: int
    """Unreadable files left out before training."""

    def crops(self, batch: Any, plan: CropPlan, device: Any = "cpu") -> Iterator[Any]:
        """A training batch's crops, one ``(B, C, size, size)`` float tensor in [0, 1] on ``device`` per
        view of ``plan``, whatever the source: the crops the DataLoader workers cut from files and
        shards, or crops cut here from the images in memory (``stepkit.augment.random_resized_crop``
        with the plan's scale, ratio and flip, drawn from the global RNG).

        A generator: each view is cut when it is asked for, so a recipe that augments each view as it
        comes draws crop, colours, crop, colours... in one order for every run.

        Examples:
            >>> import torch
            >>> sets = random_images(4, 16, seed=0)
            >>> plan = CropPlan(views=((8, (0.5, 1.0)), (4, (0.1, 0.5))))
            >>> batch = (torch.stack([sets.train[i][0] for i in range(2)]), None)
            >>> [tuple(view.shape) for view in sets.crops(batch, plan)]
            [(2, 3, 8, 8), (2, 3, 4, 4)]
        """
        from stepkit.augment import random_resized_crop, to_unit

        if self.files:  # ([crop of each view], labels), cut in the workers
            for crop in batch[0]:
                yield to_unit(crop.to(device, non_blocking=True))
            return
        images = to_unit(batch[0].to(device, non_blocking=True))  # (images, labels)
        for size, scale in plan.views:
            yield random_resized_crop(images, size, scale=scale, ratio=plan.ratio, flip_p=plan.flip_p)


def image_sets(
    data: ImageDataConfig,
    probe: ProbeImagesConfig,
    *,
    plan: CropPlan,
    seed: int,
    eval_size: int,
    eval_resize: int | None,
    digits_size: int = 32,
    min_probe_images: int = 1,
) -> ImageSets:
    """The data of an image recipe (DINO, I-JEPA): image files, shards, or the embedded digits.

    With ``root`` or ``shards``: every image under ``root`` (``find_image_data``; its notes are
    printed on rank 0), cropped by ``plan`` from the full image in the DataLoader workers, or the
    shards of the brace pattern ``shards`` (checked against the ranks x workers that will read them);
    the probes' labelled sets at ``eval_size`` (the centre of the image resized to ``eval_resize``),
    ImageNet's normalisation. Without either: the embedded digits (``stepkit.data.digits_canvas``)
    as tensors, the probes fitting on the training split, normalised with mean and std 0.5.

    Args:
        data: ``--data.*``: ``root`` (any layout) or ``shards`` (a brace pattern), ``workers`` per rank
            (each reads its own shards), ``skip_unreadable``, and the embedded digits' ``seed``.
        probe: ``--eval.*``: the labelled folders ``train_root`` and ``val_root``.
        plan: The crops of each training sample.
        seed: The run's seed (each sample's crops draw from it).
        eval_size: The probe images' side.
        eval_resize: Their shorter side before the centre crop (None: ``eval_size``).
        digits_size: The embedded digits' side.
        min_probe_images: The probe needs at least this many labelled training images (the k of k-NN).

    Returns:
        The ``ImageSets``.

    Raises:
        ValueError: naming the flag, for missing folders, a shard pattern that matches nothing, too
            few shards for the readers, or fewer labelled images than ``min_probe_images``
            (``eval.k``).

    Examples:
        >>> plan = CropPlan(views=((16, (0.5, 1.0)),))
        >>> sets = image_sets(ImageDataConfig(), ProbeImagesConfig(), plan=plan, seed=0, eval_size=16,
        ...                   eval_resize=None, digits_size=16)
        >>> sets.files, sets.channels, sets.probe_data["kind"], len(sets.train) + len(sets.test)
        (False, 1, 'digits_canvas', 1797)
    """
    from stepkit import dist

    root, shards, workers = data.root, data.shards, data.workers
    train: Any
    if root is None and shards is None:
        from torch.utils.data import TensorDataset

        from stepkit.data.bundled import digits_canvas

        digits = digits_canvas(seed=data.seed, size=digits_size)
        train = TensorDataset(digits["train_images"], digits["train_labels"])
        sets = ImageSets(train=train, probe=train, shards=None, files=False, channels=1, mean=(0.5,),
                         std=(0.5,), test=TensorDataset(digits["test_images"], digits["test_labels"]),
                         probe_data={"kind": "digits_canvas", "seed": data.seed, "size": digits_size},
                         skipped=0)
    else:
        from stepkit.data.shards import check_readers, expand_shards

        found = find_image_data(root, probe.train_root, probe.val_root, skip_unreadable=data.skip_unreadable)
        shard_files = expand_shards(shards) if shards is not None else None
        if shard_files is not None:  # found now, not after the run directory is made
            check_readers(len(shard_files), world=dist.world_size(), workers=workers)
            found.notes.insert(0, f"data.shards {shards!r}: {len(shard_files)} shards, read by "
                                  f"{dist.world_size()} x {max(1, workers)} readers")
        fit = test = None
        probe_data: dict = {}
        if found.eval_train is not None and found.eval_val is not None:
            fit, test = (EvalImages(f.paths, f.labels, size=eval_size, resize=eval_resize)
                         for f in (found.eval_train, found.eval_val))
            # absolute: `stepkit eval` may run from another folder than the run did
            probe_data = {"kind": "folders", "train_root": os.path.abspath(found.eval_train.root),
                          "val_root": os.path.abspath(found.eval_val.root), "size": eval_size,
                          "resize": eval_resize if eval_resize is not None else eval_size}
        train = TrainImages(found.train, plan, seed=seed) if root is not None else ShardCrops(plan)
        sets = ImageSets(train=train, probe=fit, test=test, shards=shard_files, files=True, channels=3,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, probe_data=probe_data,
                         skipped=len(found.skipped))
        if dist.is_main():
            print("\n".join(found.notes), flush=True)
    if sets.probe is not None:
        _check_probe_size(len(sets.probe), min_probe_images)
    return sets


def _check_probe_size(labelled: int, min_probe_images: int) -> None:
    # found before the run directory is made, not after training
    if min_probe_images > labelled:
        _check.fail("eval.k", min_probe_images,
                    f"at most the number of labelled training images ({labelled})")


def random_images(n: int, size: int, seed: int, *, min_probe_images: int = 1) -> ImageSets:
    """``n`` random uint8 RGB images with random labels of 10 classes, for speed runs (the probes score
    chance): the probes fit on all of them and are scored on the first 64.

    Raises:
        ValueError: naming ``eval.k``, for fewer images than ``min_probe_images`` (the k of k-NN).

    Examples:
        >>> sets = random_images(100, 16, seed=0)
        >>> tuple(sets.train[0][0].shape), len(sets.test), sets.files
        ((3, 16, 16), 64, False)
    """
    _check_probe_size(n, min_probe_images)
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageSets(train=TensorDataset(pixels, labels), probe=TensorDataset(pixels, labels),
                     test=TensorDataset(pixels[:64], labels[:64]), shards=None, files=False, channels=3,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, probe_data={}, skipped=0)

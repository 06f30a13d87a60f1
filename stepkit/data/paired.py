"""Paired data sets for two-tower training: image-text or text-text pairs from the digits, files or shards.

``pair_sets`` turns ``--data.*`` flags (``PairDataConfig``) into what a two-tower recipe reads: the
training pairs, the held-out pairs its retrieval evaluation scores, and how to normalise the images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepkit import check as _check
from stepkit.config import may_change_on_resume
from stepkit.data.crops import CropPlan
from stepkit.data.images import EvalImages, ShardPairs, TrainImages

__all__ = ["PairDataConfig", "PairSets", "pair_sets", "pairs_record", "pairs_from_record", "batch_negatives",
           "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PairDataConfig:
    """Where a two-tower run's pairs come from (a recipe's ``--data.*``), checked when made.

    Examples:
        >>> PairDataConfig().pairs is None  # the embedded captioned digits
        True
        >>> PairDataConfig(kind="text-text")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: kind='text-text' is not allowed: expected image-text without --data.pairs (the digits ...
    """

    pairs: Path | None = None
    """Your pairs: a .csv / .tsv / .jsonl / .parquet file with an image path (relative to the file) and a
    caption per row, or two texts (--data.kind text-text); None: the embedded captioned digits."""
    kind: Literal["image-text", "text-text"] = "image-text"
    """text-text: anchor and positive texts (sentence-transformers' layout); the image tower is a second
    text tower of --model.text's kind."""
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    negative_columns: tuple[str, ...] = ()
    """Columns of hard negatives in --data.pairs (keys of each sample's .json in --data.shards): texts that
    answer no query of their row (e.g. negative_1 negative_2, as stepkit mine writes them); every one is a
    negative for every query of the batch."""
    shards: str | None = None
    """Your image-text pairs in tar shards (img2dataset's layout: key.jpg with key.txt, or the "caption"
    of key.json), a brace pattern such as 'data/{00000..00127}.tar': streamed in the DataLoader workers,
    resumable to the sample; needs held-out pairs (--data.val-shards or --data.val-pairs)."""
    val_shards: str | None = None
    """Held-out image-text shards for the retrieval evaluation (read once into memory)."""
    val_pairs: Path | None = None
    """Held-out pairs for the retrieval evaluation; None: a seeded val_fraction of --data.pairs' images."""
    val_fraction: float = 0.1
    image_column: str = "filepath"
    """The column (JSON key) of the image paths (open_clip's default)."""
    text_column: str = "title"
    """The column (JSON key) of the captions (open_clip's default)."""
    seed: int = 0
    """The seed that draws each digit's size and place (and so its caption)."""
    image_size: int = 32
    """The images' side. Your pairs: a random resized crop of crop_scale of the image's area (bicubic,
    no flip: captions may say left or right); held-out: the centre square."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    workers: int = may_change_on_resume(default_factory=lambda: min(4, os.cpu_count() or 1))
    """DataLoader workers decoding your pairs' images."""
    skip_unreadable: bool = False
    """Your pairs: leave out rows with a missing or unreadable image or an empty caption (the count is in
    the summary) instead of stopping with an error naming the first one."""
    timeout: float = may_change_on_resume(600.0)
    """Seconds the loop waits for one batch before it stops, naming the DataLoader workers it waited for
    (a read hung on a network filesystem, a pipe); 0: wait forever."""

    def __post_init__(self) -> None:
        fail = _check.fail
        _check.integer_at_least("image_size", self.image_size, 8)
        _check.integer_at_least("workers", self.workers, 0)
        _check.at_least("timeout", self.timeout, 0.0)  # finite: 0 is the way to wait forever
        if not 0.0 < self.val_fraction < 1.0:
            fail("val_fraction", self.val_fraction, "a number in (0, 1)")
        if self.kind == "text-text" and self.pairs is None:
            fail("kind", self.kind, "image-text without --data.pairs (the digits are images)")
        if self.pairs is not None and self.shards is not None:
            fail("shards", self.shards, "None with --data.pairs (one source of training pairs)")
        if self.val_pairs is not None and self.pairs is None and self.shards is None:
            fail("val_pairs", str(self.val_pairs), "None without --data.pairs (the digits have a split)")
        if self.val_shards is not None and self.shards is None:
            fail("val_shards", self.val_shards, "None without --data.shards")
        if self.negative_columns and self.pairs is None and self.shards is None:
            fail("negative_columns", self.negative_columns, "() without --data.pairs or --data.shards (hard "
                 "negatives are columns of a pairs file or keys of a shard sample's .json; the digits carry "
                 "none)")
        if self.shards is not None and self.kind == "text-text":
            fail("kind", self.kind, "image-text with --data.shards (shards hold images and captions)")
        if self.shards is not None and (self.val_shards is None) == (self.val_pairs is None):
            fail("val_shards", self.val_shards, "one source of held-out pairs with --data.shards: "
                 "--data.val-shards PATTERN or --data.val-pairs FILE (the retrieval evaluation's)")


_PATHS = ("pairs", "shards", "val_shards", "val_pairs")


def pairs_record(data: PairDataConfig, seed: int) -> dict[str, Any]:
    """What ``stepkit eval`` needs to rebuild a run's held-out pairs: the ``--data.*`` settings (paths
    made absolute, so it may run from any folder) and the run's seed (``pair_sets``' split).

    Examples:
        >>> record = pairs_record(PairDataConfig(image_size=16), seed=3)
        >>> record["kind"], record["seed"], pairs_from_record(record) == PairDataConfig(image_size=16)
        ('pairs', 3, True)
    """
    import dataclasses

    settings = dataclasses.asdict(data)
    for name in _PATHS:
        if settings[name] is not None:
            settings[name] = str(Path(settings[name]).expanduser().absolute())
    settings["crop_scale"] = list(settings["crop_scale"])
    return {"kind": "pairs", "settings": settings, "seed": seed}


def pairs_from_record(record: dict[str, Any]) -> PairDataConfig:
    """The ``PairDataConfig`` a ``pairs_record`` describes (its held-out split from ``record["seed"]``).

    Examples:
        >>> given = PairDataConfig(val_fraction=0.2)
        >>> pairs_from_record(pairs_record(given, seed=0)) == given
        True
    """
    settings = dict(record["settings"])
    for name in ("pairs", "val_pairs"):
        settings[name] = Path(settings[name]) if settings[name] is not None else None
    settings["crop_scale"] = tuple(settings["crop_scale"])
    return PairDataConfig(**settings)


@dataclass
class PairSets:
    """A two-tower run's data (what ``pair_sets`` returns).

    Examples:
        >>> sets = pair_sets(PairDataConfig(image_size=16), seed=0)
        >>> sets.channels, sets.mean, len(sets.train) == len(sets.train_texts), sets.shards is None
        (1, None, True, True)
    """

    train: Any
    """What ``stepkit.data.train_batches`` reads; a sample is ``(images, row)``: ``[crop]`` from files
    and shards, an image tensor from the digits, nothing but the row for text pairs. Streamed pairs carry
    their caption where the row would be, and their hard negatives between (``(images, negatives,
    caption)``; ``batch_negatives`` reads either)."""
    shards: list[Path] | None
    train_texts: list[str]
    """The training captions (positives), row by row ([] for shards: they stream)."""
    train_anchors: list[str] | None
    """Text-text: the anchors, row by row (None for image-text)."""
    test: Any | None
    """The held-out images, ``(image, id)`` (None for text-text)."""
    test_texts: list[str]
    test_anchors: list[str] | None
    test_pairs: tuple[Any, Any]
    """(query ids or anchors, targets): what ``stepkit.evaluation.paired_relevance`` matches."""
    channels: int
    """The images' channels (0 for text-text)."""
    mean: tuple[float, ...] | None
    """The images' normalisation (None: used as they are, in [0, 1])."""
    std: tuple[float, ...] | None
    files: bool
    """Images decoded from files or shards (uint8 crops cut in the DataLoader workers)."""
    skipped: int
    """Rows left out (``--data.skip-unreadable``)."""
    about: str
    """One line saying what was read (printed by the recipe; empty for the digits)."""
    train_negatives: list[list[str]] | None = None
    """With --data.negative-columns: each training row's hard negatives."""

    def images(self, batch: Any) -> Any:
        """A training batch's images, whatever the source (the first crop from files and shards).

        Examples:
            >>> import torch
            >>> sets = pair_sets(PairDataConfig(image_size=16), seed=0)
            >>> sets.images((torch.zeros(2, 1, 16, 16), torch.arange(2))).shape
            torch.Size([2, 1, 16, 16])
        """
        return batch[0][0] if self.files else batch[0]


def pair_sets(data: PairDataConfig, *, seed: int) -> PairSets:
    """The pairs of ``--data.*``: the embedded captioned digits, a pairs file (image-text or
    text-text), or image-text shards with held-out pairs or shards.

    Image files are cropped (``crop_scale``, no flip) in the DataLoader workers, each sample from its own
    seed; held-out images are the centre square; CLIP's normalisation. The digits are float tensors in
    memory, used as they are. Without ``--data.val-pairs`` a seeded ``val_fraction`` of the images (or
    positive texts) is held out.

    Args:
        data: ``--data.*``.
        seed: The run's seed (the held-out split, each sample's crops).

    Raises:
        ValueError: naming the flag and file, for unreadable pairs, shards or columns.

    Examples:
        >>> sets = pair_sets(PairDataConfig(image_size=16), seed=0)  # the embedded captioned digits
        >>> sets.train_texts[0].startswith("a "), sets.files
        (True, False)
    """
    from stepkit import dist
    from stepkit.data.bundled import digits_captioned
    from stepkit.data.pairs import read_pairs, read_text_pairs, split_pairs
    from stepkit.data.shards import check_readers, expand_shards, read_shard_pairs

    if data.pairs is None and data.shards is None:  # the embedded captioned digits, held in memory
        import torch
        from torch.utils.data import TensorDataset

        digits = digits_captioned(seed=data.seed, size=data.image_size)
        ids = digits["test_caption_ids"]
        return PairSets(
            train=TensorDataset(digits["train_images"], torch.arange(len(digits["train_captions"]))),
            shards=None, train_texts=digits["train_captions"], train_anchors=None,
            test=TensorDataset(digits["test_images"], ids), test_texts=digits["test_captions"],
            test_anchors=None, test_pairs=(range(len(ids)), ids.tolist()),  # equal ids: one caption
            channels=digits["train_images"].shape[1], mean=None, std=None, files=False, skipped=0, about="")
    if data.kind == "text-text":  # anchor / positive texts, tokenized once by the recipe
        import torch
        from torch.utils.data import TensorDataset

        assert data.pairs is not None  # PairDataConfig refuses text-text without pairs
        text_columns: dict[str, Any] = {"anchor_column": data.anchor_column,
                                        "positive_column": data.positive_column,
                                        "skip_unreadable": data.skip_unreadable}
        texts = read_text_pairs(data.pairs, negative_columns=data.negative_columns, **text_columns)
        if data.val_pairs is None:
            fit_texts, held_texts = split_pairs(texts, data.val_fraction, seed)
        else:
            fit_texts = texts
            held_texts = read_text_pairs(data.val_pairs, flag="data.val_pairs", **text_columns)
        skipped = len(texts.skipped) + len(held_texts.skipped)
        return PairSets(
            train=TensorDataset(torch.arange(len(fit_texts))), shards=None, train_texts=fit_texts.positives,
            train_anchors=fit_texts.anchors, train_negatives=fit_texts.negatives or None,
            test=None, test_texts=held_texts.positives,
            test_anchors=held_texts.anchors, test_pairs=(held_texts.anchors, held_texts.positives),
            channels=0, mean=None, std=None, files=False, skipped=skipped,
            about=f"data.pairs {str(data.pairs)!r}: {len(fit_texts)} training text pairs"
                  + (f" with {len(data.negative_columns)} hard negatives each" * bool(data.negative_columns))
                  + f", {len(held_texts)} held-out" + (f"; {skipped} rows skipped" if skipped else ""))
    columns: dict[str, Any] = {"image_column": data.image_column, "text_column": data.text_column,
               "skip_unreadable": data.skip_unreadable}
    plan = CropPlan(views=((data.image_size, data.crop_scale),), flip_p=0.0)
    shards = expand_shards(data.shards) if data.shards is not None else None
    train: Any
    train_texts: list[str]
    if shards is not None:  # captions stream with their images, tokenized a batch at a time
        check_readers(len(shards), world=dist.world_size(), workers=data.workers)
        train_texts, train, negatives = [], ShardPairs(plan, data.negative_columns), None
        about = f"{len(shards)} shards" + (f" with {len(data.negative_columns)} hard negatives a sample"
                                          * bool(data.negative_columns))
        if data.val_shards is None:
            assert data.val_pairs is not None  # PairDataConfig asks for one of the two
            held = read_pairs(data.val_pairs, flag="data.val_pairs", **columns)
        else:
            held = read_shard_pairs(expand_shards(data.val_shards, flag="data.val_shards"),
                                    skip_unreadable=data.skip_unreadable)
        skipped = len(held.skipped)
    else:
        assert data.pairs is not None  # neither shards nor pairs: the digits, above
        pairs = read_pairs(data.pairs, negative_columns=data.negative_columns, **columns)
        if data.val_pairs is None:
            fit, held = split_pairs(pairs, data.val_fraction, seed)
        else:
            fit, held = pairs, read_pairs(data.val_pairs, flag="data.val_pairs", **columns)
        train_texts = fit.texts
        train = TrainImages(fit.images, plan, seed=seed, flag="data.pairs")
        negatives = fit.negatives or None
        about = f"{len(fit)} training pairs of {len(set(fit.ids))} images" + (
            f" with {len(data.negative_columns)} hard negatives each" * bool(data.negative_columns))
        skipped = len(pairs.skipped) + len(held.skipped)
    source = f"data.{'shards' if shards else 'pairs'} {str(data.shards or data.pairs)!r}"
    return PairSets(
        train=train, shards=shards, train_texts=train_texts, train_anchors=None, train_negatives=negatives,
        test=EvalImages(held.images, held.ids, size=data.image_size, flag="data.pairs"),
        test_texts=held.texts, test_anchors=None, test_pairs=(held.ids, held.texts),  # ids number images
        channels=3, mean=CLIP_MEAN, std=CLIP_STD, files=True, skipped=skipped,
        about=f"{source}: {about}, {len(held)} held-out pairs of {len(set(held.ids))} images"
              + (f"; {skipped} rows skipped" if skipped else ""))


def batch_negatives(batch: Any, n: int) -> Any:
    """Where a training batch's hard negatives are, query by query (``n`` a query, in column order): the
    rows of a table tokenized up front (a pairs file's: row ``r``'s are ``r * n ... r * n + n - 1``), or
    the texts themselves (shards: streamed with their samples). ``stepkit.models.text.tokens_of`` takes
    either.

    Examples:
        >>> import torch
        >>> batch_negatives((torch.zeros(2, 1), torch.tensor([4, 1])), 2).tolist()  # rows 4 and 1
        [8, 9, 2, 3]
        >>> batch_negatives(([None], [("x1", "y1"), ("x2", "y2")], ["x", "y"]), 2)  # collated from shards
        ['x1', 'x2', 'y1', 'y2']
    """
    rows = batch[-1]
    if not isinstance(rows, (list, tuple)):  # row numbers
        import torch

        return (rows.view(-1, 1) * n + torch.arange(n)).flatten()
    return [text for per_query in zip(*batch[-2]) for text in per_query]

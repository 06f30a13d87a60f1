"""Data for the loop, in three layers that import one way: sources -> samples -> loading.

- sources: a user's arrays (``arrays``), the bundled sets (``bundled``), image folders (``folders``),
  pairs files (``pairs``), tar shards (``shards``);
- samples: crops and views of one image (``crops``), windows and tokens of sequences (``sequences``),
  the recipes' image data sets (``images``);
- loading: DataLoaders that end on a data error (``loader``), shard streams resumable to the sample
  (``streams``), the loop's batches and prefetch (``batches``).

A module imports only from the layers before its own (and earlier modules of its layer);
``tests/test_import.py`` checks the whole package graph. Every public name is importable from here.
"""

from __future__ import annotations

from stepkit.data.arrays import (
    FMRI_ARRAYS,
    MODALITIES,
    SERIES_ARRAYS,
    load_fmri_npz,
    load_series_npz,
)
from stepkit.data.batches import (
    Prefetch,
    ResumableSampler,
    TrainBatches,
    train_batches,
)
from stepkit.data.bundled import (
    CHAT_TOPICS,
    DIGIT_WORDS,
    HRF,
    PLACE_WORDS,
    SIZE_WORDS,
    UCR_UEA,
    chat_topics,
    digits_canvas,
    digits_captioned,
    read_ts,
    synthetic_fmri,
    ucr_uea,
    ucr_uea_dir,
)
from stepkit.data.crops import (
    CropPlan,
    center_view,
    crop_box,
    read_crops,
    sample_rng,
)
from stepkit.data.folders import (
    IMAGE_EXTENSIONS,
    LabelledFolder,
    UnreadableImage,
    drop_unreadable,
    find_images,
    labelled_folder,
    unreadable_error,
    unreadable_image,
)
from stepkit.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalImages,
    ImageData,
    ImageDataConfig,
    ImageSets,
    ProbeImagesConfig,
    ShardCrops,
    ShardPairs,
    TrainImages,
    find_image_data,
    image_sets,
    random_images,
)
from stepkit.data.loader import (
    WatchedLoader,
    end_loader_workers,
    end_workers,
    seeded_loader,
)
from stepkit.data.paired import (
    CLIP_MEAN,
    CLIP_STD,
    PairDataConfig,
    PairSets,
    pair_sets,
    pairs_from_record,
    pairs_record,
)
from stepkit.data.pairs import (
    PAIR_FILE_KINDS,
    Pairs,
    TextPairs,
    read_pairs,
    read_text_pairs,
    split_pairs,
)
from stepkit.data.sequences import (
    series_windows,
    time_blocks,
    tokenized_sentences,
    windowed_series,
)
from stepkit.data.shards import (
    ShardError,
    check_readers,
    class_field,
    expand_shards,
    image_field,
    read_shard_pairs,
    shard_samples,
    text_field,
)
from stepkit.data.streams import (
    ShardPositions,
    ShardStream,
    epoch_shards,
    resumable_stream,
)

__all__ = [
    "MODALITIES",
    "FMRI_ARRAYS",
    "load_fmri_npz",
    "SERIES_ARRAYS",
    "load_series_npz",
    "HRF",
    "synthetic_fmri",
    "digits_canvas",
    "DIGIT_WORDS",
    "SIZE_WORDS",
    "PLACE_WORDS",
    "digits_captioned",
    "UCR_UEA",
    "read_ts",
    "ucr_uea_dir",
    "ucr_uea",
    "CHAT_TOPICS",
    "chat_topics",
    "IMAGE_EXTENSIONS",
    "UnreadableImage",
    "unreadable_image",
    "find_images",
    "LabelledFolder",
    "labelled_folder",
    "drop_unreadable",
    "unreadable_error",
    "PAIR_FILE_KINDS",
    "Pairs",
    "TextPairs",
    "read_pairs",
    "read_text_pairs",
    "split_pairs",
    "ShardError",
    "expand_shards",
    "shard_samples",
    "check_readers",
    "image_field",
    "text_field",
    "class_field",
    "CropPlan",
    "crop_box",
    "sample_rng",
    "read_crops",
    "center_view",
    "series_windows",
    "windowed_series",
    "tokenized_sentences",
    "time_blocks",
    "TrainImages",
    "EvalImages",
    "ImageData",
    "find_image_data",
    "ImageDataConfig",
    "ProbeImagesConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSets",
    "image_sets",
    "random_images",
    "WatchedLoader",
    "seeded_loader",
    "end_workers",
    "end_loader_workers",
    "epoch_shards",
    "ShardPositions",
    "resumable_stream",
    "ShardStream",
    "ShardCrops",
    "ShardPairs",
    "read_shard_pairs",
    "ResumableSampler",
    "train_batches",
    "PairDataConfig",
    "PairSets",
    "pairs_record",
    "pairs_from_record",
    "pair_sets",
    "CLIP_MEAN",
    "CLIP_STD",
    "TrainBatches",
    "Prefetch",
]

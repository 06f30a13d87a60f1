"""stepkit.data.paired: a two-tower run's pairs from the digits, a pairs file or shards, in one shape."""

import pytest
import torch
from imagefiles import write_pairs, write_shards, write_text_pairs
from torch.utils.data import default_collate

from stepkit.data import CLIP_MEAN, PairDataConfig, ShardPairs, TrainImages, pair_sets


def test_the_digits_are_pairs_of_images_in_memory_and_their_captions():
    sets = pair_sets(PairDataConfig(image_size=16), seed=0)
    assert (sets.files, sets.channels, sets.mean, sets.shards, sets.about) == (False, 1, None, None, "")
    image, row = sets.train[5]
    assert tuple(image.shape) == (1, 16, 16) and int(row) == 5 and isinstance(sets.train_texts[5], str)
    queries, targets = sets.test_pairs
    assert len(queries) == len(sets.test) and len(targets) == len(sets.test)
    batch = default_collate([sets.train[i] for i in (0, 3)])
    assert torch.equal(sets.images(batch), torch.stack([sets.train[0][0], sets.train[3][0]]))


def test_a_pairs_file_is_split_by_image_and_cropped_in_the_workers(tmp_path):
    path = write_pairs(tmp_path, per_class=10)
    sets = pair_sets(PairDataConfig(pairs=path, image_size=16, val_fraction=0.2), seed=0)
    assert isinstance(sets.train, TrainImages) and sets.train.with_epoch and sets.files
    assert (sets.channels, sets.mean) == (3, CLIP_MEAN)
    assert len(sets.train) + len(sets.test) == 30 and len(sets.test) == len(sets.test_texts) == 6
    assert sets.about.startswith(f"data.pairs {str(path)!r}: 24 training pairs of 24 images, 6 held-out")
    crops, row = sets.train[(3, 0)]  # (index, epoch): that epoch's crop of sample 3
    assert tuple(crops[0].shape) == (3, 16, 16) and crops[0].dtype == torch.uint8 and row == 3
    batch = default_collate([sets.train[(i, 0)] for i in (0, 1)])
    assert tuple(sets.images(batch).shape) == (2, 3, 16, 16)  # the first (only) crop of each
    again = pair_sets(PairDataConfig(pairs=path, image_size=16, val_fraction=0.2), seed=0)
    assert again.test_texts == sets.test_texts  # a seeded split
    other = pair_sets(PairDataConfig(pairs=path, image_size=16, val_fraction=0.2), seed=1)
    assert other.test_texts != sets.test_texts


def test_text_pairs_have_anchors_and_no_images(tmp_path):
    path = write_text_pairs(tmp_path, 40)
    sets = pair_sets(PairDataConfig(pairs=path, kind="text-text", val_fraction=0.25), seed=0)
    assert (sets.channels, sets.test, sets.files) == (0, None, False)
    assert len(sets.train_anchors) == len(sets.train_texts) == len(sets.train)
    assert sets.test_pairs == (sets.test_anchors, sets.test_texts)
    assert sets.about.startswith(f"data.pairs {str(path)!r}: ") and "training text pairs" in sets.about


def test_shards_stream_their_captions_and_hold_out_shards(tmp_path):
    train = write_shards(tmp_path / "train", 2, 4)
    held = write_shards(tmp_path / "held", 1, 5, seed=1)
    sets = pair_sets(PairDataConfig(shards=train, val_shards=held, image_size=16, workers=0), seed=0)
    assert isinstance(sets.train, ShardPairs) and len(sets.shards) == 2 and sets.train_texts == []
    assert len(sets.test) == len(sets.test_texts) == 5 and sets.files
    assert sets.about.startswith(f"data.shards {train!r}: 2 shards, 5 held-out pairs")


def test_shard_negatives_come_with_their_sample_query_by_query(tmp_path):
    import tarfile

    from stepkit.data import batch_negatives, sample_rng, shard_samples

    train = write_shards(tmp_path / "train", 1, 6, negatives=2)
    held = write_shards(tmp_path / "held", 1, 2, seed=1)
    sets = pair_sets(PairDataConfig(shards=train, val_shards=held, image_size=16, workers=0,
                                    negative_columns=("negative_1", "negative_2")), seed=0)
    assert sets.about.startswith(f"data.shards {train!r}: 1 shards with 2 hard negatives a sample")
    shard = sets.shards[0]
    samples = [sets.train(fields, sample_rng(0, 0, i), f"{shard}:{key}")
               for i, (_, key, fields) in enumerate(shard_samples(shard))]
    batch = default_collate(samples)  # as the DataLoader collates them: [crops], negatives, captions
    assert list(batch[-1]) == [caption for _, _, caption in samples]
    expected = [text for _, negatives, _ in samples for text in negatives]  # query 0's two, query 1's, ...
    assert batch_negatives(batch, 2) == expected and len(set(expected)) == 3  # not every query alike
    for (_, negatives, caption) in samples:
        assert caption not in negatives
    with tarfile.open(shard) as tar:  # a sample without a key: one line naming it and the flag
        first = [m for m in tar.getmembers() if m.name.startswith(tar.getmembers()[0].name.split(".")[0])]
        fields = {m.name.split(".")[-1]: tar.extractfile(m).read() for m in first}
    said = r"^s.tar:k.json: no text under 'negative_3' \(--data.negative-columns\)$"
    with pytest.raises(ValueError, match=said):
        ShardPairs(sets.train.plan, ("negative_1", "negative_3"))(fields, sample_rng(0, 0, 0), "s.tar:k")


@pytest.mark.parametrize(("fields", "message"), [
    ({"kind": "text-text"}, "kind='text-text' is not allowed: expected image-text without --data.pairs"),
    ({"shards": "a/{0..1}.tar"}, "val_shards=None is not allowed: expected one source of held-out pairs"),
    ({"val_fraction": 1.0}, r"val_fraction=1.0 is not allowed: expected a number in \(0, 1\)"),
])
def test_bad_flags_are_refused_in_one_line_naming_them(fields, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        PairDataConfig(**fields)

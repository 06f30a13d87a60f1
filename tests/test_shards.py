"""stepkit.shards: WebDataset tar shards, read once an epoch by every rank and worker, resumed exactly."""

import hashlib
import io
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from imagefiles import add_member, encoded, picture, write_shards
from PIL import Image
from torch.utils.data import DataLoader

from stepkit.data import (
    CropPlan,
    ShardCrops,
    ShardError,
    ShardPositions,
    ShardStream,
    class_field,
    expand_shards,
    shard_samples,
    text_field,
)


def key_of(fields, rng, where):
    """A sample as its key (``shard.tar:key``): what the tests count."""
    return where.rsplit("/", 1)[1]


def keyed_draw(fields, rng, where):
    return where.rsplit("/", 1)[1], float(rng.random())


def small_shards(tmp_path, shards=4, per_shard=5):
    """Shards of tiny members (no images): fast to read."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(tmp_path / f"{s:04d}.tar", "w") as tar:
            for i in range(per_shard + s):  # shards of different lengths
                add_member(tar, f"k{s}_{i:03d}.txt", f"sample {s} {i}".encode())
                add_member(tar, f"k{s}_{i:03d}.cls", str(i % 3).encode())
    return expand_shards(str(tmp_path / f"{{0000..{shards - 1:04d}}}.tar"))


def test_a_sample_is_the_members_that_share_a_key(tmp_path):
    path = tmp_path / "0.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("dir/a.b.jpg", "dir/a.b.txt", "dir/c.JPG", "README", "dir/c.json"):
            add_member(tar, name, name.encode())
    samples = list(shard_samples(path))
    assert [(n, key, sorted(f)) for n, key, f in samples] == [(0, "dir/a", ["b.jpg", "b.txt"]),
                                                              (1, "dir/c", ["jpg", "json"])]
    assert list(shard_samples(path, start=1))[0][0] == 1


SEGMENT = st.text(alphabet="abcXYZ019_-é漢 ", min_size=1, max_size=70)


@st.composite
def tar_samples(draw):
    """Samples with distinct keys (nested, long, non-ASCII paths) and their members' bytes."""
    keys = draw(st.lists(st.lists(SEGMENT, min_size=1, max_size=3).map("/".join), min_size=1, max_size=6,
                         unique=True))
    return [(key, draw(st.dictionaries(st.sampled_from(["jpg", "txt", "json", "cls", "b.txt", "PNG"]),
                                       st.binary(max_size=1100), min_size=1, max_size=3))) for key in keys]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=tar_samples(), start=st.integers(0, 6), gzipped=st.booleans(),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
@example(samples=[("d" * 80 + "/" + "k" * 60, {"jpg": b"1"}), ("é" * 40, {"txt": b""})], start=0,
         fmt=tarfile.USTAR_FORMAT, gzipped=False)  # paths over 100 bytes: ustar's prefix field
@example(samples=[("d" * 80 + "/" + "k" * 60, {"jpg": b"1"}), ("é" * 90, {"txt": b""})], start=1,
         fmt=tarfile.GNU_FORMAT, gzipped=True)  # GNU's long-name members
def test_shard_samples_read_what_tarfile_wrote_in_every_tar_format(tmp_path, samples, fmt, start, gzipped):
    path = tmp_path / "0.tar"
    try:
        with tarfile.open(path, "w:gz" if gzipped else "w", format=fmt) as tar:
            for i, (key, fields) in enumerate(samples):
                if i % 2:  # directories and links between samples are passed over
                    folder = tarfile.TarInfo(f"{key}-d")
                    folder.type = tarfile.DIRTYPE
                    link = tarfile.TarInfo(f"{key}-l.txt")
                    link.type = tarfile.SYMTYPE
                    link.linkname = "elsewhere" if fmt == tarfile.USTAR_FORMAT else key  # GNU: long links
                    tar.addfile(folder)
                    tar.addfile(link)
                for ext, data in fields.items():
                    add_member(tar, f"{key}.{ext}", data)
    except ValueError:  # ustar has no room for this path
        assert fmt == tarfile.USTAR_FORMAT
        return
    expected = [(n, key, {ext.lower(): data for ext, data in fields.items()})
                for n, (key, fields) in enumerate(samples) if n >= start]
    assert list(shard_samples(path, start=start)) == expected


def test_shard_patterns_expand_and_missing_shards_are_named(tmp_path):
    shards = small_shards(tmp_path)
    assert [p.name for p in shards] == ["0000.tar", "0001.tar", "0002.tar", "0003.tar"]
    with pytest.raises(ValueError, match=r"data.shards='.*\{0004..0009\}.tar' is not allowed: it matches no "
                                         r"file \(the first it names: '.*0004.tar'\)"):
        expand_shards(str(tmp_path / "{0004..0009}.tar"))
    with pytest.raises(ValueError, match=r"2 of its 6 shards do not exist \(first: '.*0004.tar'\)"):
        expand_shards(str(tmp_path / "{0000..0005}.tar"))


@pytest.mark.parametrize("cut", [700, 1500, 2000])
def test_a_shard_cut_off_anywhere_is_named_with_its_last_member(tmp_path, cut):
    path = small_shards(tmp_path, shards=1)[0]
    whole = path.read_bytes()
    path.write_bytes(whole[:cut])  # mid-member data, mid-header, or before the end-of-archive blocks
    with pytest.raises(ShardError, match=r"0000.tar: cut off or not a tar shard (after member 'k0_.*'|at its "
                                         r"start) .*--data.shards"):
        list(shard_samples(path))
    assert path.read_bytes() == whole[:cut]  # read only


def test_a_file_that_is_not_a_tar_is_named(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"hello" * 300)
    with pytest.raises(ShardError, match="0.tar: cut off or not a tar shard at its start"):
        list(shard_samples(tmp_path / "0.tar"))


def test_a_header_with_a_negative_size_is_refused_not_looped_over(tmp_path):
    header = bytearray(tarfile.TarInfo("a.txt").tobuf(format=tarfile.USTAR_FORMAT)[:512])
    header[124:136] = b"-0001000000\0"  # a reader following it would seek back before this header
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    path = tmp_path / "0.tar"
    path.write_bytes(bytes(header) + bytes(1024))
    with pytest.raises(ShardError, match=r"0.tar: cut off or not a tar shard at its start \(invalid header"):
        list(shard_samples(path))


@pytest.mark.parametrize("compress", ["gzip", "bz2", "lzma"])
def test_a_shard_compressed_with_gzip_bzip2_or_xz_reads_as_the_tar(tmp_path, compress):
    import importlib

    small_shards(tmp_path / "s", shards=1)
    plain = tmp_path / "s" / "0000.tar"
    path = tmp_path / "0000.tar.z"
    path.write_bytes(importlib.import_module(compress).compress(plain.read_bytes()))
    assert list(shard_samples(path)) == list(shard_samples(plain)) and len(list(shard_samples(plain))) > 1


def test_a_shard_compressed_with_zstd_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "0000.tar.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(600))  # zstd's magic number
    expected = (r"0000.tar.zst: cut off or not a tar shard at its start \(compressed with zstd: decompress "
                r"it first \(stepkit reads tar shards as they are or compressed with gzip, bzip2 or xz\)\)")
    with pytest.raises(ShardError, match=expected):
        list(shard_samples(path))


def test_a_tar_that_stops_between_members_is_cut_off_though_tarfile_lets_it_pass(tmp_path):
    path = small_shards(tmp_path, shards=1)[0]
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        boundary = tar.getmembers()[2].offset  # where the third member's header starts
    path.write_bytes(whole[:boundary])
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 2  # the standard library reads it as a whole tar
    with pytest.raises(ShardError, match=r"0000.tar: cut off or not a tar shard after member .* \(no "
                                         r"end-of-archive marker\)"):
        list(shard_samples(path))


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_a_gzipped_shard_cut_off_is_named(tmp_path, cut):
    import gzip

    small_shards(tmp_path / "s", shards=1)
    path = tmp_path / "0000.tar.gz"
    whole = gzip.compress((tmp_path / "s" / "0000.tar").read_bytes())
    path.write_bytes(whole[:int(cut * len(whole))])
    with pytest.raises(ShardError, match=r"0000.tar.gz: cut off or not a tar shard .*--data.shards"):
        list(shard_samples(path))


def epoch_keys(shards, *, world, workers, epochs=1, seed=0, start=None, first=0):
    """Every rank's samples, read as the recipes read them, with their places: {rank: [(key, place)]}."""
    out = {}
    for rank in range(world):
        stream = ShardStream(shards, key_of, seed=seed, rank=rank, world=world, workers=workers,
                             positions=None if start is None else start[rank], first_worker=first)
        got, reader_epoch = [], [0] * max(1, workers)
        for batch, (keys, places, _) in enumerate(DataLoader(stream, batch_size=2, num_workers=workers)):
            got += [(k, tuple(p.tolist())) for k, p in zip(keys, places)]
            reader_epoch[batch % len(reader_epoch)] = int(places[0, 0])  # batches come round-robin
            if min(reader_epoch) >= epochs:  # every reader is past the epochs asked for
                break
        out[rank] = got
    return out


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 2), (2, 1)])
def test_every_sample_is_read_exactly_once_per_epoch_across_ranks_and_workers(tmp_path, world, workers):
    shards = small_shards(tmp_path)
    every = [f"{p.name}:{key}" for p in shards for _, key, _ in shard_samples(p)]
    read = epoch_keys(shards, world=world, workers=workers, epochs=2)
    for epoch in (0, 1):
        seen = Counter(k for got in read.values() for k, place in got if place[0] == epoch)
        assert sorted(seen) == sorted(every) and set(seen.values()) == {1}


def test_epochs_deal_the_shards_out_in_a_new_order(tmp_path):
    shards = small_shards(tmp_path, shards=8)
    read = epoch_keys(shards, world=1, workers=0, epochs=2)[0]
    order = [[k.split(":")[0] for k, p in read if p[0] == e] for e in (0, 1)]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])


def test_too_few_shards_for_the_readers_names_the_workers_flag(tmp_path):
    shards = small_shards(tmp_path, shards=3)
    expected = r"data.workers=2 is not allowed: expected at most 1 with 3 shards over 2 ranks"
    with pytest.raises(ValueError, match=expected):
        ShardStream(shards, key_of, seed=0, rank=0, world=2, workers=2)


@pytest.mark.parametrize("workers, stop", [(0, 3), (2, 3), (2, 4), (3, 7)])
def test_a_resumed_stream_continues_with_the_very_next_batch(tmp_path, workers, stop):
    shards = small_shards(tmp_path)
    batches = iter(DataLoader(ShardStream(shards, keyed_draw, seed=1, workers=workers), batch_size=3,
                              num_workers=workers))
    whole = [next(batches) for _ in range(stop + 6)]
    positions = ShardPositions(workers)
    for consumed, (_, places, skipped) in enumerate(whole[:stop], start=1):  # what the loop records
        positions.update(places, skipped, consumed)
    saved = positions.tensor.clone()  # a checkpoint, then a crash
    again = ShardPositions(workers, saved)
    resumed = iter(DataLoader(ShardStream(shards, keyed_draw, seed=1, workers=workers, positions=again.start,
                                          first_worker=stop % again.workers), batch_size=3,
                              num_workers=workers))
    for expected in whole[stop:]:
        (keys, draws), places, _ = next(resumed)
        assert list(keys) == list(expected[0][0]) and torch.equal(draws, expected[0][1])
        assert torch.equal(places, expected[1])


def test_a_resume_with_other_workers_is_refused_naming_the_flag():
    expected = r"data.workers=3 is not allowed: expected 2, the number this run was started with"
    with pytest.raises(ValueError, match=expected):
        ShardPositions(3, torch.zeros(2, 4, dtype=torch.int64))


def test_the_crops_of_a_sample_do_not_depend_on_the_workers(tmp_path):
    pattern = write_shards(tmp_path / "s", 4, 3)
    plan = CropPlan(views=((16, (0.3, 1.0)),) * 2 + ((8, (0.1, 0.3)),))
    crops = {}
    for workers in (0, 2, 4):
        stream = ShardStream(expand_shards(pattern), ShardCrops(plan), seed=3, workers=workers)
        digests = set()
        # 18 batches of 2: three epochs of the 12 samples, so every reader is past epoch 0
        for (views, _), places, _ in islice(DataLoader(stream, batch_size=2, num_workers=workers), 18):
            for i, place in enumerate(places.tolist()):
                if place[0] == 0:
                    digests.add(hashlib.sha256(b"".join(v[i].numpy().tobytes() for v in views)).hexdigest())
        crops[workers] = digests
    assert len(crops[0]) == 12 and crops[0] == crops[2] == crops[4]


def broken_shard(tmp_path):
    """One shard: a good sample, one whose image is not an image, a good one."""
    rng = np.random.default_rng(0)
    path = tmp_path / "0000.tar"
    with tarfile.open(path, "w") as tar:
        for key, data in (("a", encoded(picture(0, rng), "JPEG")), ("b", b"not a jpeg"),
                          ("c", encoded(picture(1, rng), "PNG"))):
            add_member(tar, f"{key}.{'png' if key == 'c' else 'jpg'}", data)
            add_member(tar, f"{key}.cls", b"1")
    return path


def test_an_unreadable_sample_is_named_or_skipped_and_counted(tmp_path):
    path = broken_shard(tmp_path)
    plan = CropPlan(views=((8, (0.5, 1.0)),))
    with pytest.raises(ValueError, match=r"0000.tar:b: not a readable image .*--data.skip-unreadable"):
        list(zip(range(3), ShardStream([path], ShardCrops(plan), seed=0)))
    stream = ShardStream([path], ShardCrops(plan), seed=0, skip_unreadable=True)
    (_, first), (_, second) = [(s, (p, k)) for (s, p, k), _ in zip(stream, range(2))]
    assert first[0].tolist() == [0, 0, 0] and first[1] == 0
    assert second[0].tolist() == [0, 0, 2] and second[1] == 1  # b skipped, counted with the next sample


def test_fields_text_and_class():
    assert text_field({"txt": b"a cat"}, "s:a") == "a cat"
    assert text_field({"json": b'{"caption": "a dog"}'}, "s:a") == "a dog"
    with pytest.raises(ValueError, match="s:a: empty caption"):
        text_field({"txt": b"  "}, "s:a")
    with pytest.raises(ValueError, match=r"s:a: no text member \(expected one of .txt, .json; found .jpg\)"):
        text_field({"jpg": b""}, "s:a")
    with pytest.raises(ValueError, match=r"s:a.cls: not an integer class"):
        class_field({"cls": b"cat"}, "s:a")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match=r"s:a: no image member \(expected one of .jpg"):
        ShardCrops(CropPlan(views=((4, (0.5, 1.0)),)))({"txt": b"x"}, np.random.default_rng(0), "s:a")


@pytest.mark.parametrize("content", ["empty", "broken"])
def test_shards_with_nothing_readable_stop_instead_of_spinning(tmp_path, content):
    path = tmp_path / "0000.tar"
    if content == "empty":
        with tarfile.open(path, "w"):
            pass
    else:
        path.write_bytes(b"not a tar at all" * 64)
    stream = ShardStream([path], key_of, seed=0, skip_unreadable=True)
    with pytest.raises(ValueError, match=r"data.shards: no readable sample in a whole epoch of the shards "
                                         r".*0000.tar \(this reader's share\)"):
        next(iter(stream))


def test_image_text_samples_give_crops_and_caption_and_name_a_missing_caption(tmp_path):
    from stepkit.data import ShardPairs, read_shard_pairs

    rng = np.random.default_rng(0)
    plan = CropPlan(views=((16, (0.5, 1.0)),))
    image = encoded(picture(0, rng), "JPEG")
    crops, caption = ShardPairs(plan)({"jpg": image, "json": b'{"caption": "a disc"}'}, rng, "s.tar:k")
    assert tuple(crops[0].shape) == (3, 16, 16) and caption == "a disc"
    with pytest.raises(ValueError, match=r"^s.tar:k: no text member \(expected one of .txt, .json; found"):
        ShardPairs(plan)({"jpg": image}, rng, "s.tar:k")
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        add_member(tar, "a.jpg", image)
        add_member(tar, "a.txt", b"a disc")
        add_member(tar, "b.jpg", image)  # no caption
        add_member(tar, "c.jpg", image)
        add_member(tar, "c.txt", b"a bar")
    with pytest.raises(ValueError, match=r"val.tar:b: no text member"):
        read_shard_pairs([tmp_path / "val.tar"])
    held = read_shard_pairs([tmp_path / "val.tar"], skip_unreadable=True)
    assert held.texts == ["a disc", "a bar"] and held.images == [image, image] and len(held.skipped) == 1


def test_an_image_text_sample_ignores_a_cls_member_it_has_no_use_for():
    from stepkit.data import ShardPairs

    rng = np.random.default_rng(0)
    fields = {"jpg": encoded(picture(1, rng), "JPEG"), "txt": b"a bar", "cls": b"bar"}  # not an integer
    crops, caption = ShardPairs(CropPlan(views=((16, (0.5, 1.0)),)))(fields, rng, "s.tar:k")
    assert caption == "a bar" and tuple(crops[0].shape) == (3, 16, 16)

"""stepkit.data.bundled: the data sets inside installed packages (digits, fMRI, UCR / UEA, chat), offline."""

import importlib.util

import numpy as np
import pytest
import torch

from stepkit.data import UCR_UEA, bundled, chat_topics, read_ts, synthetic_fmri, ucr_uea


def test_read_ts_parses_channels_labels_and_missing_values(tmp_path):
    path = tmp_path / "x.ts"
    path.write_text("# a comment line\n@problemName x\n@univariate false\n@data\n"
                    "1,2:3,4:up\n\n5,?:7,8:down\n")
    series, labels = read_ts(path)
    assert labels == ["up", "down"]
    np.testing.assert_array_equal(series[0], [[1, 2], [3, 4]])
    assert np.isnan(series[1][0, 1]) and series[1][1].tolist() == [7, 8]


@pytest.mark.parametrize(("text", "message"), [
    ("@problemName x\n1,2:a\n", "no @data line"),
    ("@data\n1,2:3:a\n", "line 2: channels of different lengths \\[2, 1\\]"),
    ("@data\n1,2:a\n1,2:3,4:b\n", "line 3: 2 channels; the first series has 1"),
    ("@data\n1,x:a\n", "line 2: could not convert"),
    ("@data\n\n", "no series after @data"),
])
def test_read_ts_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.ts"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_ts(path)
    assert str(path) in str(err.value)


def test_every_listed_ucr_uea_set_loads_with_the_archive_split():
    sizes = {"GunPoint": (50, 150, 1, 150, 2), "OSULeaf": (200, 242, 1, 427, 6),
             "BasicMotions": (40, 40, 6, 100, 4), "ArrowHead": (36, 175, 1, 251, 3),
             "ItalyPowerDemand": (67, 1029, 1, 24, 2), "JapaneseVowels": (270, 370, 12, None, 9)}
    assert set(sizes) == set(UCR_UEA)
    for name, (train, test, channels, length, classes) in sizes.items():
        data = ucr_uea(name)
        counts = (len(data["train_series"]), len(data["test_series"]), len(data["classes"]))
        assert counts == (train, test, classes)
        assert {s.shape[0] for s in data["train_series"]} == {channels}
        if length is not None:
            assert {s.shape[1] for s in data["train_series"] + data["test_series"]} == {length}
        assert set(data["train_labels"].tolist()) == set(range(classes))


def test_an_unknown_set_lists_the_known_ones():
    with pytest.raises(ValueError, match="data.name='Nope' is not allowed: expected one of 'ArrowHead'"):
        ucr_uea("Nope")


def test_without_sktime_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'stepkit\[timeseries\]'"):
        bundled.ucr_uea_dir()


def test_chat_topics_are_stratified_and_never_pretrain_on_the_held_out_sentences():
    data = chat_topics(("ai", "emotion", "trivia"), per_topic=50, test_fraction=0.3, seed=1)
    assert data["classes"] == ["ai", "emotion", "trivia"]
    assert np.bincount(data["test_labels"]).tolist() == [15, 15, 15]
    assert np.bincount(data["train_labels"]).tolist() == [35, 35, 35]
    assert not set(data["test_texts"]) & set(data["unlabelled_texts"])
    assert set(data["train_texts"]) <= set(data["unlabelled_texts"])
    again = chat_topics(("ai", "emotion", "trivia"), per_topic=50, test_fraction=0.3, seed=1)
    assert again["test_texts"] == data["test_texts"]  # a seeded draw
    assert chat_topics(("ai", "emotion", "trivia"), per_topic=50, seed=2)["test_texts"] != data["test_texts"]


def test_an_unknown_topic_lists_the_corpus_topics():
    with pytest.raises(ValueError, match="data.topics: no topic 'cooking'; topics: .*ai.*"):
        chat_topics(("ai", "cooking"))


def test_synthetic_fmri_is_seeded_and_shaped():
    a, b = (synthetic_fmri(seed=3, time_points=400, voxels=7) for _ in range(2))
    assert {k: v.shape for k, v in a.items()} == {
        "video": (400, 64), "audio": (400, 32), "text": (400, 48), "fmri": (400, 7), "fmri_clean": (400, 7)
    }
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fmri"], synthetic_fmri(seed=4, time_points=400, voxels=7)["fmri"])
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in a.values())


def test_synthetic_fmri_noise_ceiling_is_below_one():
    d = synthetic_fmri(time_points=2000, voxels=20)
    r = [np.corrcoef(d["fmri"][:, v], d["fmri_clean"][:, v])[0, 1] for v in range(20)]
    assert 0.8 < np.mean(r) < 0.95  # fmri_noise 0.5 on unit-variance responses: r = 1/sqrt(1.25)


def test_digits_canvas_is_seeded_split_and_in_range():
    from stepkit.data import digits_canvas

    a, b = digits_canvas(seed=1, size=24), digits_canvas(seed=1, size=24)
    assert a["train_images"].shape == (1438, 1, 24, 24) and a["test_images"].shape == (359, 1, 24, 24)
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert 0 <= a["train_images"].min() and a["train_images"].max() <= 1
    assert not torch_equal(a["train_images"], digits_canvas(seed=2, size=24)["train_images"])
    assert sorted(a["train_labels"].unique().tolist()) == list(range(10))


def test_digits_canvas_is_hard_for_raw_pixels():
    from stepkit.data import digits_canvas
    from stepkit.evaluation import knn_accuracy

    d = digits_canvas()
    train, test = d["train_images"].flatten(1), d["test_images"].flatten(1)
    acc = knn_accuracy(train, d["train_labels"], test, d["test_labels"])
    assert 0.3 < acc < 0.75  # plain 8x8 digits give 0.98: learning has room to show


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_captioned_digits_say_what_where_and_how_big():
    from stepkit.data import DIGIT_WORDS, PLACE_WORDS, SIZE_WORDS, digits_captioned

    d = digits_captioned(seed=3)
    assert d["train_images"].shape[1:] == (1, 32, 32)
    assert len(d["train_images"]) + len(d["test_images"]) == 1797
    for split in ("train", "test"):
        rows = zip(d[f"{split}_captions"], d[f"{split}_labels"], d[f"{split}_caption_ids"])
        for caption, label, cid in rows:
            size, digit = caption.split()[1:3]
            place = " ".join(caption.split()[3:])
            assert digit == DIGIT_WORDS[label] and size in SIZE_WORDS and place in PLACE_WORDS
            s, p = list(SIZE_WORDS).index(size), list(PLACE_WORDS).index(place)
            assert cid == (label * 3 + s) * 9 + p  # equal ids <=> equal captions
    # a digit "in the upper left" has its ink there: the mean row/column of the ink is up and left
    img = d["train_images"][[i for i, c in enumerate(d["train_captions"]) if c.endswith("upper left")]]
    ink = img.clamp_min(0.3) - 0.3
    rows = (ink.sum(dim=(1, 3)) * torch.arange(32)).sum(1) / ink.sum(dim=(1, 2, 3))
    assert (rows < 16).float().mean() > 0.95
    again = digits_captioned(seed=3)
    assert torch.equal(again["test_images"], d["test_images"])
    assert again["test_captions"] == d["test_captions"]


def test_the_digits_read_without_scikit_learn_are_scikit_learns():
    from sklearn.datasets import load_digits

    from stepkit.data.bundled import _digits

    x, y = _digits()
    expected_x, expected_y = load_digits(return_X_y=True)
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y) and x.dtype == expected_x.dtype

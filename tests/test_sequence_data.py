"""The embedded sequence sets (read from installed wheels) and the .ts reader."""

import importlib.util

import numpy as np
import pytest

from stepkit.data import UCR_UEA, bundled, chat_topics, read_ts, ucr_uea


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

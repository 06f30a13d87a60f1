"""stepkit.pairs: image–text pairs files read in four formats, every bad row named, split by image."""

from pathlib import Path

import pytest
from imagefiles import write_pairs

from stepkit.data import Pairs, read_pairs, split_pairs


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_reads_the_same_pairs_relative_to_the_file(tmp_path, fmt):
    path = write_pairs(tmp_path, 2, fmt)
    pairs = read_pairs(path)
    assert len(pairs) == 6 and pairs.images[0] == tmp_path / "images" / "disc_0.jpg"
    assert pairs.texts[0].startswith("a disc in a ") and pairs.ids == [0, 1, 2, 3, 4, 5]


def test_columns_are_named_by_flag_and_a_missing_one_says_which_flag(tmp_path):
    path = write_pairs(tmp_path, 1, "csv", columns=("image", "caption"))
    assert len(read_pairs(path, image_column="image", text_column="caption")) == 3
    with pytest.raises(ValueError, match=r"pairs.csv: no column 'filepath' \(found \['image', 'caption'\]\); "
                                         r"name it with --data.image-column"):
        read_pairs(path)
    with pytest.raises(ValueError, match=r"no column 'title' .*--data.text-column"):
        read_pairs(path, image_column="image")
    jsonl = write_pairs(tmp_path / "j", 1, "jsonl", columns=("image", "caption"))
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: no 'filepath' key .*--data.image-column"):
        read_pairs(jsonl)


def test_a_caption_shared_by_images_is_two_pairs_and_an_image_with_two_captions_one_id(tmp_path):
    write_pairs(tmp_path, 1, "csv")
    rows = ["images/disc_0.jpg,a disc", "images/disc_0.jpg,a round thing", "images/bar_0.jpg,a disc"]
    (tmp_path / "p.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    pairs = read_pairs(tmp_path / "p.csv")
    assert pairs.ids == [0, 0, 1] and pairs.texts == ["a disc", "a round thing", "a disc"]


@pytest.mark.parametrize("content, message", [
    ("filepath,title\nimages/disc_0.jpg,a disc,more\n",
     r"p.csv:2: a malformed row \(2 fields expected, found 3\)"),
    ("filepath,title\nimages/disc_0.jpg\n", r"p.csv:2: a malformed row \(2 fields expected, found 1\)"),
    ("filepath,title\nimages/disc_0.jpg,  \n", r"p.csv:2: empty caption \(column 'title'\)"),
    ("filepath,title\nimages/disc_0.jpg,a disc\nimages/gone.jpg,a bar\n",
     r"p.csv:3: image 'images/gone.jpg' not found \(.*images/gone.jpg\)"),
    ("filepath,title\nnotes.txt,a note\n", r"notes.txt: not a readable image .*\(from .*p.csv\)"),
])
def test_a_bad_row_is_one_line_naming_file_row_and_the_way_out(tmp_path, content, message):
    write_pairs(tmp_path, 1, "csv")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "p.csv").write_text(content)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(tmp_path / "p.csv")
    assert "\n" not in str(err.value)
    if "malformed" not in message:
        assert "--data.skip-unreadable" in str(err.value)
    assert tree(tmp_path) == before


def test_a_bad_json_line_is_named(tmp_path):
    write_pairs(tmp_path, 1, "csv")
    good = '{"filepath": "images/disc_0.jpg", "title": "a"}\n'
    (tmp_path / "p.jsonl").write_text(good + '{"filepath": "images/bar_0.jpg", title}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a JSON object"):
        read_pairs(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text('["a.jpg", "a"]\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: not a JSON object \(a list\)"):
        read_pairs(tmp_path / "q.jsonl")


def test_skip_unreadable_leaves_bad_rows_out_and_lists_them(tmp_path):
    write_pairs(tmp_path, 1, "csv")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "p.csv").write_text("filepath,title\nimages/disc_0.jpg,a disc\nimages/gone.jpg,a bar\n"
                                    "images/bar_0.jpg,\nnotes.txt,a note\nimages/cross_0.jpg,a cross\n")
    pairs = read_pairs(tmp_path / "p.csv", skip_unreadable=True)
    assert pairs.texts == ["a disc", "a cross"] and len(pairs.skipped) == 3
    assert [s.split(": ")[1][:9] for s in pairs.skipped] == ["image 'im", "empty cap", "not a rea"]


@pytest.mark.parametrize("name, message", [
    ("pairs.xlsx", r"data.pairs='.*pairs.xlsx' is not allowed: expected a file ending in one of .csv"),
    ("missing.csv", r"data.pairs='.*missing.csv' is not allowed: no such file"),
])
def test_a_file_of_another_kind_or_none_is_refused(tmp_path, name, message):
    (tmp_path / "pairs.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=message):
        read_pairs(tmp_path / name)


def test_a_parquet_file_that_is_not_one_is_named(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"p.parquet: not a readable Parquet file"):
        read_pairs(tmp_path / "p.parquet")


def test_the_held_out_split_is_by_image_seeded_and_about_the_fraction():
    images = [Path(f"{i // 2}.jpg") for i in range(40)]  # 20 images, two captions each
    pairs = Pairs(images, [f"t{i}" for i in range(40)], [i // 2 for i in range(40)])
    train, held = split_pairs(pairs, 0.25, seed=3)
    assert len(set(held.ids)) == 5 and len(held) == 10 and not set(train.ids) & set(held.ids)
    again, other = split_pairs(pairs, 0.25, seed=3)[1], split_pairs(pairs, 0.25, seed=4)[1]
    assert again.texts == held.texts != other.texts
    with pytest.raises(ValueError, match="data.val_fraction=0.99 is not allowed"):
        split_pairs(Pairs(images[:4], ["a"] * 4, [0, 0, 1, 1]), 0.99, seed=0)


def test_text_pairs_are_read_checked_and_named_with_their_own_flags(tmp_path):
    from imagefiles import write_text_pairs

    from stepkit.data import read_text_pairs

    pairs = read_text_pairs(write_text_pairs(tmp_path, 9, "csv"))
    assert len(pairs) == 9 and pairs.anchors[0].startswith("which ") and len(set(pairs.ids)) <= 9
    train, held = split_pairs(pairs, 0.3, seed=0)
    assert not set(train.ids) & set(held.ids) and len(train) + len(held) == 9
    (tmp_path / "bad.jsonl").write_text('{"question": "a?", "positive": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'anchor' key .*--data.anchor-column"):
        read_text_pairs(tmp_path / "bad.jsonl")
    rows = ['{"anchor": "a?", "positive": "b"}', '{"anchor": "c?", "positive": ""}']
    (tmp_path / "empty.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"empty.jsonl:2: empty text \(column 'positive'\); pass "
                                         r"--data.skip-unreadable"):
        read_text_pairs(tmp_path / "empty.jsonl")
    assert read_text_pairs(tmp_path / "empty.jsonl", skip_unreadable=True).positives == ["b"]


def test_a_csv_saved_with_a_byte_order_mark_reads_as_any_other(tmp_path):
    path = write_pairs(tmp_path, 1, "csv")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Excel's "CSV UTF-8" writes
    assert len(read_pairs(path)) == 3


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_its_line_and_byte(tmp_path, fmt):
    from stepkit.data import read_text_pairs

    rows = ["anchor,positive", "a tea?,a hot drink", "a coffee?,a caf\u00e9 drink"]
    if fmt == "jsonl":
        rows = [f'{{"anchor": "{a}", "positive": "{b}"}}' for a, b in (r.split(",") for r in rows[1:])]
    path = tmp_path / f"qa.{fmt}"
    path.write_bytes("\n".join(rows).encode("latin-1"))  # é is 0xe9 in latin-1, not UTF-8
    line = 3 if fmt == "csv" else 2
    column = rows[line - 1].index("\u00e9") + 1
    with pytest.raises(ValueError) as caught:
        read_text_pairs(path)
    assert str(caught.value) == (f"{path}:{line}: not UTF-8 (byte 0xe9 at column {column}); pairs files "
                                 "are read as UTF-8 (with or without a BOM): save it as UTF-8, e.g. iconv -f "
                                 f"latin1 -t utf-8 qa.{fmt} > utf8.{fmt}")

"""stepkit.mine: hard negatives as sentence-transformers' mine_hard_negatives picks them, and the command."""

import json

import pytest
import torch
from conftest import load_recipe
from hypothesis import given, settings
from hypothesis import strategies as st

from stepkit.__main__ import main
from stepkit.data.pairs import read_text_pairs
from stepkit.mine import mine_hard_negatives


def by_hand(similarity, positives, n, first, stop, margin):
    """Per query: non-positive keys sorted by score, ranks first..stop-1, the margin test, the first n."""
    picked = []
    for scores, answers in zip(similarity.tolist(), positives.tolist()):
        best = max(s for s, a in zip(scores, answers) if a)
        ranked = sorted((k for k in range(len(scores)) if not answers[k]), key=lambda k: -scores[k])
        picked.append([k for k in ranked[first:stop] if scores[k] <= best - margin][:n])
    return picked


@settings(max_examples=25, deadline=None)
@given(queries=st.integers(1, 6), keys=st.integers(2, 12), n=st.integers(1, 4), first=st.integers(0, 3),
       width=st.integers(1, 8), margin=st.floats(-0.5, 0.5), seed=st.integers(0, 999))
def test_mining_picks_what_the_rule_says(queries, keys, n, first, width, margin, seed):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.randn(queries, keys, generator=g)
    positives = torch.zeros(queries, keys, dtype=torch.bool)
    positives[torch.arange(queries), torch.randint(0, keys, (queries,), generator=g)] = True
    got = mine_hard_negatives(similarity, positives, n, rank_range=(first, first + width), margin=margin)
    assert got == by_hand(similarity, positives, n, first, first + width, margin)


def test_bad_mining_settings_are_refused():
    with pytest.raises(ValueError, match="0 <= first < stop"):
        mine_hard_negatives(torch.zeros(1, 2), torch.eye(1, 2, dtype=torch.bool), 1, rank_range=(5, 5))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A short text-text run of the contrastive recipe (tiny towers) and its pairs file."""
    from imagefiles import write_text_pairs

    root = tmp_path_factory.mktemp("mine")
    qa = write_text_pairs(root, 60)
    recipe = load_recipe("contrastive")
    recipe.main(recipe.parse(["tiny", "--run-dir", str(root / "run"), "--data.pairs", str(qa), "--data.kind",
                              "text-text", "--batch-size", "16", "--train.steps", "6", "--optim.warmup-steps",
                              "2", "--log.no-console"]))
    return root / "run", qa


@pytest.mark.slow
def test_mined_negatives_train_a_run_and_never_answer_their_anchor(text_run, tmp_path, capsys):
    run, qa = text_run
    out = tmp_path / "qa_negatives.csv"
    assert main(["mine", str(run), "--pairs", str(qa), "--out", str(out), "--negatives", "2"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: 60 pairs with 2 hard negatives each" in said
    columns = ("negative_1", "negative_2")
    assert "--data.negative-columns negative_1 negative_2" in said
    mined = read_text_pairs(out, negative_columns=columns)
    answers = {}
    for anchor, positive in zip(mined.anchors, mined.positives):
        answers.setdefault(anchor, set()).add(positive)
    assert len(mined) == 60 and all(len(set(row)) == 2 for row in mined.negatives)
    for anchor, row in zip(mined.anchors, mined.negatives):
        assert not set(row) & answers[anchor] and set(row) <= set(mined.positives)
    assert main(["mine", str(run), "--pairs", str(qa), "--out", str(out)]) == 2  # no --force: kept
    assert "exists: pass --force" in capsys.readouterr().err
    recipe = load_recipe("contrastive")
    summary = recipe.main(recipe.parse([
        "tiny", "--run-dir", str(tmp_path / "with"), "--data.pairs", str(out), "--data.kind", "text-text",
        "--data.negative-columns", *columns, "--batch-size", "16", "--train.steps", "3",
        "--optim.warmup-steps", "1", "--log.no-console"]))
    assert "with 2 hard negatives each" in capsys.readouterr().out and summary["steps"] == 3


@pytest.mark.slow
def test_bad_negative_files_and_runs_are_one_line(text_run, tmp_path, capsys):
    run, qa = text_run
    rows = [json.loads(line) for line in qa.read_text().splitlines()]
    (tmp_path / "missing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    empty = [{**r, "negative_1": "" if i == 3 else "x"} for i, r in enumerate(rows)]
    (tmp_path / "empty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in empty))
    recipe = load_recipe("contrastive")
    for name, message in (("missing", "missing.jsonl:1: no 'negative_1' key"),
                          ("empty", "empty.jsonl:4: empty text (column 'negative_1')")):
        with pytest.raises(ValueError) as err:
            recipe.main(recipe.parse(["tiny", "--run-dir", str(tmp_path / name), "--data.pairs",
                                      str(tmp_path / f"{name}.jsonl"), "--data.kind", "text-text",
                                      "--data.negative-columns", "negative_1"]))
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / name).exists()
    assert "data.negative_columns=" in str(pytest.raises(ValueError, recipe.parse, [
        "tiny", "--data.negative-columns", "negative_1"]).value)  # image-text pairs have none
    assert main(["mine", str(run), "--pairs", str(qa), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "expected a file ending in .jsonl, .csv or .tsv" in capsys.readouterr().err
    assert main(["mine", str(run), "--pairs", str(qa), "--out", str(tmp_path / "x.jsonl"), "--anchor-column",
                 "question"]) == 2
    err = capsys.readouterr().err
    assert "no 'question' key" in err and "name the key with --anchor-column" in err and err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.slow
def test_an_image_text_run_mines_the_nearest_captions_of_other_images(tmp_path, capsys):
    import csv

    from imagefiles import write_pairs

    from stepkit.augment import normalize, to_unit
    from stepkit.data.crops import center_view
    from stepkit.data.pairs import read_pairs
    from stepkit.probe import load_part, tokenizer_of

    pairs = write_pairs(tmp_path / "photos", 5)  # 15 images, one caption each
    rows = list(csv.DictReader(pairs.open()))
    rows.append({"filepath": rows[0]["filepath"], "title": rows[1]["title"]})  # image 0 has image 1's too
    with pairs.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    run = tmp_path / "run"
    recipe = load_recipe("contrastive")
    recipe.main(recipe.parse(["tiny", "--run-dir", str(run), "--data.pairs", str(pairs), "--batch-size", "8",
                              "--data.workers", "0", "--train.steps", "3", "--optim.warmup-steps", "1",
                              "--log.no-console"]))
    capsys.readouterr()
    out = tmp_path / "elsewhere" / "negatives.csv"  # another folder: image paths rewritten relative to it
    out.parent.mkdir()
    assert main(["mine", str(run), "--pairs", str(pairs), "--out", str(out), "--negatives", "2"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: 16 pairs with 2 hard negatives each" in said and "--data.kind" not in said
    mined, given = read_pairs(out, negative_columns=("negative_1", "negative_2")), read_pairs(pairs)
    assert [p.resolve() for p in mined.images] == [p.resolve() for p in given.images]
    assert mined.texts == given.texts
    captions_of: dict = {}
    for image, text in zip(given.images, given.texts):
        captions_of.setdefault(image, set()).add(text)
    # by hand: every caption of the file scored against each image's centre square, its own left out
    image_net, image_info = load_part(run, "image")
    text_net, text_info = load_part(run, "text")
    facts = image_info["input"]
    corpus = sorted(set(given.texts))
    with torch.no_grad():
        keys = text_net(**tokenizer_of(text_info)(corpus))
        for image, negatives in zip(given.images, mined.negatives):
            pixels = normalize(to_unit(center_view(image, facts["size"])[None]), facts["mean"], facts["std"])
            scores = (image_net(pixels) @ keys.T)[0]
            others = sorted((c for c in corpus if c not in captions_of[image]),
                            key=lambda c: -scores[corpus.index(c)].item())
            assert negatives == others[:2]
    assert set(mined.negatives[0]).isdisjoint({rows[0]["title"], rows[1]["title"]})
    recipe.main(recipe.parse(["tiny", "--run-dir", str(tmp_path / "with"), "--data.pairs", str(out),
                              "--data.negative-columns", "negative_1", "negative_2", "--batch-size", "8",
                              "--data.workers", "0", "--train.steps", "2", "--optim.warmup-steps", "1",
                              "--log.no-console"]))
    assert "with 2 hard negatives each" in capsys.readouterr().out
    digits = tmp_path / "digits"
    recipe.main(recipe.parse(["tiny", "--run-dir", str(digits), "--train.steps", "1", "--optim.warmup-steps",
                              "1", "--batch-size", "8", "--log.no-console"]))
    capsys.readouterr()
    assert main(["mine", str(digits), "--pairs", str(pairs), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "1-channel images (the embedded digits)" in err and err.count("\n") == 1

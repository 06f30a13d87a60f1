"""Hard negatives mined with a trained two-tower run: ``stepkit mine RUN --pairs FILE --out FILE``.

    stepkit mine runs/qa --pairs qa.jsonl --out qa_negatives.jsonl                 # 3 a pair, ranks 0-50
    stepkit mine runs/qa --pairs qa.jsonl --out qa_neg.csv --negatives 5 --range 10 100 --margin 0.05
    stepkit mine runs/photos --pairs photos.csv --out photos_negatives.csv        # an image-text run

The run's query tower embeds each pair's query (a text-text run: the anchor; an image-text run: the
image, its centre square as the held-out images are read), its text tower every distinct positive (caption)
of the file; each query's hard negatives are the positives of other pairs it ranks highest, as
sentence-transformers' ``mine_hard_negatives`` picks them: the query's own positives (every text equal
to one; for an image, every caption it has in the file) left out, the candidates ranked from ``--range``
MIN to MAX, and with ``--margin M`` none closer to the query than its positive less M
(``absolute_margin``; no margin test by default, as there). The output is the pairs file with
``negative_1 ... negative_N`` columns, for ``--data.negative-columns``; a pair with fewer candidates than
``--negatives`` is left out (counted).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["mine_hard_negatives", "mine_run", "write_pairs"]


@torch.no_grad()
def mine_hard_negatives(similarity: Tensor, positives: Tensor, n: int, *,
                        rank_range: tuple[int, int] = (0, 50), margin: float | None = None
                        ) -> list[list[int]]:
    """The hard negatives of each query: the ``n`` most similar keys that are not its positives, among
    the candidates ranked ``rank_range[0]`` to ``rank_range[1] - 1`` (positives not counted), each at
    most the query's best positive's similarity minus ``margin`` (None: no margin test).

    Args:
        similarity: ``(queries, keys)`` scores.
        positives: ``(queries, keys)`` bool, True where the key answers the query (never a negative).
        n: Negatives a query.
        rank_range: ``(first, stop)`` ranks among the non-positive keys that may be picked.
        margin: sentence-transformers' ``absolute_margin``.

    Returns:
        Per query, the picked keys' indices, most similar first (fewer than ``n`` where too few qualify).

    Examples:
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.9, 0.5, 0.6]])
        >>> positives = torch.tensor([[True, False, False, False], [False, True, False, False]])
        >>> mine_hard_negatives(scores, positives, 2, rank_range=(0, 3), margin=0.0)
        [[1, 2], [3, 2]]
        >>> mine_hard_negatives(scores, positives, 2, rank_range=(1, 3), margin=0.25)  # skip the first
        [[3], [2, 0]]
    """
    if n < 1 or not 0 <= rank_range[0] < rank_range[1]:
        raise ValueError(f"need n >= 1 and 0 <= first < stop ranks, got n={n}, range={rank_range}")
    scores = similarity.double().masked_fill(positives, -torch.inf)
    best_positive = similarity.double().masked_fill(~positives, -torch.inf).amax(dim=1)
    stop = min(rank_range[1], scores.shape[1])
    ranked = scores.topk(stop, dim=1)
    picked = []
    for query in range(scores.shape[0]):
        keep = []
        for value, key in zip(ranked.values[query, rank_range[0]:].tolist(),
                              ranked.indices[query, rank_range[0]:].tolist()):
            if value == -torch.inf:  # only positives left
                break
            if margin is not None and value > best_positive[query].item() - margin:
                continue
            keep.append(key)
            if len(keep) == n:
                break
        picked.append(keep)
    return picked


def write_pairs(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """Pairs (texts, or image paths and captions) and their negatives to ``.jsonl``, ``.csv`` or ``.tsv``
    (written whole, then moved into place).

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "qa.csv"
        >>> write_pairs(out, [{"anchor": "a?", "positive": "b", "negative_1": "c"}])
        >>> out.read_text().splitlines()
        ['anchor,positive,negative_1', 'a?,b,c']
    """
    from stepkit._atomic import atomic_write_bytes

    kind = path.suffix.lower()
    if kind == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif kind in (".csv", ".tsv"):
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), delimiter="\t" if kind == ".tsv" else ",",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        raise ValueError(f"--out={str(path)!r} is not allowed: expected a file ending in .jsonl, .csv or "
                         ".tsv")
    atomic_write_bytes(path, text.encode("utf-8"))


@torch.no_grad()
def _embed(net, tokenize, texts: list[str], batch_size: int, device: torch.device) -> Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = {k: v.to(device) for k, v in tokenize(texts[start:start + batch_size]).items()}
        out.append(net(**tokens).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _embed_images(net, facts: dict, files: list[Path], batch_size: int, device: torch.device) -> Tensor:
    """The image tower's embedding of each file: its centre square at the run's size and normalisation,
    as the recipe's held-out images are embedded."""
    from torch.utils.data import DataLoader

    from stepkit.augment import normalize, to_unit
    from stepkit.data.images import EvalImages

    out = []
    dataset: Any = EvalImages(files, [0] * len(files), size=int(facts["size"]), flag="pairs")
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        images = to_unit(images.to(device))
        out.append(net(normalize(images, facts["mean"], facts["std"]) if "mean" in facts else images)
                   .float().cpu())
    return torch.cat(out)


def _one_line(err: ValueError) -> ValueError:
    """A pairs-file error named with this command's flags, not a recipe's."""
    said = str(err).replace("; pass --data.skip-unreadable to skip such rows", "")
    said = said.replace("; for text pairs, --data.kind text-text", "")
    for column in ("anchor-column", "positive-column", "image-column", "text-column"):
        said = said.replace(f"--pairs.{column}", f"--{column}")
    return ValueError(said)


def mine_run(run: str | os.PathLike, pairs: str | os.PathLike, out: str | os.PathLike, *,
             negatives: int = 3, rank_range: tuple[int, int] = (0, 50), margin: float | None = None,
             checkpoint: str = "last", anchor_column: str = "anchor", positive_column: str = "positive",
             image_column: str = "filepath", text_column: str = "title", batch_size: int = 256,
             device: str = "cpu") -> dict[str, Any]:
    """Mine hard negatives for the pairs of ``pairs`` with a two-tower run's towers and write them to
    ``out`` (``mine_hard_negatives``; the module's docstring says how they are picked).

    A text-text run reads text pairs (``anchor_column``, ``positive_column``): each anchor is a query. An
    image-text run reads image-text pairs (``image_column``, ``text_column``): each image is a query, every
    caption of it a positive; the images are written relative to ``out``'s folder.

    Returns:
        ``{"rows": written, "dropped": pairs with too few candidates, "kind": "text-text" or
        "image-text"}``.

    Raises:
        ValueError: one line, for a run that is not a two-tower run, a bad pairs file, or bad settings;
            ``stepkit.checkpoint.CheckpointError`` for a missing checkpoint.

    Examples:
        >>> mine_run("runs/qa", "qa.jsonl", "qa_negatives.parquet")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --out='qa_negatives.parquet' is not allowed: expected a file ending in .jsonl, ...
    """
    from stepkit.data.pairs import read_pairs, read_text_pairs
    from stepkit.probe import load_part, tokenizer_of
    from stepkit.weights.parts import checkpoint_parts, find_checkpoint

    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".csv", ".tsv"):
        raise ValueError(f"--out={str(out)!r} is not allowed: expected a file ending in .jsonl, .csv or "
                         ".tsv")
    parts = checkpoint_parts(find_checkpoint(run, checkpoint))
    if not {"image", "text"} <= set(parts):
        raise ValueError(f"{run}: not a run of the contrastive recipe (stepkit mine needs its two towers)")
    text_only = "tokenizer" in parts["image"]
    facts = parts["image"].get("input", {})
    if not text_only and facts.get("channels") != 3:
        raise ValueError(f"{run}: its image tower reads {facts.get('channels')}-channel images (the embedded "
                         "digits); stepkit mine embeds a pairs file's RGB images: mine with a run trained on "
                         "--data.pairs or --data.shards")
    towers, tokenizers = {}, {}
    for name in ("image", "text"):
        towers[name], info = load_part(run, name, checkpoint=checkpoint, device=device)
        tokenizers[name] = tokenizer_of(info) if name == "text" or text_only else None
    dev = torch.device(device)
    groups: list[Any]  # rows of one group share their positives: an anchor's, or an image's
    try:
        if text_only:
            texts = read_text_pairs(pairs, anchor_column=anchor_column, positive_column=positive_column,
                                    flag="pairs")
            groups, positive_texts = list(texts.anchors), texts.positives
            queries = _embed(towers["image"], tokenizers["image"], texts.anchors, batch_size, dev)
            rows = [{anchor_column: a, positive_column: p} for a, p in zip(texts.anchors, texts.positives)]
        else:
            images = read_pairs(pairs, image_column=image_column, text_column=text_column, flag="pairs")
            groups, positive_texts = list(images.ids), images.texts
            files = list(dict.fromkeys(images.images))  # ids number the images in this order
            queries = _embed_images(towers["image"], facts, files, batch_size, dev)[torch.tensor(images.ids)]
            folder = out.absolute().parent
            rows = [{image_column: os.path.relpath(image.absolute(), folder), text_column: text}
                    for image, text in zip(images.images, images.texts)]
    except ValueError as err:
        raise _one_line(err) from None
    corpus = list(dict.fromkeys(positive_texts))  # every distinct positive once
    number = {text: i for i, text in enumerate(corpus)}
    answers: dict = {}  # a query's positives, over every row it appears in
    for group, positive in zip(groups, positive_texts):
        answers.setdefault(group, set()).add(number[positive])
    positives = torch.zeros(len(groups), len(corpus), dtype=torch.bool)
    for row, group in enumerate(groups):
        positives[row, sorted(answers[group])] = True
    keys = _embed(towers["text"], tokenizers["text"], corpus, batch_size, dev)
    picked = mine_hard_negatives(queries @ keys.T, positives, negatives, rank_range=rank_range, margin=margin)
    rows = [{**row, **{f"negative_{j + 1}": corpus[k] for j, k in enumerate(keep)}}
            for row, keep in zip(rows, picked) if len(keep) == negatives]
    if not rows:
        raise ValueError(f"no pair of {pairs} has {negatives} negatives in ranks {rank_range[0]}-"
                         f"{rank_range[1]} with margin {margin}: lower --negatives or --margin, or widen "
                         "--range")
    write_pairs(out, rows)
    return {"rows": len(rows), "dropped": len(groups) - len(rows),
            "kind": "text-text" if text_only else "image-text"}

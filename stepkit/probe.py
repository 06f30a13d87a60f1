"""Evaluate any saved checkpoint with the frozen-feature probes its recipe ends with: ``stepkit eval``.

    stepkit eval runs/dino                                 # last checkpoint, the run's own probe data
    stepkit eval runs/dino --all                           # every checkpoint kept, a table
    stepkit eval runs/ijepa --train-root L --val-root V --linear   # your labelled images

A recipe records with each part how it probes it (``probe`` in the part's
description: features, k-NN settings, the data it evaluates on); this reads
the part out of a checkpoint (``stepkit.weights.read_part``), rebuilds it and
runs the same probes, so the last checkpoint reproduces ``summary.json``.
Features are computed in batches, dealt out across the ranks under torchrun
(``torchrun --nproc_per_node=N -m stepkit eval RUN``: the same numbers as one
process); k-NN compares in chunks. One result file per checkpoint goes to
``RUN/eval/<checkpoint>.json``, written by rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stepkit._atomic import atomic_write_bytes
from stepkit.augment import normalize, to_unit
from stepkit.checkpoint import SHARDED_SUFFIX, CheckpointError, checkpoint_files
from stepkit.evaluation import frozen_probes, knn_accuracy, linear_probe
from stepkit.models.arguments import build_arch
from stepkit.weights.parts import find_checkpoint, read_part

__all__ = ["ProbeRecord", "checkpoints_of", "embed_split", "evaluate_checkpoint", "load_part",
           "probe_data", "result_path", "tokenizer_of", "write_result"]

Features = Literal["forward", "pooled_patches", "sequence", "retrieval", "voxels"]


@dataclass(frozen=True)
class ProbeRecord:
    """How ``stepkit eval`` probes a part: which features, the probes' settings, the labelled data.

    A recipe saves one with each part it evaluates (``describe_part(..., probe=record.as_dict())``);
    ``stepkit eval`` reads it back with ``from_dict``, which refuses a record it cannot honour (another
    version, an unknown feature kind, a missing or unknown field) in one line, so a recipe whose
    evaluation changes must change its record, and an old ``stepkit`` never probes a new record wrongly.

    ``features``: ``"forward"`` (the part's output, ``(B, dim)``), ``"pooled_patches"`` (patch tokens
    averaged over a ``pool x pool`` grid, the last 1 and ``layers`` blocks: I-JEPA's protocol) or
    ``"sequence"`` (token features of series or sentences, the last 1 and ``layers`` blocks) or
    ``"retrieval"`` (a two-tower run: this part embeds the texts, part ``queries`` the images or anchor
    texts, scored on the run's held-out pairs by ``stepkit.evaluation.held_out_retrieval``) or
    ``"voxels"`` (the autoencoder: stimulus windows of ``window`` time points -> predicted voxel
    responses, scored by their Pearson r with the measured ones on the test block of the run's series).

    Examples:
        >>> record = ProbeRecord("pooled_patches", data={"kind": "digits_canvas", "seed": 0, "size": 32},
        ...                      pool=2, layers=4)
        >>> ProbeRecord.from_dict(record.as_dict()) == record
        True
        >>> ProbeRecord.from_dict({**record.as_dict(), "version": 9})
        Traceback (most recent call last):
        ...
        ValueError: probe record: version 9, this stepkit reads version 1 (upgrade stepkit to evaluate
        this run)
    """

    features: Features
    data: dict[str, Any]
    """What the probes fit and score on: ``{"kind": "digits_canvas" | "folders" | "timeseries" | "text" |
    "synthetic_fmri" | "fmri_npz", ...}``; ``{}``: the run had no labelled data (``stepkit eval`` asks
    for ``--train-root`` and ``--val-root``)."""
    k: int = 20
    temperature: float = 0.07
    linear: bool = False
    batch_size: int = 64
    seed: int = 0
    pool: int | None = None
    """``pooled_patches`` only: the grid the patch tokens are averaged over."""
    layers: int | None = None
    """``pooled_patches`` and ``sequence``: how many last blocks the multi-layer probe concatenates."""
    queries: str | None = None
    """``retrieval``: the part that embeds the queries (images, or anchor texts)."""
    widths: list[int] | None = None
    """``retrieval``: narrower Matryoshka widths scored too."""
    window: int | None = None
    """``voxels``: the time points of stimulus each sample reads."""
    version: int = 1

    VERSION: ClassVar[int] = 1
    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {"forward": (), "pooled_patches": ("pool", "layers"),
                                                   "sequence": ("layers",), "retrieval": ("queries",),
                                                   "voxels": ("window",)}

    def __post_init__(self) -> None:
        if self.version != self.VERSION:
            raise ValueError(f"probe record: version {self.version}, this stepkit reads version "
                             f"{self.VERSION} (upgrade stepkit to evaluate this run)")
        if self.features not in self.NEEDS:
            raise ValueError(f"probe record: features={self.features!r} is not one stepkit eval knows: "
                             f"{' | '.join(self.NEEDS)}")
        missing = [name for name in self.NEEDS[self.features] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"probe record: features={self.features!r} needs {', '.join(missing)}")
        if not isinstance(self.data, dict) or (self.data and "kind" not in self.data):
            raise ValueError("probe record: data must say its kind, e.g. {'kind': 'digits_canvas', ...}")

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-like values, as checkpoints keep it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str = "probe record") -> ProbeRecord:
        """Read a saved record; records written before versions existed are version 1.

        Raises:
            ValueError: one line naming ``where`` and what is wrong.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}: written by a newer stepkit "
                             f"or an edited recipe; this stepkit reads {', '.join(sorted(known))}")
        missing = [name for name in ("features", "data") if name not in record]
        if missing:
            raise ValueError(f"{where}: no {' or '.join(missing)}")
        try:
            return cls(**record)
        except ValueError as err:
            raise ValueError(f"{where}: {str(err).removeprefix('probe record: ')}") from None



def checkpoints_of(run: str | os.PathLike) -> list[Path]:
    """Every checkpoint a run directory keeps, oldest first, ``last`` at the end.

    Examples:
        >>> import tempfile
        >>> checkpoints_of(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stepkit.checkpoint.CheckpointError: ...: no checkpoints here (a run directory holds checkpoints/)
    """
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        raise CheckpointError(f"{run}: no checkpoints here (a run directory holds checkpoints/)")
    found = [p for p in checkpoint_files(folder) if not p.name.startswith("last.")]
    last = find_checkpoint(run, "last")
    return [*found, last]


def probe_data(probe: dict[str, Any], train_root: str | os.PathLike | None = None,
               val_root: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """The labelled (train, held-out) sets: ``train_root`` / ``val_root`` (class-per-folder) when
    given, else the ones the run evaluated on (``probe["data"]``).

    Examples:
        >>> train, held_out = probe_data({"data": {"kind": "digits_canvas", "seed": 0, "size": 16}})
        >>> len(train), len(held_out), tuple(train[0][0].shape)
        (1438, 359, (1, 16, 16))
    """
    from stepkit.data import EvalImages, find_image_data

    data = probe.get("data", {})
    if train_root is None and val_root is None and data.get("kind") == "folders":  # the run's own
        train_root, val_root = data["train_root"], data["val_root"]
    if train_root is not None or val_root is not None:
        if train_root is None or val_root is None:
            raise ValueError("--train-root and --val-root go together (labelled images, one folder per "
                             "class)")
        found = find_image_data(None, train_root, val_root)
        print("\n".join(found.notes), flush=True)
        assert found.eval_train is not None and found.eval_val is not None  # both roots were given
        size = int(data.get("size") or probe["input_size"])
        resize = data.get("resize")
        return tuple(EvalImages(f.paths, f.labels, size=size, resize=resize)  # type: ignore[return-value]
                     for f in (found.eval_train, found.eval_val))
    if data.get("kind") == "digits_canvas":
        from stepkit.data import digits_canvas

        digits = digits_canvas(seed=int(data["seed"]), size=int(data["size"]))
        return (TensorDataset(digits["train_images"], digits["train_labels"]),
                TensorDataset(digits["test_images"], digits["test_labels"]))
    raise ValueError("this run evaluated on no labelled images of its own: pass --train-root and --val-root")


def evaluate_checkpoint(source: str | os.PathLike, part: str, *, checkpoint: str = "last",
                        train_root: str | os.PathLike | None = None,
                        val_root: str | os.PathLike | None = None,
                        knn: bool = True, linear: bool | None = None, batch_size: int | None = None,
                        device: str = "cpu", map_to: str | os.PathLike | None = None,
                        attentive: bool = False) -> dict[str, Any]:
    """The probes' numbers for one part of one checkpoint (the keys ``summary.json`` uses).

    Args:
        source: A run directory or a checkpoint.
        part: The part to probe (the recipe's evaluated one: DINO ``teacher``, JEPA ``target``).
        checkpoint: ``last``, ``best``, ``step_N`` or a file name in ``checkpoints/``.
        train_root: Labelled images (one folder per class) the probes fit on, instead of the run's own.
        val_root: The held-out labelled images they are scored on (with ``train_root``).
        knn: Run the k-NN probe.
        linear: Run the linear probe (None: as the run did).
        batch_size: Images per forward (None: as the run did).
        device: Where the features are computed.
        map_to: Also write a 2-D map of the held-out embeddings there (``stepkit.plot.embedding_map``: a
            PNG, coloured by class; a two-tower run's by side: images or anchors against texts); its path
            is the result's ``map``.
        attentive: Also fit an attentive probe (``stepkit.attentive_probe``) on the last layer's tokens:
            ``attentive_acc`` (I-JEPA's and the sequence recipe's parts: they keep their tokens).

    Raises:
        CheckpointError: for a missing checkpoint or part; ValueError for a part without a probe.

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_last
        >>> from stepkit.models import SmallCNN
        >>> from stepkit.weights import describe_part
        >>> net = SmallCNN(1, (8, 16), pool=2)
        >>> probe = ProbeRecord("forward", k=10, data={"kind": "digits_canvas", "seed": 0, "size": 16})
        >>> parts = {"encoder": describe_part(net, source="model", prefix="", about="a CNN",
        ...                                   probe=probe.as_dict())}
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=3)
        >>> _ = save_last(run / "checkpoints", state, meta={"parts": parts})
        >>> result = evaluate_checkpoint(run, "encoder")
        >>> result["step"], 0.1 < result["knn_acc"] <= 1.0  # an untrained CNN is above chance already
        (3, True)
    """
    net, info = load_part(source, part, checkpoint=checkpoint, device=device)
    if not info.get("probe"):
        raise ValueError(f"part {part!r} records no probe (its recipe evaluates another part)")
    record = ProbeRecord.from_dict(info["probe"], where=f"{info['checkpoint']}: part {part!r}'s probe record")
    result: dict[str, Any] = {"checkpoint": info["checkpoint"], "step": info["step"], "part": part}
    linear = record.linear if linear is None else linear
    if attentive and record.features not in ("pooled_patches", "sequence"):
        raise ValueError(f"--attentive reads a part's patch or sequence tokens; part {part!r} gives one "
                         "vector an input (attentive probes: I-JEPA's and jepa_sequences' runs)")
    if record.features == "retrieval":  # a two-tower run: its held-out pairs
        if train_root is not None or val_root is not None:
            raise ValueError("--train-root / --val-root are labelled images; this run is scored on its "
                             "held-out pairs")
        scores, (both, sides, names) = _retrieval(net, info, record, source, checkpoint, torch.device(device))
        return {**result, **scores, **_map(map_to, (both, sides), result, names=names)}
    if record.features == "voxels":  # the autoencoder: its test block's predicted responses
        if train_root is not None or val_root is not None:
            raise ValueError("--train-root / --val-root are image folders; this part predicts voxels")
        scores, (codes, segments, names) = _voxel_scores(net, record, torch.device(device))
        return {**result, **scores, **_map(map_to, (codes, segments), result, names=names)}
    if record.features == "sequence":  # time series or sentences, as jepa_sequences probes them
        if train_root is not None or val_root is not None:
            raise ValueError("--train-root / --val-root are image folders; this part encodes sequences")
        scores, held = _sequence_probes(net, record, linear=linear, attentive=attentive,
                                        device=torch.device(device))
        return {**result, **scores, **_map(map_to, held, result)}
    facts = info.get("input", {})
    mean, std = facts.get("mean", (0.5,)), facts.get("std", (0.5,))
    train_set, test_set = probe_data({"data": record.data, "input_size": facts.get("size")}, train_root,
                                     val_root)
    size = batch_size or record.batch_size
    k, temperature = min(record.k, len(train_set)), record.temperature

    def embed(features: Callable[[Tensor], Tensor], dataset) -> tuple[Tensor, Tensor]:
        return embed_split(features, dataset, lambda x: normalize(to_unit(x.to(device)), mean, std), size)

    if record.features == "pooled_patches":  # I-JEPA's protocol: last layer and last layers
        from stepkit.models.jepa import encoder_depth, layer_dims, pooled_patches

        pool, layers = int(record.pool or 1), int(record.layers or 1)  # both set: checked by the record
        depth = encoder_depth(net)

        def features(model: nn.Module, n: int):
            pooled = partial(pooled_patches, model, pool=pool, layers=n)
            return embed(pooled, train_set), embed(pooled, test_set)

        pixels = (embed(nn.Flatten(), train_set), embed(nn.Flatten(), test_set))
        width = lambda m: pool ** 2 * layer_dims(m, (depth - 1,))[0]  # noqa: E731
        scores, last = frozen_probes({"": net}, features, width, pixels, "pixels", layers=min(layers, depth),
                                     k=k, temperature=temperature, linear=linear, seed=record.seed)
        if attentive:  # the last layer's patch tokens, every one
            from stepkit.attentive_probe import attentive_probe
            from stepkit.models.jepa import patch_tokens

            tokens = lambda x: patch_tokens(net, x)[0]  # noqa: E731
            (fit_x, fit_y), (held_x, held_y) = embed(tokens, train_set), embed(tokens, test_set)
            scores["attentive_acc"] = attentive_probe(fit_x, fit_y, held_x, held_y, seed=record.seed,
                                                      device=device)["acc"]
        return {**result, **{key: v for key, v in scores.items() if not key.endswith("_pixels")},
                **_map(map_to, last[""][1], result)}
    (train_f, train_y), (test_f, test_y) = embed(net, train_set), embed(net, test_set)
    if knn:
        result["knn_acc"] = knn_accuracy(train_f, train_y, test_f, test_y, k=k, temperature=temperature)
    if linear:
        fitted = linear_probe(train_f, train_y, test_f, test_y, seed=record.seed)
        result["linear_acc"] = fitted["acc"]
    return {**result, **_map(map_to, (test_f, test_y), result)}


def _map(path: str | os.PathLike | None, held: tuple[Tensor, Tensor], result: dict[str, Any],
         names: dict[int, str] | None = None) -> dict[str, str]:
    """``{"map": path}`` after writing the held-out ``(features, labels)``' map there; {} without a path."""
    if path is None:
        return {}
    from stepkit.plot import embedding_map

    title = f"{Path(result['checkpoint']).name}, step {result['step']}: {result['part']}"
    return {"map": str(embedding_map(held[0], held[1], path, title=title, names=names))}


def _voxel_scores(net: nn.Module, record: ProbeRecord, device: torch.device
                  ) -> tuple[dict[str, float], tuple[Tensor, Tensor, dict[int, str]]]:
    """The autoencoder's test-block scores as its recipe reports them (``voxel_corr``, its median, the
    share above 0.1), on the series rebuilt from ``record.data``; and the predicted responses with the
    fifth of the block each time point is in, for the map."""
    from stepkit.data import load_fmri_npz, stimulus_windows, synthetic_fmri, time_blocks
    from stepkit.losses import pearson_per_voxel, voxel_corr_summary

    data, window = record.data, int(record.window or 1)
    arrays = (load_fmri_npz(data["path"]) if data["kind"] == "fmri_npz"
              else synthetic_fmri(seed=data["seed"], time_points=data["time_points"], voxels=data["voxels"]))
    series = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    test = torch.from_numpy(time_blocks(len(arrays["fmri"]), window=window)[2]).to(device)
    with torch.no_grad():  # the whole block at once, as the recipe scores it: r over all its time points
        predicted, _ = net(stimulus_windows(series, test, window))
    r = pearson_per_voxel(predicted, series["fmri"][test])
    scores = {k: float(v) for k, v in voxel_corr_summary(r).items()}
    fifth = torch.arange(len(test)) * 5 // len(test)  # no labels: the map is coloured by time
    times = test.cpu()
    names = {i: f"time {int(times[fifth == i][0])}-{int(times[fifth == i][-1])}" for i in range(5)}
    return scores, (predicted.float().cpu(), fifth, names)


def _sequence_probes(net: nn.Module, record: ProbeRecord, *, linear: bool, device: torch.device,
                     attentive: bool = False) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
    """The JEPA sequence recipe's probes, on the items it evaluated (rebuilt from ``probe["data"]``), and
    the held-out items' last-layer features and labels."""
    from stepkit.data import chat_topics, load_series_npz, tokenized_sentences, ucr_uea, windowed_series
    from stepkit.jepa import raw_sequence_features, sequence_features
    from stepkit.models.jepa import encoder_depth, layer_dims

    data = record.data
    if data["kind"] == "timeseries":
        raw = load_series_npz(data["path"]) if data.get("path") else ucr_uea(data["name"])
        seq = windowed_series(raw, window=data["window"], stride=data["stride"], source=data.get("path")
                              or data["name"])
        window: int | None = int(data["window"])
    else:
        sentences = chat_topics(tuple(data["topics"]), per_topic=data["per_topic"], seed=data["seed"])
        seq = tokenized_sentences(sentences, tokenizer=data["tokenizer"], max_len=data["max_len"],
                                  unlabelled=data["unlabelled"])
        window = None
    depth = encoder_depth(net)

    def features(model: nn.Module, layers: int):
        return sequence_features(model, seq, tuple(range(depth - layers, depth)), window=window,
                                 stride=int(data.get("stride", 1)), device=device)

    raw_features = raw_sequence_features(seq, window=window, vocab_size=seq.get("vocab_size", 0))
    scores, last = frozen_probes({"": net}, features, lambda m: layer_dims(m, (depth - 1,))[0], raw_features,
                                 "raw", layers=min(int(record.layers or 1), depth), k=record.k,
                                 temperature=record.temperature, linear=linear, seed=record.seed)
    if attentive:  # every token of the last layer
        from stepkit.attentive_probe import attentive_probe
        from stepkit.jepa import sequence_token_sets

        (fit_x, fit_pad, fit_y), (held_x, held_pad, held_y) = sequence_token_sets(
            net, seq, depth - 1, window=window, stride=int(data.get("stride", 1)), device=device)
        fitted = attentive_probe(fit_x, fit_y, held_x, held_y, train_padding=fit_pad, test_padding=held_pad,
                                 seed=record.seed, device=device)
        scores["attentive_acc"] = fitted["acc"]
    return {key: v for key, v in scores.items() if not key.endswith("_raw")}, last[""][1]


def load_part(source: str | os.PathLike, part: str, *, checkpoint: str = "last",
              device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """One part of a checkpoint rebuilt from its architecture record, its weights loaded, in eval mode on
    ``device``; and its description (``read_part``'s).

    Examples:
        >>> import tempfile, pathlib
        >>> from stepkit import TrainState
        >>> from stepkit.checkpoint import save_last
        >>> from stepkit.models import SmallCNN
        >>> from stepkit.weights import describe_part
        >>> net = SmallCNN(1, (4,))
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=2)
        >>> meta = {"parts": {"encoder": describe_part(net, source="model", prefix="", about="a CNN")}}
        >>> _ = save_last(run / "checkpoints", state, meta=meta)
        >>> loaded, info = load_part(run, "encoder")
        >>> info["step"], loaded.training, torch.equal(loaded.features[0].weight, net.features[0].weight)
        (2, False, True)
    """
    state, info = read_part(source, part, checkpoint=checkpoint)
    net = build_arch(info["arch"])
    net.load_state_dict(state)
    return net.to(device).eval(), info


def tokenizer_of(facts: dict[str, Any]) -> Callable:
    """A part's tokenizer from its description (``tokenizer``: a Hugging Face folder, or a word list).

    Examples:
        >>> words = {"kind": "words", "vocabulary": ["a", "one"], "max_len": 8}
        >>> tokenize = tokenizer_of({"tokenizer": words})
        >>> tokenize(["a one", "one"])["input_ids"].tolist()
        [[2, 3], [3, 0]]
    """
    from stepkit.models.text import WordTokenizer, pretrained_tokenizer

    spec = facts["tokenizer"]
    if spec["kind"] == "words":
        return WordTokenizer(spec["vocabulary"])  # one word a text: the same sorted vocabulary
    return pretrained_tokenizer(spec["path"], max_len=int(spec["max_len"]))


@torch.no_grad()
def _retrieval(texts_net: nn.Module, info: dict, record: ProbeRecord, source, checkpoint: str,
               device: torch.device) -> tuple[dict[str, float], tuple[Tensor, Tensor, dict[int, str]]]:
    """The contrastive recipe's held-out retrieval, recomputed: both towers rebuilt from the checkpoint,
    the held-out pairs from the run's ``--data.*`` (``pairs_from_record``), embedded as the recipe does;
    and both sides' embeddings, labelled 0 (the images or anchors) and 1 (the texts), and those names."""
    from stepkit.data import pair_sets, pairs_from_record
    from stepkit.evaluation import held_out_retrieval, paired_relevance

    assert record.queries is not None  # the record's check
    queries_net, query_info = load_part(source, record.queries, checkpoint=checkpoint, device=device)
    data = pair_sets(pairs_from_record(record.data), seed=int(record.data["seed"]))
    to_device = lambda tokens: {k: v.to(device) for k, v in tokens.items()}  # noqa: E731
    texts = texts_net(**to_device(tokenizer_of(info)(data.test_texts)))
    if data.test_anchors is not None:
        queries = queries_net(**to_device(tokenizer_of(query_info)(data.test_anchors)))
    else:
        facts = query_info["input"]
        prep = ((lambda x: x.to(device)) if "mean" not in facts
                else (lambda x: normalize(to_unit(x.to(device)), facts["mean"], facts["std"])))
        loader = DataLoader(data.test, batch_size=record.batch_size)  # type: ignore[arg-type]
        queries = torch.cat([queries_net(prep(x)) for x, _ in loader])
    relevant = paired_relevance(*data.test_pairs)
    queries, texts = queries.float().cpu(), texts.float().cpu()
    sides = torch.cat([torch.zeros(len(queries)), torch.ones(len(texts))]).long()
    text_only = data.test_anchors is not None
    names = {0: "anchors" if text_only else "images", 1: "texts"}
    return held_out_retrieval(queries, texts, relevant, widths=record.widths or (),
                              text_only=text_only), (torch.cat([queries, texts]), sides, names)


def embed_split(features: Callable[[Tensor], Tensor], dataset: Any, prep: Callable[[Tensor], Tensor],
                batch_size: int) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of every item of ``dataset``, in order, with batches dealt out across the
    ranks of a torchrun group (rank r computes batches r, r + W, ...) and gathered on every rank.

    Each batch is the batch one process would compute, so a world of any size gives the same features.

    Examples:
        >>> data = TensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5))
        >>> feats, labels = embed_split(lambda x: x.sum(1, keepdim=True), data, lambda x: x, batch_size=2)
        >>> feats.flatten().tolist(), labels.tolist()
        ([1.0, 5.0, 9.0, 13.0, 17.0], [0, 1, 2, 3, 4])
    """
    from torch.utils.data import BatchSampler, SequentialSampler

    from stepkit import dist

    batches = list(BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False))
    mine = list(range(dist.rank(), len(batches), dist.world_size()))
    loader = DataLoader(dataset, batch_sampler=[batches[i] for i in mine])
    with torch.no_grad():
        done = {i: (features(prep(x)).float().cpu(), torch.as_tensor(y)) for i, (x, y) in zip(mine, loader)}
    if dist.world_size() > 1:
        every: list[Any] = [None] * dist.world_size()
        torch.distributed.all_gather_object(every, done)
        done = {i: batch for part in every for i, batch in part.items()}
    ordered = [done[i] for i in range(len(batches))]
    return torch.cat([f for f, _ in ordered]), torch.cat([y for _, y in ordered])


def result_path(run: str | os.PathLike, checkpoint: str | os.PathLike, suffix: str = ".json") -> Path:
    """Where ``stepkit eval`` writes what it found of ``checkpoint``: ``RUN/eval/<its name><suffix>``.

    Examples:
        >>> result_path("runs/d", "runs/d/checkpoints/step_00000012.pt", "_map.png").as_posix()
        'runs/d/eval/step_00000012_map.png'
    """
    name = Path(checkpoint).name.removesuffix(".pt").removesuffix(SHARDED_SUFFIX)
    return Path(run) / "eval" / f"{name}{suffix}"


def write_result(run: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``RUN/eval/<checkpoint name>.json``; return that path.

    Examples:
        >>> import tempfile
        >>> write_result(tempfile.mkdtemp(), {"checkpoint": "x/checkpoints/last.dcp", "knn_acc": 0.5}).name
        'last.json'
    """
    path = result_path(run, result["checkpoint"])
    atomic_write_bytes(path, json.dumps(result, indent=2).encode() + b"\n")
    return path

"""stepkit.probe: the typed probe record a recipe saves, and `stepkit eval` probing by it and nothing else."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stepkit import TrainState
from stepkit.augment import normalize, to_unit
from stepkit.checkpoint import save_last
from stepkit.data import digits_canvas
from stepkit.evaluation import knn_accuracy
from stepkit.models import SmallCNN
from stepkit.probe import ProbeRecord, embed_split, evaluate_checkpoint
from stepkit.weights import describe_part

DIGITS = {"kind": "digits_canvas", "seed": 0, "size": 16}


@given(features=st.sampled_from(["forward", "pooled_patches", "sequence"]), k=st.integers(1, 50),
       temperature=st.floats(0.01, 1.0), linear=st.booleans(), pool=st.integers(1, 4),
       layers=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_a_record_survives_the_checkpoint_round_trip(features, k, temperature, linear, pool, layers, seed):
    record = ProbeRecord(features, data=DIGITS, k=k, temperature=temperature, linear=linear, pool=pool,
                         layers=layers, seed=seed)
    saved = json.loads(json.dumps(record.as_dict()))  # what a checkpoint's meta keeps
    assert ProbeRecord.from_dict(saved) == record
    assert saved["version"] == ProbeRecord.VERSION == 1


def test_a_record_written_before_versions_is_version_1():
    old = {"features": "forward", "k": 10, "temperature": 0.07, "linear": False, "batch_size": 64, "seed": 0,
           "data": DIGITS}  # what round-3 DINO runs saved
    assert ProbeRecord.from_dict(old).version == 1


@pytest.mark.parametrize("change, message", [
    ({"version": 2}, "where: version 2, this stepkit reads version 1 (upgrade stepkit to evaluate this run)"),
    ({"features": "attentive"},
     "where: features='attentive' is not one stepkit eval knows: forward | pooled_patches | sequence | "
     "retrieval | voxels"),
    ({"features": "pooled_patches", "layers": 4}, "where: features='pooled_patches' needs pool"),
    ({"features": "sequence"}, "where: features='sequence' needs layers"),
    ({"features": "voxels"}, "where: features='voxels' needs window"),
    ({"pool_size": 2}, "where: unknown field(s) pool_size: written by a newer stepkit or an edited recipe; "
                       "this stepkit reads batch_size, data, features, k, layers, linear, pool, queries, "
                       "seed, temperature, version, widths, window"),
    ({"data": {"seed": 0}}, "where: data must say its kind, e.g. {'kind': 'digits_canvas', ...}"),
    ({"data": None}, "where: data must say its kind, e.g. {'kind': 'digits_canvas', ...}"),
])
def test_a_record_stepkit_eval_cannot_honour_is_refused_in_one_line(change, message):
    record = {**ProbeRecord("forward", data=DIGITS).as_dict(), **change}
    with pytest.raises(ValueError) as err:
        ProbeRecord.from_dict(record, where="where")
    assert str(err.value) == message


def test_a_run_without_labelled_data_records_empty_data():
    assert ProbeRecord("forward", data={}).data == {}  # stepkit eval then asks for --train-root / --val-root


def test_a_record_without_features_or_data_is_refused():
    with pytest.raises(ValueError, match="^where: no features or data$"):
        ProbeRecord.from_dict({"k": 3}, where="where")


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    """A checkpoint of a small CNN, with the part's probe record to be rewritten by each test."""
    torch.manual_seed(0)
    net = SmallCNN(1, (8, 16), pool=2)
    run = tmp_path_factory.mktemp("run")
    return net, run


def save_with(net, run, record: dict):
    part = describe_part(net, source="model", prefix="", about="a CNN", probe=record)
    state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1), step=5)
    save_last(run / "checkpoints", state, meta={"parts": {"encoder": part}})


def test_eval_probes_as_the_record_says_so_a_changed_evaluation_needs_a_changed_record(saved_cnn):
    """The k of the record, not a default, decides the k-NN number: a recipe whose evaluation moves
    to another k and keeps its old record would be reproduced wrongly, which is why records are typed."""
    net, run = saved_cnn
    digits = digits_canvas(seed=0, size=16)
    prep = lambda x: normalize(to_unit(x), (0.5,), (0.5,))  # noqa: E731  the default when no input facts
    with torch.no_grad():
        fit = embed_split(net.eval(), torch.utils.data.TensorDataset(digits["train_images"],
                                                                      digits["train_labels"]), prep, 64)
        held = embed_split(net, torch.utils.data.TensorDataset(digits["test_images"], digits["test_labels"]),
                           prep, 64)
    results = {}
    for k in (1, 20):
        save_with(net, run, ProbeRecord("forward", data=DIGITS, k=k, temperature=0.07).as_dict())
        results[k] = evaluate_checkpoint(run, "encoder")["knn_acc"]
        assert results[k] == knn_accuracy(*fit, *held, k=k, temperature=0.07)
    assert results[1] != results[20]


def test_stepkit_eval_names_the_part_and_refuses_a_record_of_another_version(saved_cnn):
    net, run = saved_cnn
    save_with(net, run, {**ProbeRecord("forward", data=DIGITS).as_dict(), "version": 2})
    out = subprocess.run([sys.executable, "-m", "stepkit", "eval", str(run)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith(
        "last.pt: part 'encoder''s probe record: version 2, this stepkit reads version 1 (upgrade stepkit to "
        "evaluate this run)")
    assert not (run / "eval").exists()


def test_the_record_fields_are_the_ones_the_docs_list():
    names = [f.name for f in dataclasses.fields(ProbeRecord)]
    assert names == ["features", "data", "k", "temperature", "linear", "batch_size", "seed", "pool", "layers",
                     "queries", "widths", "window", "version"]


def test_attentive_reads_a_vits_patch_tokens_and_its_map_is_drawn(tmp_path):
    """``stepkit eval --attentive --plot`` on a pooled_patches part (I-JEPA's), here a toy ViT on 16 px."""
    from conftest import assert_map

    from stepkit.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer.preset("toy", img_size=16, in_chans=1)
    record = ProbeRecord("pooled_patches", pool=1, layers=1, k=10, linear=False,
                         data={"kind": "digits_canvas", "seed": 0, "size": 16})
    parts = {"target": describe_part(vit, source="model", prefix="", about="a ViT", probe=record.as_dict(),
                                     input={"kind": "image", "size": 16, "channels": 1, "mean": [0.5],
                                            "std": [0.5]})}
    state = TrainState(vit, torch.optim.SGD(vit.parameters(), lr=0.1), step=1)
    save_last(tmp_path / "checkpoints", state, meta={"parts": parts})
    result = evaluate_checkpoint(tmp_path, "target", attentive=True, map_to=tmp_path / "map.png")
    assert 0.1 < result["attentive_acc"] <= 1.0 and 0.0 < result["knn_acc"] <= 1.0
    assert_map(result, tmp_path / "map.png", classes=10)

"""stepkit.two_tower: two projected towers for any pair (image-text, text-text), their init and teacher."""

import json

import pytest
import torch

from stepkit.models import SmallCNN, TinyTextEncoder
from stepkit.two_tower import Renormalized, TwoTower, TwoTowerConfig, build_two_tower, hugging_face_name


def tokens(batch: int, length: int = 4) -> dict:
    return {"input_ids": torch.randint(1, 10, (batch, length)), "attention_mask": torch.ones(batch, length)}


def test_both_towers_project_to_the_shared_dimension_and_carry_the_logit_scale():
    torch.manual_seed(0)
    model = TwoTower(SmallCNN(1, (8,)), TinyTextEncoder(10, dim=8, max_len=4), 6, init_temperature=0.05)
    images, texts = model(torch.rand(3, 1, 8, 8), tokens(3))
    assert images.shape == texts.shape == (3, 6)
    assert any(name.startswith("logit_scale") for name in model.state_dict())  # checkpoints carry it


def test_text_text_towers_take_tokens_on_both_sides():
    torch.manual_seed(0)
    model, tokenize = build_two_tower(TwoTowerConfig(text_dim=8, max_len=8), ["a cat", "a dog sat"], 1,
                                      text_only=True)
    anchors, positives = model(tokenize(["a cat"]), tokenize(["a dog sat"]))
    assert anchors.shape == positives.shape and anchors.shape[0] == 1


def test_the_tokenizer_of_a_scratch_tower_knows_the_training_words():
    _, tokenize = build_two_tower(TwoTowerConfig(text_dim=8, max_len=6), ["red square", "blue circle"], 1)
    known, unknown = tokenize(["red circle"]), tokenize(["green oval"])
    assert known["input_ids"].shape == unknown["input_ids"].shape  # padded to max_len alike
    assert not torch.equal(known["input_ids"], unknown["input_ids"])


@pytest.mark.parametrize("value, expected", [("sentence-transformers/all-MiniLM-L6-v2", True),
                                             ("./missing", False), ("/abs/missing", False),
                                             ("a/b/c", False), ("plain", False)])
def test_hub_names_are_told_from_missing_paths(value, expected):
    assert hugging_face_name(value) is expected


def test_renormalized_undoes_this_runs_normalisation_and_applies_the_towers():
    seen = []
    tower = Renormalized(lambda x: seen.append(x) or x, ((0.5,), (0.25,)), ((0.0, 0.0, 0.0), (2.0, 2.0, 2.0)),
                         channels=3)
    pixels = torch.rand(2, 1, 4, 4)
    tower.forward((pixels - 0.5) / 0.25)
    assert torch.allclose(seen[0], pixels / 2.0, atol=1e-6)


def test_a_teacher_run_that_is_not_one_is_named(tmp_path):
    from stepkit.two_tower import load_teacher

    (tmp_path / "config.json").write_text(json.dumps({"model": {"no_such_field": 1}, "data": {}}))
    with pytest.raises(ValueError, match=r"^distill.teacher_run='.*' is not allowed: expected a finished"):
        load_teacher(tmp_path, ["a"], 1, "cpu")

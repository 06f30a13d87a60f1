import math

import pytest
import torch

from stepkit.evaluation import chance_recall_at_k, recall_at_k, retrieval_metrics


def test_recall_at_k_on_a_hand_made_matrix():
    # query 0 ranks its match first, query 1 second, query 2 third
    sim = torch.tensor([[0.9, 0.1, 0.0],
                        [0.8, 0.7, 0.1],
                        [0.5, 0.6, 0.2]])
    assert recall_at_k(sim, (1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_ids_make_every_key_with_the_same_id_a_hit():
    sim = torch.tensor([[0.1, 0.9, 0.0],
                        [0.9, 0.1, 0.0],
                        [0.0, 0.9, 0.1]])
    ids = torch.tensor([5, 5, 7])  # rows 0 and 1 carry the same caption
    assert recall_at_k(sim, (1,), query_ids=ids, key_ids=ids) == {1: pytest.approx(2 / 3)}
    assert recall_at_k(sim, (1,)) == {1: 0.0}


def test_retrieval_metrics_both_directions():
    image = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]] + 0.5 * torch.eye(4)  # captions 2 and 3 closer to each other's image
    m = retrieval_metrics(image, text, ks=(1, 2))
    assert m["recall_at_1_i2t"] == m["recall_at_1_t2i"] == 0.5
    assert m["recall_at_2_i2t"] == m["recall_at_2_t2i"] == 1.0  # ranked second
    assert set(m) == {"recall_at_1_i2t", "recall_at_2_i2t", "recall_at_1_t2i", "recall_at_2_t2i"}


def test_chance_recall_matches_combinatorics_and_simulation():
    assert chance_recall_at_k(10, 10, 1) == pytest.approx(0.1)
    assert chance_recall_at_k(10, 10, 5) == pytest.approx(0.5)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    expected = (2 * (1 - math.comb(4, 2) / math.comb(6, 2)) + 4 * (1 - math.comb(5, 2) / math.comb(6, 2))) / 6
    assert chance_recall_at_k(6, 6, 2, query_ids=ids, key_ids=ids) == pytest.approx(expected)
    g = torch.Generator().manual_seed(0)
    ranks = (torch.rand(6, 6, generator=g) for _ in range(4000))
    sims = [recall_at_k(r, (2,), query_ids=ids, key_ids=ids)[2] for r in ranks]
    assert sum(sims) / len(sims) == pytest.approx(expected, abs=0.01)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one to one"):
        recall_at_k(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="both query_ids and key_ids"):
        recall_at_k(torch.zeros(2, 2), query_ids=torch.arange(2))
    with pytest.raises(ValueError, match="k=0"):
        recall_at_k(torch.zeros(2, 2), (0,))

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stepkit.evaluation import (
    chance_recall_at_k,
    paired_relevance,
    ranking_metrics,
    recall_at_k,
    repeated_targets_line,
    retrieval_metrics,
)


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


@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from("abcd")), min_size=1, max_size=12))
def test_paired_relevance_joins_every_copy_of_an_item_to_every_copy_of_its_partners(pairs):
    left, right = [p[0] for p in pairs], [p[1] for p in pairs]
    relevant = paired_relevance(left, right)
    n = len(pairs)
    expected = [[any(left[m] == left[i] and right[m] == right[j] for m in range(n)) for j in range(n)]
                for i in range(n)]
    assert relevant.tolist() == expected


def test_a_model_that_finds_every_caption_scores_one_when_captions_repeat():
    # 60 held-out pairs, 10 distinct captions (6 images each): embeddings that tell the captions apart
    # perfectly. Counted by row, a caption's hit is 1 of its 6 images: recall@1 1/6.
    captions = [f"caption {i % 10}" for i in range(60)]
    image = text = torch.nn.functional.one_hot(torch.arange(60) % 10).float()
    by_row = retrieval_metrics(image, text, ks=(1,))
    by_target = retrieval_metrics(image, text, ks=(1,), relevant=paired_relevance(range(60), captions))
    assert by_row["recall_at_1_t2i"] == pytest.approx(1 / 6)
    assert by_target == {"recall_at_1_i2t": 1.0, "recall_at_1_t2i": 1.0}
    assert chance_recall_at_k(60, 60, 1, relevant=paired_relevance(range(60), captions)) == pytest.approx(0.1)
    assert repeated_targets_line(captions) == ("held-out: 60 pairs, 10 distinct captions: identical captions "
                                               "count as one target in the recall")


def test_an_image_captioned_twice_is_found_by_either_caption_and_finds_either():
    images, captions = ["a.jpg", "a.jpg", "b.jpg"], ["a cat", "a cat asleep", "a dog"]
    relevant = paired_relevance(images, captions)
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])  # caption 1 ranks image row 0 first
    assert retrieval_metrics(image, text, ks=(1,), relevant=relevant) == {"recall_at_1_i2t": 1.0,
                                                                          "recall_at_1_t2i": 1.0}
    with pytest.raises(ValueError, match="give relevant or query_ids and key_ids, not both"):
        recall_at_k(torch.zeros(3, 3), relevant=relevant, query_ids=torch.arange(3), key_ids=torch.arange(3))
    with pytest.raises(ValueError, match=r"relevant \(3, 3\) must match the similarity matrix's 2 x 2"):
        recall_at_k(torch.zeros(2, 2), relevant=relevant)


def st_ranking(similarity, relevant, k):
    """sentence-transformers' InformationRetrievalEvaluator, written out per query: the top-k keys by
    score, MRR from the first relevant one, NDCG with binary gains against the ideal ordering."""
    mrr = ndcg = 0.0
    for scores, rel in zip(similarity.tolist(), relevant.tolist()):
        ranked = sorted(range(len(scores)), key=lambda j: -scores[j])[:k]
        gains = [1.0 if rel[j] else 0.0 for j in ranked]
        mrr += next((1.0 / (r + 1) for r, g in enumerate(gains) if g), 0.0)
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, sum(rel))))
        ndcg += dcg / idcg if idcg else 0.0
    return mrr / len(similarity), ndcg / len(similarity)


@given(queries=st.integers(1, 9), keys=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 999))
def test_mrr_and_ndcg_equal_sentence_transformers_formulas(queries, keys, k, seed):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.randn(queries, keys, generator=g)  # ties have probability 0
    relevant = torch.rand(queries, keys, generator=g) < 0.3
    got = ranking_metrics(similarity, k, relevant=relevant)
    mrr, ndcg = st_ranking(similarity, relevant, k)
    assert got["mrr"] == pytest.approx(mrr, abs=1e-12) and got["ndcg"] == pytest.approx(ndcg, abs=1e-12)


def test_retrieval_metrics_rank_both_ways_when_asked():
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.8, 0.6]])  # texts 1 and 2 swap their best
    m = retrieval_metrics(torch.eye(3), text, ks=(1,), ranked_at=10)
    assert list(m) == ["recall_at_1_i2t", "mrr_at_10_i2t", "ndcg_at_10_i2t",
                       "recall_at_1_t2i", "mrr_at_10_t2i", "ndcg_at_10_t2i"]
    assert m["mrr_at_10_i2t"] == pytest.approx((1 + 0.5 + 0.5) / 3)

"""stepkit.attentive_probe: a query that finds the token that answers, where mean pooling cannot."""

import pytest
import torch

from stepkit.attentive_probe import AttentiveClassifier, attentive_probe, pad_tokens
from stepkit.evaluation import linear_probe_accuracy


def marked_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 noise tokens an item; one, at a random place, is marked (feature 0 = 4) and carries the label's
    sign in feature 1: the mean of the tokens hides it under the noise of the others."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 16, 8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    at = torch.randint(0, 16, (n,), generator=g)
    tokens[torch.arange(n), at, 0] = 4.0
    tokens[torch.arange(n), at, 1] = 2.0 * labels - 1.0
    return tokens, labels


@pytest.mark.slow
def test_the_query_finds_the_marked_token_where_the_mean_does_not():
    (fit_x, fit_y), (held_x, held_y) = marked_tokens(400, 0), marked_tokens(200, 1)
    rng = torch.get_rng_state()
    fitted = attentive_probe(fit_x, fit_y, held_x, held_y, epochs=30, heads=2, seed=0)
    attentive = fitted["acc"]
    assert torch.equal(torch.get_rng_state(), rng)  # its own seed; the global RNG untouched
    mean = linear_probe_accuracy(fit_x.mean(1), fit_y, held_x.mean(1), held_y)
    assert attentive >= 0.9 and attentive > mean + 0.2, (attentive, mean)
    assert fitted["lr"] > 1e-3  # V-JEPA's lr leaves the query unlearned in 190 steps:
    assert attentive_probe(fit_x, fit_y, held_x, held_y, epochs=30, heads=2, lr=1e-3)["acc"] < 0.7
    again = attentive_probe(fit_x, fit_y, held_x, held_y, epochs=30, heads=2, seed=0, lr=fitted["lr"])
    assert again["acc"] == attentive  # seeded: the same fit


def test_padding_is_never_attended():
    torch.manual_seed(0)
    probe = AttentiveClassifier(8, classes=3, heads=2).eval()
    short, long = torch.randn(3, 8), torch.randn(5, 8)
    tokens, padding = pad_tokens([short, long])
    garbage = tokens.clone()
    garbage[0, 3:] = 1e4  # what padding holds must not matter
    with torch.no_grad():
        alone = probe(short[None])
        padded = probe(garbage, padding)
    torch.testing.assert_close(padded[0:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1:2], probe(long[None]).detach(), rtol=1e-5, atol=1e-5)

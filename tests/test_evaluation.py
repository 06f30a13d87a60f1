import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from stepkit.evaluation import ridge_regression
from stepkit.losses import pearson_per_voxel


def problem(seed=0, n=200, d=10, k=3, noise=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + rng.standard_normal(d)
    y = x @ rng.standard_normal((d, k)) + 2.0 + noise * rng.standard_normal((n, k))
    return torch.tensor(x), torch.tensor(y)


def test_ridge_matches_scikit_learn_on_standardised_features():
    x, y = problem()
    fit = ridge_regression(x[:150], y[:150], x[150:], y[150:], alphas=[7.0])
    z = (x[:150] - x[:150].mean(0)) / x[:150].std(0)
    reference = Ridge(alpha=7.0).fit(z.numpy(), y[:150].numpy())
    np.testing.assert_allclose(fit.weights.numpy(), reference.coef_.T, rtol=1e-8, atol=1e-10)
    z_test = (x[150:] - x[:150].mean(0)) / x[:150].std(0)
    np.testing.assert_allclose(fit(x[150:]).numpy(), reference.predict(z_test.numpy()), rtol=1e-8, atol=1e-8)


def test_alpha_is_chosen_on_validation():
    x, y = problem(n=60, d=40, noise=3.0)  # few samples, many features: strong shrinkage wins
    alphas = [1e-3, 1.0, 10.0, 100.0]
    fit = ridge_regression(x[:40], y[:40], x[40:], y[40:], alphas=alphas)
    scores = {a: ridge_regression(x[:40], y[:40], x[40:], y[40:], alphas=[a]).val_corr for a in alphas}
    assert fit.alpha == max(scores, key=scores.get) and fit.val_corr == max(scores.values())


def test_bad_alphas_are_refused():
    x, y = problem()
    with pytest.raises(ValueError, match=r"alphas=\[0.0\]"):
        ridge_regression(x, y, x, y, alphas=[0.0])


def test_knn_votes_by_weighted_similarity():
    from stepkit.evaluation import knn_accuracy

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=1) == 1.0
    # k=5: class 1 has more neighbours, but the two very close class-0 points outweigh them at T=0.07
    assert knn_accuracy(train, labels, test[:1], torch.tensor([0]), k=5, temperature=0.07) == 1.0
    assert knn_accuracy(train, labels, test[:1], torch.tensor([1]), k=5, temperature=100.0) == 1.0
    with pytest.raises(ValueError, match="k=6"):
        knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=6)


def test_linear_probe_separates_separable_features():
    from stepkit.evaluation import linear_probe_accuracy

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 5, generator=g) + 3 * y[:, None].float()
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.95


def test_extract_features_restores_training_mode():
    from stepkit.evaluation import extract_features

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)).train()
    feats = extract_features(model, torch.randn(10, 3), batch_size=4)
    assert feats.shape == (10, 2) and model.training


def test_validation_split_is_stratified_disjoint_and_seeded():
    from stepkit.evaluation import validation_split

    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, val = validation_split(labels, 0.2, seed=3)
    assert sorted(fit.tolist() + val.tolist()) == list(range(16))
    assert not set(fit.tolist()) & set(val.tolist())
    assert [int((labels[val] == c).sum()) for c in range(3)] == [2, 1, 0]  # round(0.2 n), one class of one
    assert torch.equal(validation_split(labels, 0.2, seed=3)[1], val)
    assert not torch.equal(validation_split(labels, 0.2, seed=4)[1], val)


def test_linear_probe_picks_c_on_validation_rows_only():
    from stepkit.evaluation import fit_logistic, linear_probe, linear_probe_accuracy, validation_split

    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.randn(120, 60, generator=g, dtype=torch.float64)  # 60 dims of noise, 2 of signal
    x[:, 0] += 1.5 * (y == 1)
    x[:, 1] += 1.5 * (y == 2)
    train_x, train_y, test_x, test_y = x[:90], y[:90], x[90:], y[90:]

    def standardised(fit_rows, other):
        mean, std = fit_rows.mean(0), fit_rows.std(0, unbiased=False)
        return (fit_rows - mean) / std, (other - mean) / std

    def accuracy(rows, labels, w):
        return float(((rows @ w[:-1] + w[-1]).argmax(1) == labels).double().mean())

    cs = (0.001, 0.01, 0.1, 1.0, 10.0)
    out = linear_probe(train_x, train_y, test_x, test_y, cs=cs)
    fit, val = validation_split(train_y, 0.2, seed=0)
    a, b = standardised(train_x[fit], train_x[val])
    by_hand = {c: accuracy(b, train_y[val], fit_logistic(a, train_y[fit], c, classes=3)) for c in cs}
    best = max(by_hand.values())
    assert out["c"] == min(c for c, v in by_hand.items() if v == best) and out["val_acc"] == best
    a, b = standardised(train_x, test_x)
    expected = accuracy(b, test_y, fit_logistic(a, train_y, out["c"], classes=3))
    assert out["acc"] == pytest.approx(expected, abs=1 / 30)  # warm starts: the same optimum, to tolerance
    assert out["acc"] == linear_probe_accuracy(train_x, train_y, test_x, test_y, c=out["c"])
    default = linear_probe(train_x, train_y, test_x, test_y)["acc"]  # the default grid, PROBE_CS
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == default  # c=None: chosen so


@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_fit_logistic_reaches_scikit_learns_optimum(c):
    from sklearn.linear_model import LogisticRegression

    from stepkit.evaluation import fit_logistic

    g = torch.Generator().manual_seed(1)
    y = torch.arange(150) % 3
    x = torch.randn(150, 8, generator=g, dtype=torch.float64) + 0.8 * torch.nn.functional.one_hot(y, 8)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    w = fit_logistic(x, y, c, tol=1e-10)
    torch.testing.assert_close(w[:-1].T, torch.from_numpy(reference.coef_), rtol=1e-4, atol=1e-5)
    bias = w[-1] - w[-1].mean()  # the unpenalised intercept is defined up to a shift shared by the classes
    reference_bias = torch.from_numpy(reference.intercept_ - reference.intercept_.mean())
    torch.testing.assert_close(bias, reference_bias, rtol=1e-4, atol=1e-5)
    assert torch.equal((x @ w[:-1] + w[-1]).argmax(1), torch.from_numpy(reference.predict(x.numpy())))
    w = w.clone().requires_grad_(True)  # the objective by hand: its gradient vanishes at the optimum
    loss = torch.nn.functional.cross_entropy(x @ w[:-1] + w[-1], y) + w[:-1].square().sum() / (2 * c * 150)
    loss.backward()
    assert w.grad.abs().max() < 1e-5


def test_ridge_per_target_takes_each_columns_own_best_alpha():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 12, generator=g, dtype=torch.float64)
    clean = x[:, :1] * 2.0
    y = torch.cat([clean + 0.05 * torch.randn(80, 1, generator=g, dtype=torch.float64),  # near noiseless
                   x @ torch.randn(12, 1, generator=g, dtype=torch.float64) * 0.2
                   + 3.0 * torch.randn(80, 1, generator=g, dtype=torch.float64)], dim=1)  # mostly noise
    alphas = (0.01, 1.0, 100.0, 10000.0)
    fit = ridge_regression(x[:50], y[:50], x[50:], y[50:], alphas=alphas, per_target=True)
    singles = {a: ridge_regression(x[:50], y[:50], x[50:], y[50:], alphas=[a]) for a in alphas}
    for col in range(2):
        scores = [pearson_per_voxel(singles[a](x[50:]), y[50:])[col].item() for a in alphas]
        best = alphas[scores.index(max(scores))]
        assert fit.alphas[col].item() == best
        torch.testing.assert_close(fit.weights[:, col], singles[best].weights[:, col])
    assert fit.alphas[0] < fit.alphas[1]  # the noisy voxel is regularised harder
    shared = ridge_regression(x[:50], y[:50], x[50:], y[50:], alphas=alphas)
    assert fit.val_corr >= shared.val_corr and shared.alphas is None

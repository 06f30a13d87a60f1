"""Tools around the loop: baselines and evaluations of frozen features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stepkit.losses.correlation import pearson_per_voxel

DEFAULT_ALPHAS = tuple(10.0**k for k in range(-2, 7))


@dataclass
class RidgeFit:
    """A ridge regression fitted by ``ridge_regression``: predict with ``fit(x)``."""

    weights: Tensor
    intercept: Tensor
    x_mean: Tensor
    x_scale: Tensor
    alpha: float
    val_corr: float
    """Mean per-column Pearson r on the validation set at the chosen ``alpha``."""

    def __call__(self, x: Tensor) -> Tensor:
        z = (x.to(self.weights.dtype) - self.x_mean) / self.x_scale
        return z @ self.weights + self.intercept


@torch.no_grad()
def ridge_regression(
    x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> RidgeFit:
    """Closed-form ridge from ``x`` to ``y`` (the encoding-model baseline), alpha chosen on validation.

    Features are standardised with training statistics and targets centred,
    then ``W(a) = V diag(s / (s^2 + a)) U^T y`` from one SVD ``x = U S V^T``
    gives every alpha's solution; the one with the highest mean validation
    Pearson r (per target column) wins. Computed in float64.
    """
    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas={list(alphas)!r} is not allowed: expected positive numbers")
    x, y = x_train.double(), y_train.double()
    x_mean, x_scale = x.mean(0), x.std(0).clamp_min(1e-8)
    y_mean = y.mean(0)
    u, s, vh = torch.linalg.svd((x - x_mean) / x_scale, full_matrices=False)
    uty = u.T @ (y - y_mean)
    z_val = (x_val.double() - x_mean) / x_scale
    best = None
    for alpha in alphas:
        w = vh.T @ ((s / (s.square() + alpha))[:, None] * uty)
        r = pearson_per_voxel(z_val @ w + y_mean, y_val.double()).mean().item()
        if best is None or r > best[0]:
            best = (r, alpha, w)
    r, alpha, w = best
    return RidgeFit(w, y_mean, x_mean, x_scale, float(alpha), r)


@torch.no_grad()
def extract_features(encoder, images: Tensor, *, batch_size: int = 256, device=None) -> Tensor:
    """``encoder(images)`` in eval mode, batch by batch, without gradients; features on the CPU."""
    was_training = getattr(encoder, "training", False)
    if hasattr(encoder, "eval"):
        encoder.eval()
    try:
        chunks = [encoder(images[i : i + batch_size].to(device)).float().cpu()
                  for i in range(0, len(images), batch_size)]
    finally:
        if was_training:
            encoder.train()
    return torch.cat(chunks)


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN accuracy of frozen features (DINO's evaluation).

    Cosine similarity to the training set; each of the ``k`` nearest
    neighbours votes for its label with weight ``exp(sim / temperature)``;
    the class with the most weight wins.
    """
    if k < 1 or k > len(train_features):
        raise ValueError(f"k={k} is not allowed: expected 1 <= k <= {len(train_features)} (the training set)")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), chunk):
        sims, idx = (test[start : start + chunk] @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(sims), classes).scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk]).sum())
    return correct / len(test)


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    c: float = 1.0,
) -> float:
    """Accuracy of a logistic regression on standardised frozen features (scikit-learn, L2, ``C=c``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    probe.fit(train_features.float().numpy(), train_labels.numpy())
    return float(probe.score(test_features.float().numpy(), test_labels.numpy()))

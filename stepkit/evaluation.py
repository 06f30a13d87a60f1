"""Evaluation of frozen features and the encoding-model baseline: ridge, k-NN, linear probes, retrieval.

Each a function of tensors (and labels); nothing here trains the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stepkit import check as _check
from stepkit.losses.correlation import pearson_per_voxel
from stepkit.step import at_least_float32

__all__ = ["DEFAULT_ALPHAS", "RidgeFit", "ridge_regression", "extract_features", "loader_features",
           "knn_accuracy", "PROBE_CS", "validation_split", "linear_probe", "fit_logistic",
           "linear_probe_accuracy", "recall_at_k", "paired_relevance", "repeated_targets_line",
           "chance_recall_at_k", "ranking_metrics", "retrieval_metrics", "held_out_retrieval",
           "frozen_probes", "probes_line"]

DEFAULT_ALPHAS = tuple(10.0**k for k in range(-2, 7))


@dataclass
class RidgeFit:
    """A ridge regression fitted by ``ridge_regression``: predict with ``fit(x)``.

    ``fit(x) = ((x - x_mean) / x_scale) @ weights + intercept``, in float64.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 30, generator=g)  # 30 features, 32 samples to fit them
        >>> y = torch.stack([x[:, 0], x.sum(1) + 3 * torch.randn(64, generator=g)], 1)
        >>> fit = ridge_regression(x[:32], y[:32], x[32:], y[32:], alphas=(1e-2, 1e4), per_target=True)
        >>> fit.alphas.tolist()  # the exact voxel keeps a small alpha; the noisy one takes a large one
        [0.01, 10000.0]
        >>> fit(x[32:]).shape
        torch.Size([32, 2])
    """

    weights: Tensor
    intercept: Tensor
    x_mean: Tensor
    x_scale: Tensor
    alpha: float
    """The chosen alpha (``per_target``: the median of the columns' alphas)."""
    val_corr: float
    """Mean per-column Pearson r on the validation set at the chosen alpha(s)."""
    alphas: Tensor | None = None
    """``per_target``: each column's alpha ``(targets,)``; None when one alpha serves all."""

    def __call__(self, x: Tensor) -> Tensor:
        z = (x.to(self.weights.dtype) - self.x_mean) / self.x_scale
        return z @ self.weights + self.intercept


@torch.no_grad()
def ridge_regression(
    x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, alphas: Sequence[float] = DEFAULT_ALPHAS,
    *, per_target: bool = False,
) -> RidgeFit:
    """Closed-form ridge from ``x`` to ``y`` (the encoding-model baseline), alpha chosen on validation.

    Features are standardised with training statistics and targets centred,
    then ``W(a) = V diag(s / (s^2 + a)) U^T y`` from one SVD ``x = U S V^T``
    gives every alpha's solution. One alpha for all columns: the one with the
    highest mean validation Pearson r wins. ``per_target=True`` (the encoding-
    model standard, as himalaya or scikit-learn's ``alpha_per_target`` do it):
    each column (voxel) takes the alpha of its own highest validation r
    (the smallest on a tie), and its column of ``W`` is that alpha's.
    Computed in float64.

    Args:
        x_train: ``(N, F)`` training features.
        y_train: ``(N, V)`` training targets.
        x_val: ``(M, F)`` validation features.
        y_val: ``(M, V)`` validation targets.
        alphas: Regularisations to try, each > 0.
        per_target: Each column its own alpha.

    Returns:
        A ``RidgeFit`` (``fit(x)`` predicts; ``fit.alpha`` / ``fit.alphas``, ``fit.val_corr``).

    Raises:
        ValueError: for no alphas or one that is not positive.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(50, 3, generator=g)
        >>> y = x @ torch.tensor([[1.0], [2.0], [0.0]])
        >>> fit = ridge_regression(x[:40], y[:40], x[40:], y[40:], alphas=(1e-3,))
        >>> round(fit.val_corr, 4)
        1.0
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
    per_column = []  # per_target: each alpha's weights and per-column validation r
    for alpha in alphas:
        w = vh.T @ ((s / (s.square() + alpha))[:, None] * uty)
        r_columns = pearson_per_voxel(z_val @ w + y_mean, y_val.double())
        per_column.append((w, r_columns))
        r = r_columns.mean().item()
        if best is None or r > best[0]:
            best = (r, alpha, w)
    assert best is not None  # alphas is not empty (checked)
    if not per_target:
        r, alpha, w = best
        return RidgeFit(w, y_mean, x_mean, x_scale, float(alpha), r)
    scores = torch.stack([r for _, r in per_column])  # (alphas, columns)
    choice = scores.argmax(dim=0)  # the first maximum: the smallest alpha on a tie, alphas as given
    weights = torch.stack([w for w, _ in per_column])  # (alphas, features, columns)
    w = weights.gather(0, choice[None, None, :].expand(1, weights.shape[1], -1))[0]
    chosen = torch.tensor([float(a) for a in alphas], dtype=torch.float64)[choice]
    val_corr = scores.gather(0, choice[None])[0].mean().item()
    return RidgeFit(w, y_mean, x_mean, x_scale, float(chosen.median()), val_corr, chosen)


@torch.no_grad()
def extract_features(encoder, images: Tensor, *, batch_size: int = 256, device=None) -> Tensor:
    """``encoder(images)`` in eval mode, batch by batch, without gradients; features on the CPU.

    Args:
        encoder: A module (put in eval mode for the call, its mode restored).
        images: ``(N, ...)`` inputs.
        batch_size: Rows per forward pass.
        device: Where to run (default: the encoder's).

    Returns:
        ``(N, D)`` features on the CPU.

    Examples:
        >>> extract_features(torch.nn.Flatten(), torch.zeros(3, 2, 2), batch_size=2).shape
        torch.Size([3, 4])
    """
    with _eval_mode(encoder):
        chunks = [at_least_float32(encoder(images[i : i + batch_size].to(device))).cpu()
                  for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@contextlib.contextmanager
def _eval_mode(encoder):
    """A module in eval mode for the block, each of its modules' mode restored after (a plain function:
    nothing to do)."""
    modes = [(m, m.training) for m in encoder.modules()] if isinstance(encoder, torch.nn.Module) else []
    if modes:
        encoder.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def loader_features(encoder, batches, prep=None) -> tuple[Tensor, Tensor]:
    """``encoder(prep(x))`` over a loader's ``(x, y)`` batches, without gradients and in eval mode
    (a module's mode is restored): float32 features and their labels, on the CPU.

    Args:
        encoder: A module, or any function of a batch of inputs.
        batches: ``(inputs, labels)`` pairs, e.g. a ``DataLoader`` of a labelled dataset.
        prep: Applied to each batch's inputs first (to the device, normalised, ...).

    Returns:
        ``(features (N, D), labels (N,))``.

    Examples:
        >>> batches = [(torch.ones(2, 2, 2), torch.tensor([0, 1])), (torch.zeros(1, 2, 2), torch.tensor([2]))]
        >>> features, labels = loader_features(torch.nn.Flatten(), batches, prep=lambda x: 2 * x)
        >>> features.sum(dim=1).tolist(), labels.tolist()
        ([8.0, 8.0, 0.0], [0, 1, 2])
    """
    with _eval_mode(encoder):
        out = [(encoder(x if prep is None else prep(x)).float().cpu(), y) for x, y in batches]
    return torch.cat([f for f, _ in out]), torch.cat([torch.as_tensor(y) for _, y in out])


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

    Args:
        train_features: ``(N, D)``.
        train_labels: ``(N,)`` integer labels.
        test_features: ``(M, D)``.
        test_labels: ``(M,)``.
        k: Neighbours, at most ``N``.
        temperature: The vote's temperature.
        chunk: Test rows per similarity block.

    Returns:
        The fraction of test rows classified right.

    Raises:
        ValueError: for ``k`` outside ``1..N``.

    Examples:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_accuracy(train, torch.tensor([0, 0, 1]), torch.tensor([[0.1, 1.0]]), torch.tensor([1]), k=1)
        1.0
    """
    if k < 1 or k > len(train_features):
        raise ValueError(f"k={k} is not allowed: expected 1 <= k <= {len(train_features)} (the training set)")
    train = F.normalize(at_least_float32(train_features), dim=1)
    test = F.normalize(at_least_float32(test_features).to(train), dim=1)
    train_labels, test_labels = train_labels.to(train.device), test_labels.to(train.device)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), chunk):
        sims, idx = (test[start : start + chunk] @ train.t()).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = sims.new_zeros(len(sims), classes).scatter_add_(1, train_labels[idx], weights)
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk]).sum())
    return correct / len(test)


PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def validation_split(labels: Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(fit_idx, val_idx)``: a stratified, seeded split of a labelled set's row indices.

    Each class gives ``round(fraction * n_c)`` of its rows to validation (at
    least one when it has two or more, none when it has one), chosen by a
    permutation seeded with ``seed``; both index tensors are sorted.

    Args:
        labels: ``(N,)`` integer labels.
        fraction: The share of each class for validation, in [0, 1).
        seed: The permutation's seed.

    Returns:
        ``(fit_idx, val_idx)``, sorted.

    Examples:
        >>> fit, val = validation_split(torch.tensor([0, 0, 0, 0, 1, 1]), fraction=0.5, seed=0)
        >>> len(fit), len(val)
        (3, 3)
    """
    _check.in_range("fraction", fraction, 0.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit, val = [], []
    for cls in labels.unique(sorted=True):
        rows = (labels == cls).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_val = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        val.append(rows[:n_val])
        fit.append(rows[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    cs: Sequence[float] = PROBE_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    search_tol: float = 1e-4,
) -> dict[str, float]:
    """A logistic-regression probe whose regularisation is chosen on held-out training rows.

    Features are standardised (statistics of the rows a probe is fitted on);
    for each inverse regularisation ``C`` in ``cs`` a probe
    (``fit_logistic``) is fitted on the training rows outside
    ``validation_split(train_labels, val_fraction, seed)`` and scored on the
    rows inside; the best ``C`` (the smallest on a tie) is refitted on every
    training row and scored on the test set, which took no part in the
    choice (I-JEPA's protocol). Returns ``acc`` (test), ``c`` and ``val_acc``.

    The fits that choose ``C`` stop at ``search_tol`` (scikit-learn's
    default tolerance, on the same mean objective), the refit at
    ``fit_logistic``'s 1e-6: on I-JEPA's digits probes this chose the same
    ``C`` as fits to 1e-6 everywhere, in a third of the time.

    Args:
        train_features: ``(N, D)``.
        train_labels: ``(N,)``.
        test_features: ``(M, D)``.
        test_labels: ``(M,)``.
        cs: Inverse regularisations to choose from.
        val_fraction: The validation share of each class.
        seed: The split's seed.
        search_tol: The gradient tolerance of the fits that choose ``C``.

    Returns:
        ``{"acc": test accuracy, "c": the chosen C, "val_acc": its validation accuracy}``.

    Examples:
        >>> x = torch.tensor([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2]])
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> linear_probe(x, y, torch.tensor([[0.05], [1.05]]), torch.tensor([0, 1]))["acc"]
        1.0
    """
    if not cs:
        raise ValueError("cs=() is not allowed: expected at least one value of C")
    for c in cs:
        _check.at_least("cs", c, 1e-12)
    train = train_features.detach().cpu().double()
    labels = train_labels.cpu().long()
    classes = int(max(labels.max(), test_labels.max())) + 1
    fit, val = validation_split(labels, val_fraction, seed)
    x_fit, x_val = _standardise(train[fit], train[val])
    best, weights = None, None
    for c in sorted(cs):  # each fit starts from the previous C's solution: fewer iterations
        weights = fit_logistic(x_fit, labels[fit], c, classes=classes, init=weights, tol=search_tol)
        score = _accuracy(x_val, labels[val], weights) if len(val) else 0.0
        if best is None or score > best[1]:
            best = (c, score, weights)
    assert best is not None  # cs is not empty (checked)
    c, val_acc, chosen = best
    x_train, x_test = _standardise(train, test_features.detach().cpu().double())
    weights = fit_logistic(x_train, labels, c, classes=classes, init=chosen)
    return {"acc": _accuracy(x_test, test_labels.cpu().long(), weights), "c": float(c), "val_acc": val_acc}


def fit_logistic(
    x: Tensor, y: Tensor, c: float, *, classes: int | None = None, init: Tensor | None = None,
    max_iter: int = 1000, tol: float = 1e-6,
) -> Tensor:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS: ``(D + 1, classes)`` weights.

    Minimises scikit-learn's ``LogisticRegression(C=c)`` objective (the
    intercept, the last row, not penalised), divided by the row count::

        mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 c n)

    It is strictly convex, so both reach the same optimum: predictions agree
    with scikit-learn's and the coefficients to the solvers' tolerance
    (tested). In float64; ``init`` warm-starts (another C's solution); stops
    when the largest gradient entry is below ``tol`` or after ``max_iter``
    iterations. Logits: ``x @ W[:-1] + W[-1]``.

    Args:
        x: ``(N, D)`` features.
        y: ``(N,)`` integer labels.
        c: The inverse regularisation, > 0.
        classes: The number of classes (default ``max(y) + 1``).
        init: ``(D + 1, classes)`` starting weights.
        max_iter: L-BFGS iterations at most.
        tol: The gradient-norm tolerance.

    Returns:
        ``(D + 1, classes)`` float64 weights, the intercept last.

    Examples:
        >>> w = fit_logistic(torch.tensor([[-1.0], [1.0]]), torch.tensor([0, 1]), c=10.0)
        >>> w.shape, bool(w[0, 1] > w[0, 0])
        (torch.Size([2, 2]), True)
    """
    _check.at_least("c", c, 1e-12)
    x, y = x.detach().double(), y.long()
    n, d = x.shape
    k = classes if classes is not None else int(y.max()) + 1
    w = torch.zeros(d + 1, k, dtype=torch.float64) if init is None else init.detach().clone().double()
    w.requires_grad_(True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w[:-1] + w[-1], y, reduction="mean") + w[:-1].square().sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return w.detach()


def _standardise(fit_rows: Tensor, *others: Tensor) -> list[Tensor]:
    # StandardScaler's rule: the fitted rows' mean and population std; a constant feature is only centred
    mean, std = fit_rows.mean(dim=0), fit_rows.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(t - mean) / std for t in (fit_rows, *others)]


def _accuracy(x: Tensor, y: Tensor, weights: Tensor) -> float:
    return float(((x @ weights[:-1] + weights[-1]).argmax(dim=1) == y).double().mean())


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    c: float | None = None,
) -> float:
    """Test accuracy of a logistic regression on standardised frozen features (L2, ``fit_logistic``).

    ``c=None``: the inverse regularisation is chosen on a validation split of
    the training set (``linear_probe``); a number fixes it (a fixed ``C=1`` on
    a thousand standardised features overfits a small training set).

    Args:
        train_features: ``(N, D)``.
        train_labels: ``(N,)``.
        test_features: ``(M, D)``.
        test_labels: ``(M,)``.
        c: A fixed inverse regularisation, or None to choose it.

    Returns:
        The test accuracy.

    Examples:
        >>> x, y = torch.tensor([[-1.0], [-0.9], [0.9], [1.0]]), torch.tensor([0, 0, 1, 1])
        >>> linear_probe_accuracy(x, y, x, y, c=1.0)
        1.0
    """
    if c is None:
        return linear_probe(train_features, train_labels, test_features, test_labels)["acc"]
    _check.at_least("c", c, 1e-12)
    train, test = _standardise(train_features.detach().cpu().double(), test_features.detach().cpu().double())
    labels = train_labels.cpu().long()
    classes = int(max(labels.max(), test_labels.max())) + 1
    return _accuracy(test, test_labels.cpu().long(), fit_logistic(train, labels, c, classes=classes))


# --- retrieval ------------------------------------------------------------------------------


def paired_relevance(left: Sequence[Hashable], right: Sequence[Hashable]) -> Tensor:
    """Which right-hand items answer each left-hand one, for held-out pairs ``(left[m], right[m])`` in which
    an item may repeat: ``R[i, j]`` is True when some pair joins an item equal to ``left[i]`` to one equal
    to ``right[j]``.

    Identical captions are one target: a caption written for two images is a hit for either, and an image
    captioned twice is found by either caption. Counting only row ``i`` as row ``i``'s match would score a
    perfect model at 1 / (copies) on such data. Image → text recall reads ``R``, text → image ``R.T``.

    Args:
        left: Each row's left item or its identity (an image's path or id, an anchor text).
        right: Each row's right item or its identity (a caption, a positive text).

    Returns:
        ``(N, N)`` bool.

    Examples:
        >>> paired_relevance(["a.jpg", "b.jpg", "c.jpg"], ["a bar", "a bar", "a disc"]).int()
        tensor([[1, 1, 0],
                [1, 1, 0],
                [0, 0, 1]], dtype=torch.int32)
    """
    if len(left) != len(right):
        raise ValueError(f"{len(left)} left items and {len(right)} right items: a pair is one of each")
    left_ids, right_ids = _first_seen(left), _first_seen(right)
    table = torch.zeros(int(left_ids.max()) + 1, int(right_ids.max()) + 1, dtype=torch.bool)
    table[left_ids, right_ids] = True  # the pairs, between identities
    return table[left_ids][:, right_ids]


def repeated_targets_line(texts: Sequence[Hashable], what: str = "captions") -> str | None:
    """``"held-out: 60 pairs, 10 distinct captions: identical captions are one target (...)"``, or None when
    every held-out text differs.

    Examples:
        >>> repeated_targets_line(["a bar", "a bar", "a disc"])
        'held-out: 3 pairs, 2 distinct captions: identical captions count as one target in the recall'
        >>> repeated_targets_line(["a bar", "a disc"]) is None
        True
    """
    distinct = len(set(texts))
    if distinct == len(texts):
        return None
    return (f"held-out: {len(texts)} pairs, {distinct} distinct {what}: identical {what} count as one target "
            "in the recall")


def _first_seen(items: Sequence[Hashable]) -> Tensor:
    numbers: dict[Hashable, int] = {}
    return torch.tensor([numbers.setdefault(item, len(numbers)) for item in items], dtype=torch.long)


def _relevance(n_queries: int, n_keys: int, query_ids: Tensor | None, key_ids: Tensor | None,
               relevant: Tensor | None = None) -> Tensor:
    if relevant is not None:
        if query_ids is not None or key_ids is not None:
            raise ValueError("give relevant or query_ids and key_ids, not both")
        if tuple(relevant.shape) != (n_queries, n_keys):
            raise ValueError(f"relevant {tuple(relevant.shape)} must match the similarity matrix's "
                             f"{n_queries} x {n_keys}")
        return relevant.bool().cpu()
    if (query_ids is None) != (key_ids is None):
        raise ValueError("give both query_ids and key_ids, or neither (then key i is query i's match)")
    if query_ids is None:
        if n_queries != n_keys:
            raise ValueError(f"{n_queries} queries and {n_keys} keys: without ids they must pair one to one")
        return torch.eye(n_queries, dtype=torch.bool)
    assert key_ids is not None
    if len(query_ids) != n_queries or len(key_ids) != n_keys:
        raise ValueError(f"query_ids ({len(query_ids)}) and key_ids ({len(key_ids)}) must match the "
                         f"similarity matrix's {n_queries} x {n_keys}")
    return query_ids.reshape(-1, 1).cpu() == key_ids.reshape(1, -1).cpu()


@torch.no_grad()
def recall_at_k(
    similarity: Tensor, ks: Sequence[int] = (1, 5, 10), *,
    query_ids: Tensor | None = None, key_ids: Tensor | None = None, relevant: Tensor | None = None,
) -> dict[int, float]:
    """Recall@k of a ``(queries, keys)`` similarity matrix: the fraction of queries with a relevant key
    among their ``k`` most similar.

    Key j is relevant to query i when ``query_ids[i] == key_ids[j]`` (e.g.
    the same caption, or the image a caption was written for), or where
    ``relevant[i, j]`` (``paired_relevance``); without either, key i is query
    i's only match.

    Args:
        similarity: ``(queries, keys)`` scores.
        ks: The cut-offs.
        query_ids: ``(queries,)`` ids, with ``key_ids``.
        key_ids: ``(keys,)`` ids.
        relevant: ``(queries, keys)`` bool, instead of ids.

    Returns:
        ``{k: recall}``.

    Raises:
        ValueError: for ids given alone, of the wrong length, or no ids with a non-square matrix.

    Examples:
        >>> recall_at_k(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), ks=(1, 2))  # query 1's match ranks second
        {1: 0.5, 2: 1.0}
    """
    relevant = _relevance(similarity.shape[0], similarity.shape[1], query_ids, key_ids, relevant)
    out = {}
    for k in ks:
        _check.integer_at_least("k", k, 1)
        top = similarity.float().cpu().topk(min(k, similarity.shape[1]), dim=1).indices
        out[k] = relevant.gather(1, top).any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def ranking_metrics(
    similarity: Tensor, k: int = 10, *, query_ids: Tensor | None = None, key_ids: Tensor | None = None,
    relevant: Tensor | None = None,
) -> dict[str, float]:
    """MRR@k and NDCG@k of a ``(queries, keys)`` similarity matrix, with binary relevance, as
    sentence-transformers' ``InformationRetrievalEvaluator`` computes them.

    MRR@k: the mean over queries of ``1 / rank`` of the first relevant key among the ``k`` most similar
    (0 if none). NDCG@k: ``DCG / IDCG`` with ``DCG = sum_{r <= k} rel_r / log2(r + 1)`` over the ranked
    keys and ``IDCG`` the same for the query's relevant keys ranked first. Relevance as in
    ``recall_at_k`` (ids, ``relevant``, or key i for query i).

    Args:
        similarity: ``(queries, keys)`` scores.
        k: The cut-off.
        query_ids: ``(queries,)`` ids, with ``key_ids``.
        key_ids: ``(keys,)`` ids.
        relevant: ``(queries, keys)`` bool, instead of ids.

    Returns:
        ``{"mrr": ..., "ndcg": ...}``.

    Examples:
        >>> scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # query 0's match ranks first, query 1's second
        >>> {name: round(v, 4) for name, v in ranking_metrics(scores, k=2).items()}  # (1 + 1/2) / 2
        {'mrr': 0.75, 'ndcg': 0.8155}
    """
    _check.integer_at_least("k", k, 1)
    relevant = _relevance(similarity.shape[0], similarity.shape[1], query_ids, key_ids, relevant)
    k = min(k, similarity.shape[1])
    top = similarity.float().cpu().topk(k, dim=1).indices
    hits = relevant.gather(1, top).double()  # (queries, k): 1 where the r-th ranked key is relevant
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    first = torch.where(hits.any(dim=1), hits.argmax(dim=1).double() + 1, torch.inf)
    ideal = (torch.arange(k).unsqueeze(0) < relevant.sum(dim=1, keepdim=True)).double() @ discount
    ndcg = torch.where(ideal > 0, (hits @ discount) / ideal.clamp_min(1e-12), 0.0)
    return {"mrr": (1.0 / first).mean().item(), "ndcg": ndcg.mean().item()}


def chance_recall_at_k(
    n_queries: int, n_keys: int, k: int = 1, *, query_ids: Tensor | None = None,
    key_ids: Tensor | None = None, relevant: Tensor | None = None,
) -> float:
    """Expected recall@k of a random ranking: mean over queries of ``1 - C(K - r, k) / C(K, k)``,
    with ``r`` the query's relevant keys among ``K``.

    Args:
        n_queries: Queries.
        n_keys: ``K`` keys.
        k: The cut-off.
        query_ids: As in ``recall_at_k``.
        key_ids: As in ``recall_at_k``.
        relevant: As in ``recall_at_k``.

    Returns:
        The expected recall@k of a random ranking.

    Examples:
        >>> chance_recall_at_k(4, 4, k=1)  # one match among 4 keys
        0.25
        >>> chance_recall_at_k(2, 2, k=5)  # a cut-off past the keys keeps them all, as recall_at_k does
        1.0
    """
    k = min(k, n_keys)
    counts = _relevance(n_queries, n_keys, query_ids, key_ids, relevant).sum(dim=1).tolist()
    return sum(1.0 - math.comb(n_keys - r, k) / math.comb(n_keys, k) for r in counts) / n_queries


def retrieval_metrics(
    image: Tensor, text: Tensor, ks: Sequence[int] = (1, 5, 10), *, ids: Tensor | None = None,
    relevant: Tensor | None = None, ranked_at: int | None = None,
) -> dict[str, float]:
    """Recall@k both ways between paired embeddings: ``recall_at_{k}_i2t`` (images query captions) and
    ``recall_at_{k}_t2i``. Rows are L2-normalised here; ``ids`` marks rows that match each other
    (the same caption): any row with the query's id counts as a hit; ``relevant`` (``paired_relevance``)
    says which caption rows answer each image row where images and captions both repeat.

    Args:
        image: ``(N, D)`` image embeddings.
        text: ``(N, D)`` text embeddings, row i paired with image row i.
        ks: The cut-offs.
        ids: ``(N,)`` ids of matching rows (None: row i matches row i only).
        relevant: ``(N, N)`` bool, image rows by text rows, instead of ``ids``.
        ranked_at: Also MRR and NDCG at this cut-off (``ranking_metrics``): ``mrr_at_10_i2t`` ...

    Returns:
        ``{"recall_at_{k}_i2t": ..., "recall_at_{k}_t2i": ...}`` (and the ranking metrics).

    Examples:
        >>> retrieval_metrics(torch.eye(3), torch.eye(3), ks=(1,))
        {'recall_at_1_i2t': 1.0, 'recall_at_1_t2i': 1.0}
    """
    image, text = F.normalize(at_least_float32(image), dim=-1), F.normalize(at_least_float32(text), dim=-1)
    similarity = image @ text.T
    if relevant is None:
        relevant = _relevance(len(image), len(text), ids, ids)
    out: dict[str, float] = {}
    for way, scores, hits in (("i2t", similarity, relevant), ("t2i", similarity.T, relevant.T)):
        out |= {f"recall_at_{k}_{way}": v for k, v in recall_at_k(scores, ks, relevant=hits).items()}
        if ranked_at is not None:
            out |= {f"{name}_at_{ranked_at}_{way}": v
                    for name, v in ranking_metrics(scores, ranked_at, relevant=hits).items()}
    return dict(sorted(out.items(), key=lambda item: item[0].endswith("t2i")))


def held_out_retrieval(queries: Tensor, texts: Tensor, relevant: Tensor, *, widths: Sequence[int] = (),
                       text_only: bool = False) -> dict[str, float]:
    """A two-tower run's held-out numbers (the contrastive recipe's and ``stepkit eval``'s): recall@1/5/10
    both ways and MRR@10 / NDCG@10 (``retrieval_metrics``), and recall at each narrower Matryoshka
    width in ``widths`` (the leading dimensions, renormalised: ``recall_at_1_i2t_d64`` ...). Text-text
    (``text_only``) names the ways ``a2p`` (anchor to positive) and ``p2a``.

    Examples:
        >>> same = torch.eye(4, dtype=torch.bool)
        >>> numbers = held_out_retrieval(torch.eye(4), torch.eye(4), same, widths=(2,), text_only=True)
        >>> numbers["recall_at_1_a2p"], numbers["mrr_at_10_p2a"], "recall_at_1_a2p_d2" in numbers
        (1.0, 1.0, True)
    """
    out = retrieval_metrics(queries, texts, (1, 5, 10), relevant=relevant, ranked_at=10)
    for d in (d for d in widths if d < queries.shape[1]):
        out |= {f"{k}_d{d}": v for k, v in
                retrieval_metrics(queries[:, :d], texts[:, :d], (1, 5, 10), relevant=relevant).items()}
    if text_only:  # no images: anchor -> positive and back
        out = {k.replace("_i2t", "_a2p").replace("_t2i", "_p2a"): v for k, v in out.items()}
    return out


@torch.no_grad()
def frozen_probes(
    nets: dict[str, Any],
    features: Callable[[Any, int], tuple[Any, Any]],
    last_width: Callable[[Any], int],
    raw: tuple[Any, Any],
    raw_name: str,
    *,
    layers: int,
    k: int = 20,
    temperature: float = 0.07,
    linear: bool = True,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """I-JEPA's evaluation protocol on frozen features, for several networks and the raw input.

    For each network (``nets``: summary-key suffix -> encoder): a linear
    probe (``linear_probe``) and k-NN (``knn_accuracy``) on the last layer's
    and on the last ``layers`` layers' pooled tokens; ``linear_acc{suffix}``
    and ``knn_acc{suffix}`` are the better of the two (I-JEPA paper, App.
    A.2). The same two probes on ``raw`` give ``*_acc_{raw_name}``. Each
    network is evaluated in eval mode and left as it was.

    Args:
        nets: ``{suffix: encoder}``, e.g. ``{"": target, "_random_init": untrained}``.
        features: ``features(net, layers)`` -> ``((train_x, train_y), (test_x, test_y))``, the layers'
            features concatenated, the last layer's last (one pass gives both).
        last_width: ``last_width(net)``: how many of the last columns are the last layer's.
        raw: ``((train_x, train_y), (test_x, test_y))`` of the raw input (pixels, resampled series ...).
        raw_name: Its name in the summary keys (``pixels``, ``raw``, ``bow``).
        layers: How many last layers the second probe reads.
        k: k-NN's neighbours.
        temperature: k-NN's temperature.
        linear: Fit the linear probes too (False: k-NN only).
        seed: The linear probe's validation split.

    Returns:
        ``(numbers, last_layer_features)``: the summary's numbers (``probe_layers`` included), and each
        net's last-layer ``((train_x, train_y), (test_x, test_y))``.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> x, y = torch.randn(40, 4), torch.arange(40) % 2
        >>> x[:, 0] += 3 * y  # the first feature tells the classes apart
        >>> split = lambda f: ((f[:30], y[:30]), (f[30:], y[30:]))
        >>> nets = {"": torch.nn.Identity()}
        >>> scores, _ = frozen_probes(nets, lambda net, layers: split(net(x)), lambda net: 4, split(x),
        ...                           "raw", layers=1, k=5)
        >>> best = max(scores["knn_acc_last_layer"], scores["knn_acc_last_layers"])
        >>> sorted(scores)[:3], scores["knn_acc"] == best, scores["knn_acc"] > 0.8
        (['knn_acc', 'knn_acc_last_layer', 'knn_acc_last_layers'], True, True)
    """
    def probes(split_features: tuple[Any, Any], prefix: str, suffix: str) -> dict[str, float]:
        (train_f, train_y), (test_f, test_y) = split_features
        out = {f"knn_acc{prefix}{suffix}": knn_accuracy(train_f, train_y, test_f, test_y, k=k,
                                                        temperature=temperature)}
        if linear:
            out[f"linear_acc{prefix}{suffix}"] = linear_probe(train_f, train_y, test_f, test_y,
                                                              seed=seed)["acc"]
        return out

    result: dict[str, float] = {}
    last_layer_features = {}
    for suffix, net in nets.items():
        with _eval_mode(net):
            chosen = features(net, layers)
        width = last_width(net)
        (train_f, train_y), (test_f, test_y) = chosen
        last_layer_features[suffix] = ((train_f[:, -width:], train_y), (test_f[:, -width:], test_y))
        last = probes(last_layer_features[suffix], "_last_layer", suffix)
        concat = probes(chosen, "_last_layers", suffix)
        result |= last | concat
        for kind in ("knn", "linear") if linear else ("knn",):
            result[f"{kind}_acc{suffix}"] = max(last[f"{kind}_acc_last_layer{suffix}"],
                                                concat[f"{kind}_acc_last_layers{suffix}"])
    result |= probes(raw, "", f"_{raw_name}")
    result["probe_layers"] = layers
    return result, last_layer_features


def probes_line(scores: Mapping[str, Any], *, baseline: str, raw_name: str, linear: bool = True) -> str:
    """``frozen_probes``' headline numbers in one line: the trained network, its ``baseline`` (the
    summary-key suffix of the weights it started from, ``_random_init`` or ``_init``) and the raw input.

    Examples:
        >>> scores = {"knn_acc": 0.7, "knn_acc_random_init": 0.4, "knn_acc_pixels": 0.5,
        ...           "effective_rank": 9.0}
        >>> probes_line(scores, baseline="_random_init", raw_name="pixels", linear=False)
        'k-NN: trained 0.700, untrained 0.400, pixels 0.500; effective rank 9.0'
    """
    begun = "untrained" if baseline == "_random_init" else "at init"
    line = (f"k-NN: trained {scores['knn_acc']:.3f}, {begun} {scores['knn_acc' + baseline]:.3f}, "
            f"{raw_name} {scores[f'knn_acc_{raw_name}']:.3f}; effective rank {scores['effective_rank']:.1f}")
    if not linear:
        return line
    fitted = scores["linear_acc" + baseline]
    return (f"linear probe: trained {scores['linear_acc']:.3f}, {begun} {fitted:.3f}, "
            f"{raw_name} {scores[f'linear_acc_{raw_name}']:.3f}; " + line)

"""A linear probe trained beside the model, on the frozen features of labelled images (an online probe).

solo-learn and lightly users watch a linear classifier learn while the run trains instead of refitting
one at the end. ``OnlineProbe`` does that without touching the training. Each update it embeds a few of
the labelled probe images with the network the recipe evaluates (no gradients, eval mode, so no dropout
draw and no BatchNorm statistic changes) and writes their features into a buffer that holds each probe
image's latest features: the images are taken in turn, so after one pass every row is at most
``len(probe) / batch_size`` updates old (every rank's batch, gathered: a few kilobytes). Every
``solve_every`` updates a ridge regression onto the one-hot labels is fitted on the buffer in closed
form, one eigendecomposition giving every ridge strength of ``ALPHAS`` (``ridge_heads``); the one with
the best accuracy on a held-back fifth of the probe images (embedded afresh) is kept and that accuracy
logged (``online_acc``). At the end (``summary``) the head is refitted with the held-back images added,
as the end-of-run linear probe refits on all its images, and scored on the held-out set.

Why a buffer of recent features and not running sums: the decayed sums of a ridge regression (the
design before) kept features of hundreds of updates before, and the head ended 7-9 points below the
end-of-run probe on I-JEPA's defaults, where a ridge head on the final network's features alone ends
within about 2 (measured: benchmarks/online_probe.py). Why a closed form and not a few
hundred SGD steps: I-JEPA's pooled features are ill-conditioned, and an Adam head on them ended at 0.19
where the end-of-run logistic regression reads 0.59 (measured); the best ridge strength differs by three
orders of magnitude between DINO's and I-JEPA's features, hence the choice.

The batches are the step's turn of a seeded order, never the global RNG, so a run with the probe trains
exactly as one without it (tested: equal ``params_digest``). The buffer and the head live in
``state.extras``, saved and resumed with the run (tested: the same numbers after a resume).

    probe = OnlineProbe(data.probe, features=teacher.backbone, prep=prep, state=state, seed=cfg.train.seed,
                        enabled=cfg.eval.online)
    ...
    terms = {"loss": loss, ..., **probe.update(state.step)}   # online_train_acc; online_acc at a solve
    summary = run.summary(..., **probe.summary(data.test))    # online_acc: the head on held-out images
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from stepkit.evaluation import _eval_mode

__all__ = ["OnlineProbe", "ALPHAS", "ridge_heads"]

ALPHAS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
"""The ridge strengths an online probe chooses from, relative to the mean eigenvalue of the features'
covariance (DINO's CNN features want about 1, I-JEPA's about 1e-3)."""


@torch.no_grad()
def ridge_heads(features: Tensor, labels: Tensor, classes: int, alphas: Sequence[float] = ALPHAS
                ) -> list[tuple[Tensor, Tensor]]:
    """Ridge regressions of one-hot labels on features, one ``(weight (C, D), bias (C,))`` per alpha.

    With ``X`` the centred features ``(N, D)`` and ``Y`` the centred one-hot labels, the minimiser of
    ``||X W^T - Y||^2 + lambda ||W||^2`` is ``W^T = (X^T X + lambda I)^-1 X^T Y = X^T (X X^T + lambda
    I)^-1 Y``, with ``lambda = alpha trace(X^T X) / D`` (alpha relative to the mean eigenvalue, so one
    grid serves features of any scale); ``b = mean(y) - W mean(x)``. One eigendecomposition of the
    smaller of the two Gram matrices (``X X^T`` when ``N < D``) serves every alpha. In float64.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` integers below ``classes``.
        classes: The number of classes ``C``.
        alphas: Relative ridge strengths, each > 0.

    Returns:
        A ``(weight, bias)`` pair (float32) for each alpha, in order.

    Examples:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> [(w, b)] = ridge_heads(x, torch.tensor([0, 1, 0, 1]), classes=2, alphas=(1e-3,))
        >>> (x @ w.T + b).argmax(1).tolist()
        [0, 1, 0, 1]
    """
    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas={list(alphas)!r} is not allowed: expected positive numbers")
    x = features.double()
    onehot = torch.nn.functional.one_hot(labels.long(), classes).to(x)
    mean_x, mean_y = x.mean(dim=0), onehot.mean(dim=0)
    x, y = x - mean_x, onehot - mean_y
    dual = x.shape[0] < x.shape[1]  # the N x N Gram matrix is the smaller one
    eigenvalues, vectors = torch.linalg.eigh(x @ x.T if dual else x.T @ x)
    eigenvalues = eigenvalues.clamp_min(0.0)  # rounding below zero on a rank-deficient Gram matrix
    projected = vectors.T @ (y if dual else x.T @ y)
    scale = eigenvalues.sum().clamp_min(1e-12) / x.shape[1]  # trace(X^T X) / D
    heads = []
    for alpha in alphas:
        solved = vectors @ (projected / (eigenvalues + alpha * scale)[:, None])
        weight = (x.T @ solved if dual else solved).T
        heads.append((weight.float(), (mean_y - weight @ mean_x).float()))
    return heads


class OnlineProbe:
    """A ridge-regression head on ``features(prep(images))`` of a labelled set, a few images an update.

    Args:
        labelled: ``(image, label)`` items (the probe set of the recipe's k-NN / linear probe). Up to
            ``max_images`` of them (a seeded subset) are held in memory as read; a stratified fifth (at
            most 512) is held back to choose the ridge strength and score the head. None: no probe (as
            ``enabled=False``).
        features: The network (or function) whose features are probed; run without gradients.
        prep: A batch of images as read -> the network's input (to the device, normalised).
        state: The run's ``TrainState``: the buffer and the head live in ``state.extras`` under
            ``online_probe.*`` (saved with every checkpoint, resumed in place).
        seed: The run's seed (the order the images are taken in).
        module: The module put in eval mode while ``features`` runs (each module's mode restored after);
            default: ``features`` itself when it is a module.
        batch_size: Images an update (a rank).
        solve_every: The head is solved at every step that is a multiple of it (and ``online_acc``
            logged).
        max_images: The most probe images held in memory.
        enabled: False: a probe that does nothing (``update`` and ``summary`` return ``{}``), so a
            recipe's loop reads the same with ``--eval.no-online``.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> from stepkit import TrainState
        >>> net = torch.nn.Linear(4, 3)
        >>> state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> x = torch.randn(200, 4); y = (x[:, 0] > 0).long(); x[:, 0] += 2 * y - 1  # apart by 2
        >>> probe = OnlineProbe(TensorDataset(x, y), features=lambda v: v, prep=lambda v: v, state=state,
        ...                     seed=0, solve_every=10)
        >>> logged = [probe.update(step) for step in range(1, 31)]
        >>> sorted(k[13:] for k in state.extras if k.startswith("online_probe."))  # saved with the run
        ['alpha', 'bias', 'features', 'seen', 'weight']
        >>> sorted(logged[9]), logged[-1]["online_acc"] > 0.9
        (['online_acc', 'online_train_acc'], True)
        >>> probe.summary(TensorDataset(x, y))["online_acc"] > 0.9
        True
        >>> OnlineProbe(None, features=net, prep=lambda v: v, state=state, seed=0).update(1)  # no labels
        {}
    """

    def __init__(self, labelled: Any, *, features: Callable[[Tensor], Tensor],
                 prep: Callable[[Tensor], Tensor], state: Any, seed: int, module: Any = None,
                 batch_size: int = 8, solve_every: int = 200, max_images: int = 4096,
                 enabled: bool = True) -> None:
        from stepkit.evaluation import validation_split
        from stepkit.seeds import seed_of

        self.enabled = enabled and labelled is not None
        self.features, self.prep, self.seed = features, prep, seed
        self.module = module if module is not None else features
        self.batch_size, self.solve_every = batch_size, solve_every
        if not self.enabled:
            return
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed_of(seed, "probe")))
        items = [labelled[i] for i in order[:max_images].tolist()]  # in a seeded order: taken in turn
        self.images = torch.stack([torch.as_tensor(x) for x, _ in items])
        self.labels = torch.as_tensor([int(y) for _, y in items])
        fit, held = validation_split(self.labels, 0.2, seed)
        self.fit, self.held = fit, held[:512]
        self.classes = int(self.labels.max()) + 1
        self.state = state
        self._tensors: dict[str, Tensor] | None = None  # made at the first update: no forward before the
        # run's own (FSDP2 wants its root module's forward first); a resumed run's from state.extras

    @property
    def tensors(self) -> dict[str, Tensor]:
        if self._tensors is None:
            self._make(self._embed(self.images[:2]))
        assert self._tensors is not None
        return self._tensors

    def _make(self, feats: Tensor) -> None:
        """The buffer and the head: a resumed run's (from ``state.extras``, on the features' device), else
        zeros; kept in ``state.extras`` so every checkpoint saves them."""
        dim, device = feats.shape[1], feats.device
        shapes = {"features": (len(self.fit), dim), "seen": (len(self.fit),), "weight": (self.classes, dim),
                  "bias": (self.classes,), "alpha": ()}
        extras = self.state.extras
        for key in [k for k in extras if k.startswith("online_probe.") and k[13:] not in shapes]:
            del extras[key]  # an earlier version's sums: not carried on
        saved = {k: extras.get(f"online_probe.{k}") for k in shapes}
        dtypes = {k: torch.float64 if k == "alpha" else torch.float32 for k in shapes}  # alpha as chosen
        if all(isinstance(v, Tensor) and tuple(v.shape) == shapes[k] for k, v in saved.items()):
            self._tensors = {k: v.to(device=device, dtype=dtypes[k]) for k, v in saved.items()}
        else:
            self._tensors = {k: torch.zeros(s, device=device, dtype=dtypes[k]) for k, s in shapes.items()}
        extras.update({f"online_probe.{k}": v for k, v in self._tensors.items()})

    def _embed(self, images: Tensor) -> Tensor:
        with torch.no_grad(), _eval_mode(self.module):
            return self.features(self.prep(images)).flatten(1).float()

    def _accuracy(self, feats: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """A 0-d tensor on the features' device (the logger reads it once an interval)."""
        return ((feats @ weight.T + bias).argmax(dim=1) == labels.to(feats.device)).float().mean()

    def _turn(self, step: int, ranks: int, rank: int) -> Tensor:
        """The buffer rows (indices into ``fit``) that ``rank`` embeds at ``step``: the next
        ``batch_size`` in turn after every rank's batches of the steps before."""
        start = ((step - 1) * ranks + rank) * self.batch_size
        return torch.arange(start, start + self.batch_size) % len(self.fit)

    def update(self, step: int) -> dict[str, Tensor | float]:
        """Embed the images whose turn ``step`` is into the buffer; returns ``online_train_acc`` (the
        current head on them, before they are added) and, when ``step`` is a multiple of
        ``solve_every``, ``online_acc`` (the new head on the held-back probe images); ``{}`` when off."""
        from stepkit import dist

        if not self.enabled:
            return {}
        rows = self._turn(step, dist.world_size(), dist.rank())
        picked = self.fit[rows]
        feats = self._embed(self.images[picked])
        if self._tensors is None:
            self._make(feats)
        t = self.tensors
        logged: dict[str, Tensor | float] = {
            "online_train_acc": self._accuracy(feats, self.labels[picked], t["weight"], t["bias"])}
        if dist.world_size() > 1:  # every rank writes every rank's batch: the same buffer everywhere
            with torch.no_grad():
                feats = dist.all_gather_with_grad(feats)
            rows = torch.cat([self._turn(step, dist.world_size(), r) for r in range(dist.world_size())])
        rows = rows.to(t["features"].device)
        t["features"].index_copy_(0, rows, feats)
        t["seen"].index_fill_(0, rows, 1.0)
        if step % self.solve_every == 0:
            logged["online_acc"] = self._solve()
        return logged

    def _solve(self, refit_with_held: bool = False) -> float:
        """Fit the head on the buffer for each alpha and keep the best on the held-back images (their
        accuracy, returned); ``refit_with_held``: then fit the kept alpha again with those images added."""
        from stepkit import dist

        t = self.tensors
        seen = t["seen"].cpu() > 0
        if not bool(seen.any()):
            return 0.0
        feats, labels = t["features"][seen.to(t["features"].device)], self.labels[self.fit[seen]]
        held = torch.cat([self._embed(self.images[rows]) for rows in self.held.split(128)])  # bounded memory
        if dist.world_size() > 1:  # rank 0's (each rank's BatchNorm statistics are its own): one head
            torch.distributed.broadcast(held, src=0)
        held_labels = self.labels[self.held]
        best = (-1.0, 0.0, t["weight"], t["bias"])
        for alpha, (weight, bias) in zip(ALPHAS, ridge_heads(feats, labels.to(feats.device), self.classes)):
            acc = float(self._accuracy(held, held_labels, weight, bias))  # once a solve
            if acc > best[0]:
                best = (acc, alpha, weight, bias)
        acc, alpha, weight, bias = best
        if refit_with_held:
            [(weight, bias)] = ridge_heads(torch.cat([feats, held]),
                                           torch.cat([labels, held_labels]).to(feats.device), self.classes,
                                           alphas=(alpha,))
        t["weight"].copy_(weight)
        t["bias"].copy_(bias)
        t["alpha"].fill_(alpha)
        return acc

    def summary(self, held_out: Any) -> dict[str, Any]:
        """``{"online_acc": held_out accuracy, "online_alpha": its ridge strength}`` after a last solve,
        refitted with the held-back images added (as the end-of-run probe refits on all of its images);
        under torchrun also ``online_identical``: whether every rank holds the same head; ``{}`` when
        off."""
        from stepkit import dist
        from stepkit.run import params_digest

        if not self.enabled:
            return {}
        self._solve(refit_with_held=True)
        out: dict[str, Any] = {"online_acc": self.accuracy(held_out),
                               "online_alpha": float(self.tensors["alpha"])}
        if dist.world_size() > 1:  # every rank wrote every rank's features: the same head everywhere
            head = {k: self.tensors[k].cpu() for k in ("weight", "bias")}
            out["online_identical"] = dist.same_on_all_ranks(params_digest(head))
        return out

    @torch.no_grad()
    def accuracy(self, labelled: Any, batch_size: int = 256) -> float:
        """The head's accuracy on every item of ``labelled`` (e.g. the held-out images)."""
        from torch.utils.data import DataLoader

        hits = total = 0
        for images, labels in DataLoader(labelled, batch_size=batch_size):
            logits = self._embed(images) @ self.tensors["weight"].T + self.tensors["bias"]
            hits += int((logits.argmax(dim=1).cpu() == torch.as_tensor(labels)).sum())
            total += len(labels)
        return hits / max(total, 1)

"""A linear probe trained beside the model, on the frozen features of labelled images (an online probe).

solo-learn and lightly users watch a linear classifier learn while the run trains instead of refitting
one at the end. ``OnlineProbe`` does that without touching the training. Each update it embeds a small
batch of the labelled probe images with the network the recipe evaluates (no gradients, eval mode, so no
dropout draw and no BatchNorm statistic changes) and adds the batch (every rank's, gathered: a few
kilobytes) to the running sums of a ridge regression onto the one-hot labels: the features' count, sum,
Gram matrix and products with the labels (a ``dim x dim`` matrix and a 128-row buffer in every
checkpoint: 17 MB for DINO's 2,048-wide CNN features). Every ``solve_every`` updates the sums are
down-weighted (``memory``: about the updates a batch counts for, so the head follows features that move)
and the head is solved in closed form, ``W = (C + lambda I)^-1 C_xy`` on the centred sums, ``lambda =
alpha x trace(C) / dim``, for each ``alpha`` of ``ALPHAS`` at the first solve, for the kept one and its
two neighbours after; the one with the best accuracy on a held-back fifth of the probe images is kept
and that accuracy logged (``online_acc``). A closed form instead of a few hundred SGD steps: I-JEPA's
pooled features are ill-conditioned, and an Adam head on them ended at 0.19 where the end-of-run
logistic regression reads 0.59 (measured); the best ``alpha`` differs by three orders of magnitude
between DINO's and I-JEPA's features, hence the choice.

The batches come from a generator seeded by the step alone, never the global RNG, so a run with the
probe trains exactly as one without it (tested: equal ``params_digest``). Its sums and head live in
``state.extras``, saved and resumed with the run (tested: the same numbers after a resume).

    probe = OnlineProbe(data.probe, features=teacher.backbone, prep=prep, state=state, seed=cfg.train.seed,
                        enabled=cfg.eval.online)
    ...
    terms = {"loss": loss, ..., **probe.update(state.step)}   # online_train_acc; online_acc at a solve
    summary = run.summary(..., **probe.summary(data.test))    # online_acc: the head on held-out images
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from stepkit.evaluation import _eval_mode

__all__ = ["OnlineProbe", "ALPHAS", "ridge_head"]

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""The ridge strengths an online probe chooses from, relative to the mean eigenvalue of the features'
covariance (DINO's CNN features want about 1, I-JEPA's about 1e-3)."""

_SUMS = ("count", "sum", "gram", "sum_xy", "sum_y")


def _centred(sums: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(C, C_xy, mean, n)`` from the sums, in float64."""
    n = sums["count"].double().clamp_min(1.0)
    mean = sums["sum"].double() / n
    cov = sums["gram"].double() - n * torch.outer(mean, mean)
    cov_xy = sums["sum_xy"].double() - torch.outer(mean, sums["sum_y"].double())
    return cov, cov_xy, mean, n


def _ridge(centred: tuple[Tensor, Tensor, Tensor, Tensor], sum_y: Tensor, alpha: float
           ) -> tuple[Tensor, Tensor]:
    cov, cov_xy, mean, n = centred
    ridge = alpha * cov.diagonal().sum().clamp_min(1e-12) / cov.shape[0]
    system = cov.clone()
    system.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(system)  # positive definite: the ridge's
    solved = torch.cholesky_solve(cov_xy, factor) if int(info) == 0 else torch.linalg.solve(system, cov_xy)
    weight = solved.T
    bias = sum_y.double() / n - weight @ mean
    return weight.float(), bias.float()


def ridge_head(sums: dict[str, Tensor], alpha: float) -> tuple[Tensor, Tensor]:
    """The ridge regression of one-hot labels on features from their sums: ``(weight (C, D), bias (C,))``.

    Centred: ``C = gram - sum sum^T / n``, ``C_xy = sum_xy - sum sum_y^T / n``; ``W^T = (C + lambda I)^-1
    C_xy`` with ``lambda = alpha trace(C) / D``; ``b = (sum_y - W sum) / n``. Solved in float64.

    Examples:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> y = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1])).float()
        >>> sums = {"count": torch.tensor(4.0), "sum": x.sum(0), "gram": x.T @ x, "sum_xy": x.T @ y,
        ...         "sum_y": y.sum(0)}
        >>> w, b = ridge_head(sums, 1e-3)
        >>> (x @ w.T + b).argmax(1).tolist()
        [0, 1, 0, 1]
    """
    return _ridge(_centred(sums), sums["sum_y"], alpha)


class OnlineProbe:
    """A ridge-regression head on ``features(prep(images))`` of a labelled set, fed a batch an update.

    Args:
        labelled: ``(image, label)`` items (the probe set of the recipe's k-NN / linear probe). Up to
            ``max_images`` of them (a seeded subset) are held in memory as read; a stratified fifth (at
            most 512) is held back to choose ``alpha`` and score the head. None: no probe (as
            ``enabled=False``).
        features: The network (or function) whose features are probed; run without gradients.
        prep: A batch of images as read -> the network's input (to the device, normalised).
        state: The run's ``TrainState``: the sums and the head live in ``state.extras`` under
            ``online_probe.*`` (saved with every checkpoint, resumed in place).
        seed: The run's seed (each step's batch is drawn from ``(seed, step, rank)``).
        module: The module put in eval mode while ``features`` runs (each module's mode restored after);
            default: ``features`` itself when it is a module.
        batch_size: Images a step.
        solve_every: Updates between two solves of the head (and ``online_acc`` logs).
        memory: About how many updates a batch counts for (the sums decay by ``1 - 1 / memory`` an
            update, applied to them all at each solve).
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
        >>> sorted(k for k in state.extras if k.startswith("online_probe"))[:3]  # saved with the run
        ['online_probe.alpha', 'online_probe.bias', 'online_probe.count']
        >>> sorted(logged[9]), logged[-1]["online_acc"] > 0.9
        (['online_acc', 'online_train_acc'], True)
        >>> probe.summary(TensorDataset(x, y))["online_acc"] > 0.9
        True
        >>> OnlineProbe(None, features=net, prep=lambda v: v, state=state, seed=0).update(1)  # no labels
        {}
    """

    def __init__(self, labelled: Any, *, features: Callable[[Tensor], Tensor],
                 prep: Callable[[Tensor], Tensor], state: Any, seed: int, module: Any = None,
                 batch_size: int = 8, solve_every: int = 200, memory: int = 500, max_images: int = 4096,
                 enabled: bool = True) -> None:
        from stepkit import dist
        from stepkit.evaluation import validation_split
        from stepkit.seeds import seed_of

        self.enabled = enabled and labelled is not None
        self.features, self.prep, self.seed = features, prep, seed
        self.module = module if module is not None else features
        self.batch_size, self.solve_every, self.memory = batch_size, solve_every, memory
        if not self.enabled:
            return
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed_of(seed, "probe")))
        items = [labelled[i] for i in order[:max_images].tolist()]
        self.images = torch.stack([torch.as_tensor(x) for x, _ in items])
        self.labels = torch.as_tensor([int(y) for _, y in items])
        fit, held = validation_split(self.labels, 0.2, seed)
        self.fit, self.held = fit, held[:512]
        self.classes = int(self.labels.max()) + 1
        self.pending = max(128, batch_size) * dist.world_size()  # rows held before the Gram matrix takes them
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
        """The sums and the head: a resumed run's (from ``state.extras``, on the features' device), else
        zeros; kept in ``state.extras`` so every checkpoint saves them."""
        dim, device = feats.shape[1], feats.device
        shapes = {"count": (), "sum": (dim,), "gram": (dim, dim), "sum_xy": (dim, self.classes),
                  "sum_y": (self.classes,), "weight": (self.classes, dim), "bias": (self.classes,),
                  "alpha": (), "since_solve": (), "pending": (self.pending, dim),
                  "pending_labels": (self.pending,), "pending_rows": ()}
        extras = self.state.extras
        saved = {k: extras.get(f"online_probe.{k}") for k in shapes}
        if all(isinstance(v, Tensor) and tuple(v.shape) == shapes[k] for k, v in saved.items()):
            self._tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in saved.items()}
        else:
            self._tensors = {k: torch.zeros(shape, device=device) for k, shape in shapes.items()}
        extras.update({f"online_probe.{k}": v for k, v in self._tensors.items()})
        # the counters the loop branches on, read from the device once: none is read an update
        self._rows, self._since = int(self._tensors["pending_rows"]), int(self._tensors["since_solve"])

    def _embed(self, images: Tensor) -> Tensor:
        with torch.no_grad(), _eval_mode(self.module):
            return self.features(self.prep(images)).flatten(1).float()

    def _accuracy(self, feats: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """A 0-d tensor on the features' device (the logger reads it once an interval)."""
        return ((feats @ weight.T + bias).argmax(dim=1) == labels.to(feats.device)).float().mean()

    def update(self, step: int) -> dict[str, Tensor | float]:
        """Add a batch drawn for ``step`` to the sums; returns ``online_train_acc`` (the current head on
        that batch, before it is added) and, on a solve, ``online_acc`` (the new head on the held-back
        probe images); ``{}`` when the probe is off."""
        from stepkit import dist
        from stepkit.seeds import seed_of

        if not self.enabled:
            return {}
        g = torch.Generator().manual_seed(seed_of(self.seed, "probe", step, dist.rank()))
        pick = self.fit[torch.randint(0, len(self.fit), (self.batch_size,), generator=g)]
        feats = self._embed(self.images[pick])
        if self._tensors is None:
            self._make(feats)
        t = self.tensors
        labels = self.labels[pick].to(t["sum"].device)
        logged: dict[str, Tensor | float] = {"online_train_acc": self._accuracy(feats, labels, t["weight"],
                                                                                t["bias"])}
        if dist.world_size() > 1:  # every rank adds every rank's batch: the same sums everywhere
            with torch.no_grad():
                feats, labels = dist.all_gather_with_grad(feats), dist.all_gather_with_grad(labels)
        if self._rows + len(feats) > len(t["pending"]):
            self._flush()
        rows = self._rows
        t["pending"][rows:rows + len(feats)] = feats  # the Gram matrix takes them a block at a time:
        t["pending_labels"][rows:rows + len(feats)] = labels  # one pass over it, not one an update
        self._rows += len(feats)
        self._since += 1
        t["pending_rows"].fill_(self._rows)  # saved with the run; filled, never read back
        t["since_solve"].fill_(self._since)
        if self._since >= self.solve_every:
            logged["online_acc"] = self._solve()
        return logged

    def _flush(self) -> None:
        """Add the pending features to the sums."""
        t = self.tensors
        rows = self._rows
        feats = t["pending"][:rows]
        onehot = torch.nn.functional.one_hot(t["pending_labels"][:rows].long(), self.classes).float()
        t["count"] += rows
        t["sum"] += feats.sum(dim=0)
        t["gram"].addmm_(feats.T, feats)  # in place: one pass over dim x dim, no temporary
        t["sum_xy"].addmm_(feats.T, onehot)
        t["sum_y"] += onehot.sum(dim=0)
        self._rows = 0
        t["pending_rows"].zero_()

    def _solve(self) -> float:
        """Solve the head for each alpha, keep the best on the held-back images (their accuracy), then
        down-weight the sums by the updates since the last solve."""
        self._flush()
        t = self.tensors
        held = self._embed(self.images[self.held])
        labels = self.labels[self.held]
        best = (-1.0, 0.0, t["weight"], t["bias"])
        kept = [i for i, a in enumerate(ALPHAS) if abs(a - float(t["alpha"])) <= 1e-6 * a]
        candidates = ALPHAS if not kept else ALPHAS[max(0, kept[0] - 1):kept[0] + 2]
        centred = _centred(t)
        for alpha in candidates:
            weight, bias = _ridge(centred, t["sum_y"], alpha)
            acc = float(self._accuracy(held, labels, weight, bias))  # once a solve
            if acc > best[0]:
                best = (acc, alpha, weight, bias)
        t["weight"].copy_(best[2])
        t["bias"].copy_(best[3])
        t["alpha"].fill_(best[1])
        decay = (1 - 1 / self.memory) ** self._since
        for name in _SUMS:
            t[name].mul_(decay)
        self._since = 0
        t["since_solve"].zero_()
        return best[0]

    def summary(self, held_out: Any) -> dict[str, float]:
        """``{"online_acc": held_out accuracy, "online_alpha": its ridge strength}`` after a last solve, for
        a run's summary; ``{}`` when off."""
        if not self.enabled:
            return {}
        self._solve()
        return {"online_acc": self.accuracy(held_out), "online_alpha": float(self.tensors["alpha"])}

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

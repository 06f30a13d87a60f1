"""stepkit.online_probe: a head trained beside the model, by Adam's rule, without touching the training."""

import json

import pytest
import torch
from conftest import load_recipe
from torch.utils.data import TensorDataset

from stepkit import TrainState
from stepkit.online_probe import OnlineProbe
from stepkit.seeds import seed_of


def test_each_solve_is_ridge_regression_on_the_decayed_batches():
    from sklearn.linear_model import Ridge

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.5))  # eval mode: no dropout draw
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1))
    probe = OnlineProbe(TensorDataset(x, y), features=net, prep=lambda v: 2 * v, state=state, seed=3,
                        batch_size=4, solve_every=3, memory=10, max_images=40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(seed_of(3, "probe")))
    images, labels = x[order], y[order]  # the probe's own copy, in its seeded order
    rng_before = torch.get_rng_state()
    rows, weights = [], []
    for step in range(1, 7):
        logged = probe.update(step)
        g = torch.Generator().manual_seed(seed_of(3, "probe", step, 0))
        rows.append(probe.fit[torch.randint(0, len(probe.fit), (4,), generator=g)])
        assert ("online_acc" in logged) == (step % 3 == 0)
    weights = [0.9 ** 3] * 12 + [1.0] * 12  # the first solve decayed batches 1-3 by (1 - 1/10)^3
    picked = torch.cat(rows)
    with torch.no_grad():
        feats = net.eval()(2 * images[picked]).double().numpy()
    net.train()
    onehot = torch.nn.functional.one_hot(labels[picked], 3).double().numpy()
    alpha = float(state.extras["online_probe.alpha"])
    w = torch.tensor(weights, dtype=torch.float64)
    centred = torch.as_tensor(feats) - (w[:, None] * torch.as_tensor(feats)).sum(0) / w.sum()
    ridge = alpha * float((w[:, None] * centred ** 2).sum()) / feats.shape[1]  # alpha x trace(C) / dim
    want = Ridge(alpha=ridge).fit(feats, onehot, sample_weight=weights)
    torch.testing.assert_close(state.extras["online_probe.weight"].double(), torch.as_tensor(want.coef_),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.extras["online_probe.bias"].double(), torch.as_tensor(want.intercept_),
                               rtol=1e-4, atol=1e-5)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG untouched
    with torch.no_grad():
        held = (net.eval()(2 * x).double() @ torch.as_tensor(want.coef_).T
                + torch.as_tensor(want.intercept_)).argmax(1)
    assert probe.accuracy(TensorDataset(x, y)) == pytest.approx((held == y).double().mean().item())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "ijepa"])
def test_the_probe_leaves_training_as_it_was_and_resumes_with_the_run(name, tmp_path, monkeypatch):
    from conftest import crash_after_step

    recipe = load_recipe(name)
    flags = ["--device", "cpu", "--log.no-console", "--train.steps", "6", "--optim.warmup-steps", "2",
             "--batch-size", "16", "--log.every", "1", "--ckpt.every", "3",
             *(["--eval.no-knn"] if name == "dino" else ["--eval.no-linear"])]
    runs = {}
    for tag, more in (("on", []), ("off", ["--eval.no-online"])):
        runs[tag] = recipe.main(recipe.parse(["--run-dir", str(tmp_path / tag), *flags, *more]))
    assert runs["on"]["params_digest"] == runs["off"]["params_digest"] and "online_acc" not in runs["off"]
    crash_after_step(recipe, monkeypatch, recipe.parse(["--run-dir", str(tmp_path / "crashed"), *flags]))
    resumed = recipe.main(recipe.parse(["--run-dir", str(tmp_path / "crashed"), *flags, "--resume"]))

    def online(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["online_train_acc"], r.get("online_acc")) for r in rows
                if "online_train_acc" in r]

    assert len(online("on")) == 6 and online("crashed")[-3:] == online("on")[-3:]
    assert resumed["online_acc"] == runs["on"]["online_acc"]

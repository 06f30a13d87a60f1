"""stepkit.online_probe: a head fitted beside the model on its latest features; the training untouched."""

import copy
import json

import pytest
import torch
from conftest import load_recipe
from torch.utils.data import TensorDataset

from stepkit import TrainState
from stepkit.online_probe import ALPHAS, OnlineProbe, ridge_heads
from stepkit.seeds import seed_of


def _sklearn_ridge(feats, labels, alpha, classes):
    from sklearn.linear_model import Ridge

    feats = feats.double()
    centred = feats - feats.mean(0)
    strength = alpha * float(centred.square().sum()) / feats.shape[1]  # alpha x trace(C) / dim
    onehot = torch.nn.functional.one_hot(labels, classes).double()
    fitted = Ridge(alpha=strength).fit(feats.numpy(), onehot.numpy())
    return torch.as_tensor(fitted.coef_), torch.as_tensor(fitted.intercept_)


def test_the_buffer_holds_each_images_latest_features_and_each_solve_is_ridge_on_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Dropout(0.5))  # eval: no draw
    x, y = torch.randn(40, 5), torch.arange(40) % 4  # 2 of each class held back
    state = TrainState(net, torch.optim.SGD(net.parameters(), lr=0.1))
    state.extras["online_probe.gram"] = torch.zeros(7, 7)  # an earlier version's sums: dropped
    probe = OnlineProbe(TensorDataset(x, y), features=net, prep=lambda v: 2 * v, state=state, seed=3,
                        batch_size=4, solve_every=5, max_images=40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(seed_of(3, "probe")))
    images, labels = x[order], y[order]  # the probe's own copy, in its seeded order
    assert len(probe.fit) == 32 and len(probe.held) == 8
    rng_before = torch.get_rng_state()
    before = copy.deepcopy(net)
    for step in range(1, 11):
        if step == 6:  # the network moves: rows written from here on hold the new features
            with torch.no_grad():
                net[0].weight.mul_(-1.0)
        logged = probe.update(step)
        assert ("online_acc" in logged) == (step % 5 == 0)
    assert "online_probe.gram" not in state.extras
    with torch.no_grad():
        old, new = before.eval()(2 * images[probe.fit]), net.eval()(2 * images[probe.fit])
    net.train()
    # steps 1-5 wrote rows 0-19 with the old network, 6-8 rows 20-31 and 9-10 rows 0-7 again with the new
    want = torch.where((torch.arange(32) >= 8) & (torch.arange(32) < 20), 1, 0)[:, None].bool()
    torch.testing.assert_close(state.extras["online_probe.features"], torch.where(want, old, new))
    alpha = float(state.extras["online_probe.alpha"])
    assert alpha in ALPHAS
    weight, bias = _sklearn_ridge(torch.where(want, old, new), labels[probe.fit], alpha, 4)
    torch.testing.assert_close(state.extras["online_probe.weight"].double(), weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.extras["online_probe.bias"].double(), bias, rtol=1e-4, atol=1e-5)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG untouched

    probe.summary(TensorDataset(x, y))  # refitted with the held-back images, embedded afresh, added
    with torch.no_grad():
        held = net.eval()(2 * images[probe.held])
    net.train()
    alpha = float(state.extras["online_probe.alpha"])
    rows = torch.cat([torch.where(want, old, new), held])
    weight, bias = _sklearn_ridge(rows, torch.cat([labels[probe.fit], labels[probe.held]]), alpha, 4)
    torch.testing.assert_close(state.extras["online_probe.weight"].double(), weight, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        predicted = (net.eval()(2 * x).double() @ weight.T + bias).argmax(1)
    assert probe.accuracy(TensorDataset(x, y)) == pytest.approx((predicted == y).double().mean().item())


def test_ridge_heads_are_the_minimisers_of_the_penalised_squared_error():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 30, generator=g), torch.randint(0, 3, (12,), generator=g)  # fewer rows than dims
    for alpha, (w, b) in zip((1e-3, 1.0), ridge_heads(x, y, 3, alphas=(1e-3, 1.0))):
        want_w, want_b = _sklearn_ridge(x, y, alpha, 3)
        torch.testing.assert_close(w.double(), want_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.double(), want_b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="alphas=\\[0.0\\] is not allowed"):
        ridge_heads(x, y, 3, alphas=(0.0,))


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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepkit import TrainState
from stepkit.gradcache import gradcache, split_batch
from stepkit.losses.contrastive import LogitScale, clip_loss
from stepkit.monitor import SavedActivations


class Towers(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 512), nn.GELU(), nn.Dropout(dropout), nn.Linear(512, 8))
        self.text = nn.Sequential(nn.Embedding(20, 16), nn.Dropout(dropout))
        self.text_proj = nn.Linear(16, 8)
        self.scale = LogitScale(0.1)

    def forward(self, batch):
        images, words = batch
        text = self.text_proj(self.text(words).mean(1))
        return F.normalize(self.image(images), dim=-1), F.normalize(text, dim=-1)


def setup(dropout: float, batch: int = 256):
    torch.manual_seed(0)
    model = Towers(dropout).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 12, generator=g, dtype=torch.float64)
    data = (images, torch.randint(0, 20, (batch, 5), generator=g))
    return model, data


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_cached_gradients_equal_the_plain_ones_with_dropout_on():
    model, data = setup(dropout=0.2)
    loss_fn = lambda i, t: clip_loss(i, t, model.scale())  # noqa: E731

    torch.manual_seed(7)  # plain: the same chunks encoded with a graph, one backward over the batch
    outs = [model(part) for part in split_batch(data, 16)]
    plain_loss = loss_fn(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))
    plain_loss.backward()
    plain = grads(model)
    rng_after_plain = torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    loss, _, due = gradcache(state, model, data, loss_fn, chunk=16)
    assert due and state.micro_step == 1
    assert float(loss) == pytest.approx(float(plain_loss.detach()), rel=1e-12)
    cached = grads(model)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-5, atol=1e-10, msg=name)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # the stream moves on as after one pass


def test_without_dropout_it_equals_one_full_batch_forward():
    model, data = setup(dropout=0.0, batch=64)
    loss_fn = lambda i, t: clip_loss(i, t, model.scale())  # noqa: E731
    loss_fn(*model(data)).backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    gradcache(state, model, data, loss_fn, chunk=10)  # chunks need not divide the batch
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-6, atol=1e-12)


def test_accumulation_divides_and_reports_the_boundary():
    model, data = setup(dropout=0.0, batch=32)
    loss_fn = lambda i, t: clip_loss(i, t, model.scale())  # noqa: E731
    loss_fn(*model(data)).backward()
    once = grads(model)
    model.zero_grad(set_to_none=True)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), accum=2)
    assert gradcache(state, model, data, loss_fn, chunk=8)[2] is False
    assert gradcache(state, model, data, loss_fn, chunk=8)[2] is True
    for name, g in grads(model).items():  # two halves of the same batch: the same gradient
        torch.testing.assert_close(g, once[name], rtol=1e-6, atol=1e-12)


def test_peak_activation_memory_is_one_chunks_or_the_losss():
    model, data = setup(dropout=0.1)
    loss_fn = lambda i, t: clip_loss(i, t, model.scale())  # noqa: E731
    with SavedActivations() as plain:
        loss_fn(*model(data)).backward()
    with SavedActivations() as one_chunk:
        sum(e.sum() for e in model(split_batch(data, 16)[0])).backward()
    with torch.no_grad():
        embeddings = [e.requires_grad_() for e in model(data)]
    with SavedActivations() as loss_only:
        loss_fn(*embeddings).backward()
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with SavedActivations() as cached:
        gradcache(state, model, data, loss_fn, chunk=16)
    assert plain.current == cached.current == 0  # graphs freed
    assert cached.peak == max(one_chunk.peak, loss_only.peak) < plain.peak / 2


def test_split_batch_handles_nested_batches_and_refuses_others():
    parts = split_batch({"a": torch.arange(5), "b": (torch.arange(5), torch.zeros(5, 2))}, 2)
    assert len(parts) == 3
    assert parts[2]["a"].tolist() == [4] and parts[2]["b"][1].shape == (1, 2)
    with pytest.raises(TypeError, match="cannot split"):
        split_batch("text", 2)
    with pytest.raises(ValueError, match="chunk=0"):
        model, data = setup(dropout=0.0, batch=8)
        state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        gradcache(state, model, data, lambda i, t: clip_loss(i, t, 1.0), chunk=0)

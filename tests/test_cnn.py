import torch
import torch.nn.functional as F

from stepkit.models import SmallCNN
from stepkit.models.cnn import grid_mean


def test_grid_mean_equals_adaptive_average_pooling():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(grid_mean(x, 4), F.adaptive_avg_pool2d(x, 4))
    torch.testing.assert_close(grid_mean(x, 1), x.mean(dim=(2, 3), keepdim=True))
    odd = torch.randn(1, 2, 7, 7)
    torch.testing.assert_close(grid_mean(odd, 2), F.adaptive_avg_pool2d(odd, 2))  # the fallback


def test_small_cnn_takes_global_and_local_crops():
    net = SmallCNN(1, (8, 16, 32), pool=4)
    assert net.dim == 32 * 16
    assert net(torch.randn(3, 1, 32, 32)).shape == (3, 512)
    assert net(torch.randn(3, 1, 16, 16)).shape == (3, 512)


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = SmallCNN(in_chans=1, widths=(8, 16, 16), pool=2, norm="group")
    recomputed = SmallCNN(in_chans=1, widths=(8, 16, 16), pool=2, norm="group", grad_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 16, 16)
    out_plain, out_recomputed = plain(x), recomputed(x)
    torch.testing.assert_close(out_recomputed, out_plain, rtol=0, atol=0)
    assert out_recomputed._base is None  # a copy, not a view: FSDP2 hooks its backward
    out_plain.square().sum().backward()
    out_recomputed.square().sum().backward()
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    def saved_by(model):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            model(x).sum()
        return len(kept)

    assert saved_by(recomputed) < saved_by(plain)  # activations not kept: recomputed in the backward

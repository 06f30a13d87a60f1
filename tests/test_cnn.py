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

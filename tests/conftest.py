import os

import pytest
import torch.distributed as dist
from hypothesis import settings

# CI runs the same examples every time, so a red run is reproducible; locally
# hypothesis explores new ones on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A one-process gloo group: enough for DDP and FSDP2 to wrap and run on CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()

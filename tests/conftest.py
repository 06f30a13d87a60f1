import os
from pathlib import Path

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


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as a module (recipes are scripts, not a package)."""
    from stepkit.__main__ import load_recipe as load

    return load(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py")


def crash_after_step(recipe, monkeypatch, cfg, step: int = 3) -> None:
    """Run ``recipe.main(cfg)`` until the checkpoint of update ``step`` is written, then die there."""
    import stepkit.run

    real_maybe_save = stepkit.run.maybe_save  # what save_or_stop calls after each update

    def crash(ckpt_dir, state, **kw):
        saved = real_maybe_save(ckpt_dir, state, **kw)
        if state.step == step:
            raise RuntimeError("simulated crash")
        return saved

    monkeypatch.setattr(stepkit.run, "maybe_save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe.main(cfg)
    monkeypatch.setattr(stepkit.run, "maybe_save", real_maybe_save)

import os

# pytest -n 2 (the default, pyproject's addopts): two workers share the machine's cores, so each, and
# the recipe and torchrun processes its tests start, computes on one thread; two processes of two
# threads on two cores spin against each other and run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hypothesis import settings  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# CI runs the same examples every time, so a red run is reproducible; locally
# hypothesis explores new ones on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def run_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills once per test session, shared by the workers of pytest -n
    (the first to need it builds it under a lock; the others wait, then read it). Tests read or copy it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # every worker's base temp sits in this one
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".done").touch()
    return folder


def pytest_collection_modifyitems(config, items):
    # Longest first (torchrun, then the other slow tests, the unit tests last to fill the gaps): the two
    # workers of pytest -n finish close together.
    items.sort(key=lambda item: (item.path.name != "test_torchrun.py",
                                 item.get_closest_marker("slow") is None))


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


def assert_map(result: dict, path, *, classes: int) -> None:
    """``stepkit eval --plot``'s map: named in the result, a PNG holding the first ``classes`` colours of
    matplotlib's tab10 (one a label: the points are there, coloured by label)."""
    import numpy as np
    from PIL import Image

    assert result["map"] == str(path)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    seen = {tuple(p) for p in np.unique(pixels, axis=0)}
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
             (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    assert all(colour in seen for colour in tab10[:min(classes, 10)]), path

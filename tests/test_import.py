"""`import stepkit` stays light: every --help and bad-flag error waits for it."""

import subprocess
import sys

import pytest

HEAVY = ("torch._dynamo", "torch.distributed.tensor", "tensorboard", "wandb", "sklearn")


@pytest.mark.slow
def test_import_stepkit_pulls_in_no_heavy_module():
    code = f"import sys, stepkit; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_recipes_examples_and_benchmarks_import_only_public_modules():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    private = re.compile(r"^\s*(from|import)\s+stepkit(\.\w+)*\._\w+"
                         r"|^\s*from\s+stepkit(\.\w+)*\s+import\s+_\w+", re.M)
    offenders = [str(p.relative_to(root)) for folder in ("recipes", "examples", "benchmarks")
                 for p in (root / folder).glob("*.py") if private.search(p.read_text())]
    assert offenders == []


def test_no_deprecated_shims_and_no_import_circle():
    import importlib

    for gone in ("stepkit.tools", "stepkit._check", "stepkit.datasets"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)
    code = "import sys, stepkit.data; print('stepkit.bundled' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"  # the user-data loaders never reach for the bundled sets

"""`import stepkit` stays light: every --help and bad-flag error waits for it."""

import subprocess
import sys

HEAVY = ("torch._dynamo", "torch.distributed.tensor", "tensorboard", "wandb", "sklearn")


def test_import_stepkit_pulls_in_no_heavy_module():
    code = f"import sys, stepkit; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout

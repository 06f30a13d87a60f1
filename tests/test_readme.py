import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r".*?\n```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no code block after {marker}"
    return match.group(1)


def test_readme_loop_is_the_example_file():
    assert block_after("<!-- example:minimal -->") == (ROOT / "examples" / "minimal.py").read_text()


def test_readme_setup_block_has_the_install_and_the_test_command():
    assert block_after("<!-- ci:setup").splitlines() == ['pip install -e ".[dev]"', "pytest"]


def test_readme_run_block_is_one_recipe_command():
    (command,) = block_after("<!-- ci:run").splitlines()
    script = command.split()[1]
    assert command.startswith("python recipes/") and (ROOT / script).is_file()


@pytest.mark.slow
def test_example_learns_on_the_embedded_digits():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "minimal.py")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    accs = [float(a) for a in re.findall(r"held-out accuracy, \w+ weights: ([0-9.]+)", out)]
    assert len(accs) == 2 and min(accs) > 0.8, out  # chance is 0.1


def test_ema_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ema

    result = ema.main(["--size", "tiny", "--repeats", "2", "--out", str(tmp_path / "e.json")])
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved == result
    methods = ["ema_update", "param_loop", "data_reassign", "flat_lerp", "foreach_lerp", "per_tensor_lerp"]
    assert [r["method"] for r in saved["rows"]] == methods
    assert {"device", "torch", "date", "params"} <= saved.keys()

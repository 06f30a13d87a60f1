import pytest

from stepkit.log import LogConfig, Logger
from stepkit.plot import main, plot_run


def test_plot_writes_one_png_per_metric(tmp_path):
    with Logger(tmp_path, LogConfig(every=1, console=False)) as log:
        for step in range(1, 6):
            log({"loss": 1.0 / step, "grad_norm/blocks.0": 0.5}, step)
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["grad_norm_blocks.0.png", "loss.png", "steps_per_s.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_plot_cli_on_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no metrics file"):
        main([str(tmp_path)])

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


def test_the_curves_page_draws_every_numeric_metric_grouped(tmp_path):
    import json
    import re

    from PIL import Image

    from stepkit.plot import plot_page

    with Logger(tmp_path, LogConfig(every=1, console=False)) as log:
        for step in range(1, 6):
            log({"loss": 1.0 / step, "dino": 2.0 / step, "online_train_acc": 0.1 * step, "feat_std": 0.5,
                 "lr": 0.01 * step, "grad_norm": 1.0}, step)
        log.write({"knn_acc": 0.8125}, 5)  # once, at the end: in the summary's table, not a panel
    summary = {"knn_acc": 0.8125, "steps": 5, "collapse_warning": ""}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    png, page = plot_page(tmp_path)
    numeric = ["dino", "loss", "online_train_acc", "feat_std", "lr", "grad_norm", "steps_per_s"]
    width, height = Image.open(png).size
    assert (width, height) == (4 * 320, 2 * 230)  # 7 panels: 4 columns, 2 rows
    text = page.read_text()
    headings = re.findall(r"<h2>(\w+)</h2>", text)
    assert headings == ["losses", "probes", "collapse", "schedules", "other", "summary"]
    assert text.count("<svg") == len(numeric)
    for name in numeric:  # each panel titled with its metric, as text in the SVG
        assert f">{name}<" in text
    assert "<td>knn_acc</td><td>0.8125</td>" in text and "collapse_warning" not in text


def test_pca_2d_is_sklearns_pca_up_to_sign():
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    from stepkit.plot import pca_2d

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5, 3, 1, 1, 1, 1])
    got = pca_2d(x).numpy()
    want = PCA(n_components=2).fit_transform(x.double().numpy())
    np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-8, atol=1e-8)
    assert got[:, 0].var() > got[:, 1].var()


def test_the_embedding_map_colours_each_label_and_adds_umap_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    import torch
    from conftest import assert_map
    from PIL import Image

    from stepkit.plot import embedding_map

    features, labels = torch.randn(60, 8), torch.arange(60) % 4
    out = embedding_map(features, labels, tmp_path / "map.png", title="test")
    assert_map({"map": str(out)}, out, classes=4)
    pca_only = Image.open(out).size
    fake = types.ModuleType("umap")  # umap-learn's interface: UMAP(random_state=).fit_transform(x)
    fake.UMAP = lambda random_state: types.SimpleNamespace(fit_transform=lambda x: x[:, :2])
    monkeypatch.setitem(sys.modules, "umap", fake)
    both = embedding_map(features, labels, tmp_path / "both.png")
    assert Image.open(both).size[0] == 2 * pca_only[0]


def test_stepkit_plot_command(tmp_path, capsys):
    from stepkit.__main__ import main as stepkit

    with Logger(tmp_path, LogConfig(every=1, console=False)) as log:
        log({"loss": 1.0}, 1)
    assert stepkit(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "curves.html").exists() and "curves.png" in capsys.readouterr().out
    assert stepkit(["plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no metrics file" in err and err.count("\n") == 1

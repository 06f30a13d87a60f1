"""stepkit's ViT against timm's: an export in the ``timm`` format loads strictly into timm's model of
that name and gives the same features, and a timm ViT's weights loaded through ``init_from`` make
stepkit's ViT give timm's features.

timm is a benchmark- and test-time extra (``pip install --no-deps timm``); it imports torchvision,
which where it cannot import beside this torch is stood in by an empty module (as
``benchmarks/peers.py`` does for lightly), and the script says so.

    python benchmarks/timm_vit.py          # CPU: toy, ViT-S/16, ViT-B/16 and DINOv2's ViT-S/14 with registers
    python benchmarks/timm_vit.py --quick --out /tmp/t.json   # the toy shapes only (the test's)

Prints a table; writes benchmarks/results/timm_vit_cpu.json (status "skipped" and why, when timm cannot
be imported).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from peers import allow_without_torchvision  # noqa: E402

from stepkit import TrainState  # noqa: E402
from stepkit.checkpoint import save_last  # noqa: E402
from stepkit.models import VisionTransformer  # noqa: E402
from stepkit.weights import describe_part, export, init_from  # noqa: E402

DINOV2 = {"layer_scale": 1e-5}
CASES = {  # name: (stepkit preset, image size, position embeddings, class token, more ViT arguments)
    "toy, learned": ("toy", 32, "learned", True, {}),
    "toy, sincos, no class token (I-JEPA)": ("toy", 32, "sincos", False, {}),
    "toy, DINOv2 (LayerScale)": ("toy", 32, "learned", True, DINOV2),
    "toy, DINOv2, 4 registers": ("toy", 32, "learned", True, {**DINOV2, "registers": 4}),
    "ViT-S/16": ("small", 224, "learned", True, {}),
    "ViT-B/16": ("base", 224, "learned", True, {}),
    "ViT-S/14 DINOv2, 4 registers": ("small", 224, "learned", True, {**DINOV2, "registers": 4,
                                                                     "patch_size": 14}),
}


def shaken(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor moved off its initial value (LayerScale starts at 1e-5, tokens near 0), so each counts."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def compare(timm, preset: str, size: int, pos: str, class_token: bool, more: dict, folder: Path) -> dict:
    torch.manual_seed(0)
    ours = shaken(VisionTransformer.preset(preset, img_size=size, pos_embed=pos, class_token=class_token,
                                           **more)).eval()
    run = folder / "run"
    state = TrainState(ours, torch.optim.SGD(ours.parameters(), lr=0.1))
    save_last(run / "checkpoints", state, meta={"parts": {"encoder": describe_part(
        ours, source="model", prefix="", about="a ViT", input={"size": size, "mean": [0.5] * 3,
                                                               "std": [0.5] * 3})}})
    out = export(run, "encoder", folder / "timm_export", format="timm")
    config = json.loads((out / "config.json").read_text())
    x = torch.randn(2, 3, size, size)
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own loader
    strict = timm.create_model(config["architecture"], pretrained=False, num_classes=0,
                               **config["model_args"]).eval()
    from safetensors.torch import load_file

    strict.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    with torch.no_grad():
        want = ours(x)
        export_diff = max((exported(x) - want).abs().max().item(), (strict(x) - want).abs().max().item())
        # the other way: a timm model's weights through init_from (a fresh stepkit ViT of other weights)
        torch.manual_seed(1)
        theirs = shaken(timm.create_model(config["architecture"], pretrained=False, num_classes=0,
                                          **config["model_args"])).eval()
        torch.save(theirs.state_dict(), folder / "timm_state.pth")
        fresh = VisionTransformer.preset(preset, img_size=size, class_token=class_token, **more).eval()
        report = init_from(fresh, folder / "timm_state.pth", part="")
        init_diff = (fresh(x) - theirs(x)).abs().max().item()
    return {"timm_name": config["architecture"], "export_max_abs_diff": export_diff,
            "init_max_abs_diff": init_diff, "init_missing": report.missing,
            "init_unexpected": report.unexpected}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy shapes only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "timm_vit_cpu.json")
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.quick or v[0] == "toy"}
    note = allow_without_torchvision()
    results: dict = {"note": note}
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - not installed, or broken beside this torch
        results.update(status="skipped", why=f"timm is not importable ({type(err).__name__}: {err}); "
                                               "pip install --no-deps timm")
        print(results["why"])
    else:
        results.update(status="ran", timm=timm.__version__, torch=torch.__version__, cases={})
        print(f"timm {timm.__version__}, torch {torch.__version__}{'; ' + note if note else ''}")
        print(f"{'case':38} {'timm model':24} {'export |diff|':>14} {'init |diff|':>12}")
        for name, (preset, size, pos, class_token, more) in cases.items():
            with tempfile.TemporaryDirectory() as tmp:
                row = compare(timm, preset, size, pos, class_token, more, Path(tmp))
            results["cases"][name] = row
            print(f"{name:38} {row['timm_name']:24} {row['export_max_abs_diff']:14.2e} "
                  f"{row['init_max_abs_diff']:12.2e}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

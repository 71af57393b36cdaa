"""ldm-demo end to end at a tiny scale: both stages, the model folder, the grid, the table."""

import json

import numpy as np
import torch
from PIL import Image

from ldm import LatentDiffusionPipeline
from ldm.cli import demo

TINY = ["train.max_steps=2", "train.checkpoint_every=1", "data.shapes.num_images=96", "data.num_validation=8"]


def test_demo_runs_both_stages_and_writes_grid_table_and_model(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "--out", str(out), "--images-per-prompt", "1", "--steps", "2",
        "--vae", *TINY, "scale_samples=16",
        "--unet", *TINY, "validation.num_inference_steps=2",
    ]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean over seen pairs" in printed and "mean over held-out pairs" in printed
    report = json.loads((out / "adherence.json").read_text())
    assert len(report["per_prompt"]) == 18
    held = {r["prompt"] for r in report["per_prompt"] if r["held_out"]}
    assert held == {"a green triangle", "a purple circle"}
    assert 0.0 <= report["seen"] <= 1.0 and 0.0 <= report["held_out"] <= 1.0
    assert f"report:       {out / 'report.html'}" in printed
    page = (out / "report.html").read_text()
    assert "stage 1: KL autoencoder" in page and "stage 2: latent U-Net" in page
    grid = Image.open(out / "samples.png")
    assert grid.width > grid.height / 18  # 18 labelled rows

    # The model folder answers the DESIGN.md call, words outside its vocabulary included.
    pipe = LatentDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat in a space suit", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()

    # A second run reuses both finished stages instead of training again.
    assert demo.main(argv) == 0
    assert "reusing" in capsys.readouterr().out


def test_demo_control_trains_both_methods_and_scores_them(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "--out", str(out), "--images-per-prompt", "1", "--steps", "2", "--control",
        "--vae", *TINY, "scale_samples=16",
        "--unet", *TINY, "validation.num_inference_steps=2",
        "--control-overrides", *TINY, "validation.num_inference_steps=2", "validation.num_controls=2",
    ]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ControlNet" in printed and "T2I-Adapter" in printed and "control off" in printed
    report = json.loads((out / "control.json").read_text())
    assert set(report["methods"]) == {"ControlNet", "T2I-Adapter", "control off"}
    for scores in report["methods"].values():
        assert 0.0 <= scores["iou"] <= 1.0 and 0.0 <= scores["colour_adherence"] <= 1.0
        assert 0.0 <= scores["held_out_iou"] <= 1.0
    for folder, cls in (("controlnet", "ControlNetModel"), ("t2i-adapter", "T2IAdapter")):
        assert json.loads((out / folder / "final/config.json").read_text())["_class_name"] == cls
    grid = Image.open(out / "control.png")
    assert grid.height > 18 * 32  # 18 rows: control | ControlNet | T2I-Adapter | control off
    # One report page over all four run folders, the control runs named as such.
    page = (out / "report.html").read_text()
    assert page.count('<h2 id="run-') == 4 and page.count("— control model") == 2

"""ldm-report: one self-contained HTML file, checked by its contents and in a real headless Chromium."""

import base64
import io
import json
import re

import numpy as np
import PIL.Image
import pytest

from ldm.cli.report import main
from ldm.eval.metrics_log import group_keys, read_records
from ldm.eval.plots import smoothed, smoothing_weight
from ldm.eval.report import MAX_GRIDS, stage_of, write_demo_report, write_report

from browser import check_in_chromium, find_chromium

UNET_CONFIG = "vae_path: runs/vae/final\nmodel:\n  sample_size: 8\ntrain:\n  output_dir: runs/unet\n  note: <b>escaped</b>\n"
VAE_CONFIG = "model:\n  latent_channels: 4\nloss:\n  kl_weight: 1.0e-06\n"
BUCKETS = (100, 500, 900)


def write_png(path, colour, size=(40, 20)):
    PIL.Image.new("RGB", size, colour).save(path)


def make_run(folder, config=UNET_CONFIG, steps=range(10, 210, 10), grids=(50, 100, 150, 200), torn=True):
    """A run folder as the trainers write it: metrics.jsonl (train and validation records), grids, checkpoints."""
    (folder / "samples").mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    lines = []
    for s in steps:
        lines.append({"step": s, "loss": 1.0 / s, "lr": 1e-4 * min(1, s / 50), "samples_per_s": 100 + s % 7,
                      "epoch": s / 100, "time_s": s * 0.1})
        if s % 50 == 0:
            val = {"step": s, "val_loss": 0.5 - s / 1000}
            val.update({f"val_loss_t{t}": 0.5 - s / 1000 + t / 5000 for t in BUCKETS})
            val.update({"val_loss_ema": 0.45 - s / 1000, "eval_adherence": s / 200, "eval_fid": 300.0 - s})
            lines.append(val)
    lines.append({"step": steps[-1], "scaling_factor": 0.8406})  # logged once: a number, not a figure
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 999, "loss": 0.' if torn else ""))
    for i, s in enumerate(grids):
        write_png(folder / "samples" / f"step-{s:06d}.png", (40 * i, 100, 200 - 40 * i))
    for s in (100, 200):
        ckpt = folder / "checkpoints" / f"step-{s:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint.json").write_text(json.dumps({"step": s}))
        (ckpt / "model.safetensors").write_bytes(b"\0" * 2048)
    return folder


def embedded_images(html):
    return re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)


def test_metrics_keys_are_grouped_as_documented():
    groups = group_keys(["step", "time_s", "epoch", "loss", "kl", "lr", "lr_disc", "images_per_s", "val_loss",
                         "val_loss_t900", "val_loss_t50", "val_loss_ema", "val_loss_ema_t50", "val_psnr", "val_ssim",
                         "eval_fid", "eval_clip_score"])
    assert groups["losses"] == ["kl", "loss"]
    assert groups["lr"] == ["lr", "lr_disc"]
    assert groups["throughput"] == ["images_per_s"]
    assert groups["val_loss"] == {
        "val_loss": {"overall": "val_loss", "buckets": [(50, "val_loss_t50"), (900, "val_loss_t900")]},
        "val_loss_ema": {"overall": "val_loss_ema", "buckets": [(50, "val_loss_ema_t50")]},
    }
    assert groups["validation"] == ["val_psnr", "val_ssim"]
    assert groups["eval"] == ["eval_clip_score", "eval_fid"]


def test_torn_last_line_is_skipped(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_records(tmp_path / "m.jsonl") == [{"step": 1, "loss": 2.0}]


def test_smoothing_is_the_debiased_ema():
    # w = 0.5: m = 0.5, 1.25, 2.125; divided by 1 - 0.5^t = 0.5, 0.75, 0.875.
    np.testing.assert_allclose(smoothed([1.0, 2.0, 3.0], 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875], rtol=1e-12)
    np.testing.assert_allclose(smoothed([4.0, float("nan"), 4.0], 0.9), [4.0, 4.0, 4.0])  # constant stays, NaN skipped
    assert smoothing_weight(10) == 0.0 and smoothing_weight(200) == pytest.approx(0.9) and smoothing_weight(10**6) == 0.95


def test_stage_is_read_from_the_config():
    assert stage_of(UNET_CONFIG) == "unet" and stage_of(VAE_CONFIG) == "vae" and stage_of("") == "unknown"


def test_report_is_one_self_contained_file(tmp_path):
    run = make_run(tmp_path / "unet")
    out = write_report([run])
    assert out == run / "report.html"
    html = out.read_text()
    # Nothing outside the file: no src/href but data: URIs and in-page anchors, no script, no stylesheet link.
    assert re.findall(r'(?:src|href)="(?!data:|#)', html) == []
    assert "<script" not in html and "<link" not in html and "http" not in html.replace("http-equiv", "")
    images = embedded_images(html)
    # Figures: loss (training losses: 1), lr, val_loss family x2, eval_adherence, eval_fid, throughput = 7; 4 grids.
    assert len(images) == 7 + 4
    for data in images:
        with PIL.Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()  # every one a whole PNG
    # The grids, in step order, are the files themselves.
    grid_bytes = [base64.b64decode(d) for d in images[-4:]]
    assert grid_bytes == [(run / "samples" / f"step-{s:06d}.png").read_bytes() for s in (50, 100, 150, 200)]
    assert "Validation sample grids" in html and "step 200" in html
    assert "Validation loss per timestep bucket" in html and "Evaluation metrics" in html and "Throughput" in html
    assert "step-000100" in html and "step-000200" in html  # checkpoints table
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html  # the config, escaped
    import torch

    assert torch.__version__ in html and "cpu count" in html  # the machine
    assert "25 records" in html  # 20 training + 4 validation records + 1; the torn last line skipped
    assert "logged once: scaling_factor 0.8406 (step 200)" in html
    assert "latest values: step 200, loss 0.005, lr 0.0001" in html and "val_loss_t900 0.48" in html


def test_several_runs_on_one_page_and_many_grids_are_thinned(tmp_path):
    vae = make_run(tmp_path / "vae", config=VAE_CONFIG, grids=range(100, 100 * (MAX_GRIDS + 9), 100), torn=False)
    unet = make_run(tmp_path / "unet")
    out = write_report([vae, unet], tmp_path / "report.html", title="demo")
    html = out.read_text()
    assert html.count("<h2 id=\"run-") == 2 and "stage 1: KL autoencoder" in html and "stage 2: latent U-Net" in html
    assert f"{MAX_GRIDS} of {MAX_GRIDS + 8} grids" in html and "Reconstruction grids" in html
    assert "step 100</figcaption>" in html and f"step {100 * (MAX_GRIDS + 8)}</figcaption>" in html  # first and last kept


def test_demo_report_covers_the_stages_that_ran_and_ldm_eval_results(tmp_path):
    demo = tmp_path / "demo"
    make_run(demo / "vae", config=VAE_CONFIG)
    unet = make_run(demo / "unet")
    (unet / "eval").mkdir()
    points = [{"steps": 25, "guidance_scale": g, "images": 18, "adherence": a} for g, a in ((1.0, 0.25), (7.5, 0.875))]
    (unet / "eval" / "eval.json").write_text(json.dumps({"prompts": "shapes.txt", "num_prompts": 18, "points": points}))
    write_png(unet / "eval" / "tradeoff.png", (10, 20, 30))
    out = write_demo_report(demo)
    html = out.read_text()
    assert out == demo / "report.html" and html.count('<h2 id="run-') == 2 and "controlnet" not in html
    assert "Evaluation: eval" in html and "<td>0.875</td>" in html and "<th>guidance scale</th>" in html
    assert len(embedded_images(html)) == 2 * (7 + 4) + 1  # both runs' figures and grids, and the trade-off plot
    with pytest.raises(Exception, match="run ldm-demo first"):
        write_demo_report(tmp_path / "nothing")


def test_cli_writes_and_prints_the_path_and_errors_are_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.html'}"
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run folder at") and "\n" not in err
    assert main([str(run), str(run)]) == 2
    assert "--out" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 0 and "no metrics.jsonl records yet" in (empty / "report.html").read_text()


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: install Debian's chromium package "
                    "(`make test` does it as root through scripts/ensure_chromium.sh)")
def test_report_in_headless_chromium(tmp_path):
    """A real browser loads it with no console error, no request outside the file, every image decoded,
    and draws a page that is not blank."""
    run = make_run(tmp_path / "unet")
    page = write_report([run])
    check = check_in_chromium(CHROMIUM, page)
    assert check.console_errors == []
    assert [u for u in check.requests if not u.startswith("data:")] == [page.resolve().as_uri()]
    assert len(check.images) == 11 and all(i["ok"] for i in check.images), check.images
    with PIL.Image.open(io.BytesIO(check.screenshot)) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1600, 1280)
    # Not blank: text and plots cover a real part of the page, in many colours.
    assert (pixels.min(axis=-1) < 200).mean() > 0.01
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_a_broken_image_is_seen_by_the_browser_check(tmp_path):
    """The browser check can fail: a page with a corrupt data URI and a console error is caught."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH")
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img alt="x" src="data:image/png;base64,AAAA">'
                    '<script>console.error("boom")</script></body></html>')
    check = check_in_chromium(CHROMIUM, page)
    assert check.console_errors == ["boom"] and check.images == [{"alt": "x", "ok": False, "width": 0}]

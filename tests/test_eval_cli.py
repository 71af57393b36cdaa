"""ldm-eval end to end on a tiny model folder, with random-weight metric files the tests write."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from ldm.cli.eval import main
from ldm.data.checker import adherence
from ldm.eval.clip_score import load_hf_clip
from ldm.eval.fid_kid import InceptionMetrics, from_model_range, to_uint8
from ldm.eval.weights import INCEPTION_FILE
from ldm.pipeline import LatentDiffusionPipeline

from eval_files import write_hf_clip_folder, write_inception_weights, write_open_clip_weights

DATA = """data:
  source: shapes
  resolution: 16
  num_validation: 3
  shapes:
    num_images: 12
    seed: 5
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_files")
    (root / "data.yaml").write_text(DATA)
    inception = write_inception_weights(root / INCEPTION_FILE)
    clip_folder, _, _ = write_hf_clip_folder(root / "clip")
    return {"data": root / "data.yaml", "inception": inception, "clip": clip_folder}


def run(model, out, *extra):
    return main(["--model", str(model), "--outdir", str(out), "--steps", "2", "--device", "cpu", *extra])


def pngs(out):
    return sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.png"))


def test_sweep_scores_every_point_and_resumes(tiny_model_dir, files, tmp_path, capsys):
    out = tmp_path / "eval"
    flags = ["--data-config", str(files["data"]), "--guidance-scales", "1,7.5", "--batch-size", "2",
             "--inception-weights", str(files["inception"]), "--inception-features", "64", "--clip-folder", str(files["clip"])]
    assert run(tiny_model_dir, out, *flags) == 0
    printed = capsys.readouterr()
    assert "3 prompts x 2 points = 6 images" in printed.out and "0 images reused, 6 made" in printed.out
    assert "6/6" in printed.err  # the progress bar
    assert pngs(out) == [f"steps2-cfg{g}/{line:05d}-s{line:010d}.png" for g in ("1", "7.5") for line in (1, 2, 3)]
    result = json.loads((out / "eval.json").read_text())
    assert result["metrics"] == ["fid", "kid", "clip", "adherence"] and result["real_images"] == 3
    assert [(p["steps"], p["guidance_scale"], p["images"]) for p in result["points"]] == [(2, 1.0, 3), (2, 7.5, 3)]
    header = printed.out.splitlines()[-5]
    assert header.split() == ["steps", "guidance", "scale", "images", "fid", "kid", "clip", "score", "adherence"]
    with PIL.Image.open(out / "tradeoff.png") as plot:
        assert plot.width > 300

    # The numbers are the metrics of the files on disk: held-out captions as prompts, held-out images as the real set.
    from ldm.config import UNetStageConfig, load_config
    from ldm.data import build_dataset

    held = build_dataset(load_config(UNetStageConfig, str(files["data"])).data, "validation")
    prompts = [held[i]["caption"] for i in range(3)]
    real = from_model_range(torch.stack([held[i]["pixel_values"] for i in range(3)]))
    clip = load_hf_clip(files["clip"])
    for point in result["points"]:
        folder = out / "images" / point["folder"]
        images = [PIL.Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
        metrics = InceptionMetrics.from_file(files["inception"], features=64)
        metrics.update(real, real=True)
        metrics.update(to_uint8(images), real=False)
        expected = metrics.compute()
        assert point["fid"] == pytest.approx(expected["fid"], rel=1e-6) and point["fid"] > 0
        assert point["kid"] == pytest.approx(expected["kid"], rel=1e-6, abs=1e-9)
        assert point["clip_score"] == pytest.approx(clip(to_uint8(images), prompts), abs=1e-5)
        assert point["adherence"] == adherence(images, prompts)

    # An image is what the pipeline gives for its prompt, seed (--seed + line) and point.
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompts[1], num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(2)).images[0]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "images/steps2-cfg7.5/00002-s0000000002.png")), np.asarray(expected))

    # A re-run makes nothing; with one image gone it makes only that one, and the numbers do not move.
    stamps = {p: (out / "images" / p).stat().st_mtime_ns for p in pngs(out)}
    (out / "images/steps2-cfg1/00003-s0000000003.png").unlink()
    assert run(tiny_model_dir, out, *flags) == 0
    assert "5 images reused, 1 made" in capsys.readouterr().out
    assert {p: (out / "images" / p).stat().st_mtime_ns for p in pngs(out) if "cfg7.5" in p} == \
        {p: s for p, s in stamps.items() if "cfg7.5" in p}
    again = json.loads((out / "eval.json").read_text())
    assert [p["fid"] for p in again["points"]] == pytest.approx([p["fid"] for p in result["points"]], rel=1e-6)


def test_shapes_without_weight_files_scores_adherence_and_plots_it(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# comment\na blue square\n")
    out = tmp_path / "eval"
    assert run(tiny_model_dir, out, "--prompts", str(prompts), "--guidance-scales", "1,3", "--steps", "1,2") == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["metrics"] == ["adherence"] and result["real_images"] is None
    assert [(p["steps"], p["guidance_scale"]) for p in result["points"]] == [(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)]
    assert all(set(p) == {"steps", "guidance_scale", "images", "folder", "adherence"} for p in result["points"])
    assert "00003-s0000000003.png" in pngs(out)[0] + pngs(out)[1]  # line numbers as in the prompt file
    assert (out / "tradeoff.png").is_file()


def test_open_clip_from_the_command_line(tiny_model_dir, tmp_path):
    name, weights, _ = write_open_clip_weights(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "eval"
    assert run(tiny_model_dir, out, "--prompts", str(prompts), "--guidance-scales", "2", "--clip-model", name,
               "--clip-weights", str(weights)) == 0
    (point,) = json.loads((out / "eval.json").read_text())["points"]
    assert set(point) == {"steps", "guidance_scale", "images", "folder", "clip_score"} and point["clip_score"] >= 0


class FakePartialState:
    """What accelerate's PartialState tells process 1 of 2 (no process group is started)."""

    from accelerate import PartialState

    process_index, num_processes, is_main_process = 1, 2, False
    device = torch.device("cpu")
    split_between_processes = PartialState.split_between_processes

    def __init__(self, cpu=False):
        pass

    def wait_for_everyone(self):
        pass


def test_under_accelerate_each_process_makes_its_share(tiny_model_dir, tmp_path, monkeypatch):
    import ldm.eval.sweep

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "eval"
    monkeypatch.setattr(ldm.eval.sweep, "process_state", FakePartialState)
    assert run(tiny_model_dir, out, "--prompts", str(prompts), "--guidance-scales", "1") == 0
    # 5 images over 2 processes: process 0 takes 3, process 1 the last 2; only the main process scores.
    assert pngs(out) == ["steps2-cfg1/00004-s0000000004.png", "steps2-cfg1/00005-s0000000005.png"]
    assert not (out / "eval.json").exists()


ERRORS = {
    # case: (extra flags, words the one-line error must hold)
    "fid-without-weights": (["--metrics", "fid"], ["needs --inception-weights", INCEPTION_FILE]),
    "missing-inception-file": (["--inception-weights", "nope.pth"], ["--inception-weights: no file at nope.pth", INCEPTION_FILE]),
    "clip-without-weights": (["--metrics", "clip", "--clip-model", "ViT-B-32"], ["needs --clip-weights", "open_clip_pytorch_model.bin"]),
    "clip-nothing": (["--metrics", "clip"], ["CLIP score needs a local CLIP"]),
    "clip-folder-missing": (["--clip-folder", "nope"], ["--clip-folder: nope is not a folder with config.json", "huggingface-cli"]),
    "unknown-metric": (["--metrics", "fid,lpips"], ["unknown metric 'lpips'"]),
    "adherence-not-shapes": (["--metrics", "adherence", "--prompts", "CAT"], ["needs shapes prompts"]),
    "no-prompts": (["--no-prompts"], ["give the prompts"]),
    "fid-without-real": (["--inception-weights", "INCEPTION", "--prompts", "CAT", "--no-data"], ["compare with real images"]),
    "sweep-in-jsonl": (["--prompts", "JSONL"], ["line 1: ldm-eval sweeps guidance_scale"]),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_errors_are_one_line_before_any_image(tiny_model_dir, files, tmp_path, capsys, case):
    extra, words = ERRORS[case]
    cat = tmp_path / "cat.txt"
    cat.write_text("a cat\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "guidance_scale": 3}\n')
    extra = [{"CAT": str(cat), "JSONL": str(jsonl), "INCEPTION": str(files["inception"])}.get(e, e) for e in extra]
    data = [] if "--no-data" in extra or "--no-prompts" in extra else ["--data-config", str(files["data"])]
    extra = [e for e in extra if e not in ("--no-data", "--no-prompts")]
    out = tmp_path / "eval"
    assert run(tiny_model_dir, out, *data, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err
    assert not out.exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--guidance-scales" in capsys.readouterr().out


def test_kid_alone_reports_kid_only(tiny_model_dir, files, tmp_path):
    out = tmp_path / "eval"
    assert run(tiny_model_dir, out, "--data-config", str(files["data"]), "--guidance-scales", "3", "--metrics", "kid",
               "--inception-weights", str(files["inception"]), "--inception-features", "64") == 0
    (point,) = json.loads((out / "eval.json").read_text())["points"]
    assert set(point) == {"steps", "guidance_scale", "images", "folder", "kid", "kid_std"}


def test_two_real_processes_make_the_images_one_process_makes(tiny_model_dir, tmp_path):
    """torchrun with two processes (gloo on the CPU), as under `accelerate launch`: each makes its share,
    the main process scores; the images are those of one process, bit for bit."""
    import os
    import subprocess
    import sys

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    flags = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--guidance-scales", "1,4", "--steps", "2",
             "--device", "cpu", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ldm.cli.eval", *flags, "--outdir", str(two)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("results: ") == 1  # only the main process scores
    one = tmp_path / "one"
    assert main([*flags, "--outdir", str(one)]) == 0
    assert pngs(two) == pngs(one) and len(pngs(one)) == 6
    for name in pngs(one):
        assert (two / "images" / name).read_bytes() == (one / "images" / name).read_bytes(), name
    strip = lambda r: [{k: v for k, v in p.items()} for p in r["points"]]  # noqa: E731
    assert strip(json.loads((two / "eval.json").read_text())) == strip(json.loads((one / "eval.json").read_text()))


def test_each_png_says_how_it_was_made(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "eval"
    assert run(tiny_model_dir, out, "--prompts", str(prompts), "--guidance-scales", "4.5", "--seed", "10") == 0
    text = PIL.Image.open(out / "images/steps2-cfg4.5/00001-s0000000011.png").text
    assert (text["prompt"], text["seed"], text["steps"], text["guidance_scale"], text["model"]) == (
        "a red circle", "11", "2", "4.5", str(tiny_model_dir))
    assert json.loads(text["parameters"])["scheduler"] == "DDIMScheduler"


def test_the_model_folders_validation_loss_is_reported(tiny_model_dir, files, tmp_path, capsys):
    """The held-out loss of the folder's U-Net at the training buckets, as the training loop measures it."""
    from ldm import LatentDiffusionPipeline
    from ldm.codec import LatentCodec
    from ldm.config import UNetStageConfig, load_config
    from ldm.eval.validation_loss import ValidationLoss, held_out_split, text_to_image_inputs
    from ldm.objectives import build_objective

    out = tmp_path / "eval"
    assert run(tiny_model_dir, out, "--data-config", str(files["data"]), "--guidance-scales", "3") == 0
    assert "validation loss on the held-out split" in capsys.readouterr().out
    reported = json.loads((out / "eval.json").read_text())["validation_loss"]
    buckets = [reported[f"val_loss_t{k}"] for k in range(8)]
    assert reported["val_loss"] == pytest.approx(sum(buckets) / 8, rel=1e-12) and all(b > 0 for b in buckets)
    # The same number as the training loop's ValidationLoss on this folder's parts.
    cfg = load_config(UNetStageConfig, str(files["data"]))
    pipe = LatentDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    direct = ValidationLoss(build_objective(cfg.objective), held_out_split(cfg.data), cfg.validation, rank=0, world=1)
    with torch.no_grad():
        expected = direct(text_to_image_inputs(LatentCodec(pipe.vae), pipe.text_encoder, pipe.tokenizer, pipe.unet, "cpu"))
    assert reported["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)

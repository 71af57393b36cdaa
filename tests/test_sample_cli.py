"""ldm-sample end to end on a tiny saved model folder, in-process (and once as a process killed mid-file)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from ldm.cli.sample import main
from ldm.cli.sample_io import cut_torn_tail, read_manifests
from ldm.cli.shards import resolve_shard
from ldm.errors import LdmError
from ldm.pipeline import LatentDiffusionPipeline

STEPS = ["--steps", "2"]


def sample(model, prompts, outdir, *extra):
    return main(["--model", str(model), "--prompts", str(prompts), "--outdir", str(outdir), "--device", "cpu", *STEPS, *extra])


def manifest(outdir, name="manifest.jsonl"):
    return [json.loads(line) for line in (outdir / name).read_text().splitlines()]


def images(outdir):
    """The sampled images (not the contact sheet), by name."""
    return sorted(p.name for p in outdir.glob("0*.png"))


def pixels(path):
    return np.asarray(PIL.Image.open(path))


def test_images_manifest_and_rerun_skips(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# skip me\na blue square\n")
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, "--seed", "40") == 0
    assert "2/2" in capsys.readouterr().err  # the progress bar over images
    files = images(out)
    assert files == ["00001-s0000000041.png", "00003-s0000000043.png"]  # seed = --seed + line number
    records = manifest(out)
    assert [(r["file"], r["line"], r["prompt"], r["seed"], r["steps"], r["guidance_scale"]) for r in records] == [
        ("00001-s0000000041.png", 1, "a red circle", 41, 2, 7.5),
        ("00003-s0000000043.png", 3, "a blue square", 43, 2, 7.5),
    ]
    assert pixels(out / files[0]).shape == (16, 16, 3)
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind
    # Each PNG says how it was made: its settings one by one, and all of them as JSON.
    text = PIL.Image.open(out / files[1]).text
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["steps"], text["guidance_scale"]) == (
        "a blue square", "", "43", "2", "7.5")
    assert text["model"] == str(tiny_model_dir)
    parameters = json.loads(text["parameters"])
    assert parameters["prompt"] == "a blue square" and parameters["seed"] == 43 and parameters["line"] == 3
    assert parameters["negative_prompt"] is None and parameters["scheduler"] == "DDIMScheduler"
    # And a contact sheet: one labelled row per line (labelled_grid: 4 px padding around 96 px tiles).
    sheet = PIL.Image.open(out / "contact_sheet.png")
    assert sheet.height == 2 * (96 + 4) + 4

    # A re-run makes nothing: the files are untouched and the manifest is not duplicated.
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    assert sample(tiny_model_dir, prompts, out, "--seed", "40") == 0
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps
    assert manifest(out) == records


def test_an_image_depends_only_on_its_line_and_seed(tiny_model_dir, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a red circle\n")
    many = tmp_path / "many.jsonl"
    many.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a red circle"},
        {"prompt": "a green triangle", "negative_prompt": "blue"},
        {"prompt": "a blue square", "seed": 5},
        {"prompt": "a yellow circle"},
        {"prompt": "a cyan square", "guidance_scale": 3.0},  # its own batch: other settings
    ]) + "\n")
    assert sample(tiny_model_dir, one, tmp_path / "one", "--batch-size", "1") == 0
    assert sample(tiny_model_dir, many, tmp_path / "b1", "--batch-size", "1") == 0
    assert sample(tiny_model_dir, many, tmp_path / "b4", "--batch-size", "4") == 0
    assert images(tmp_path / "b1") == images(tmp_path / "b4")
    assert "00003-s0000000005.png" in images(tmp_path / "b4")  # a .jsonl seed is kept as given
    # Batched kernels may round differently from single ones: allow one level in 255 (0 measured on CPU).
    for name in images(tmp_path / "b1"):
        assert np.abs(pixels(tmp_path / "b1" / name).astype(int) - pixels(tmp_path / "b4" / name)).max() <= 1, name
    name = "00001-s0000000001.png"
    assert np.abs(pixels(tmp_path / "one" / name).astype(int) - pixels(tmp_path / "b4" / name)).max() <= 1

    # And it is what the Python API gives for that prompt and seed.
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "one" / name), np.asarray(expected))


def test_several_images_per_prompt(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, "--num-images-per-prompt", "2", "--guidance-scale", "1") == 0
    assert images(out) == ["00001-s0000000001-00.png", "00001-s0000000001-01.png"]
    assert not np.array_equal(pixels(out / "00001-s0000000001-00.png"), pixels(out / "00001-s0000000001-01.png"))


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


ERROR_CASES = {
    # case: (prompt file name, its text, extra flags, words the one-line error must hold)
    "missing-prompts": ("nope.txt", None, [], "prompt file not found"),
    "empty-file": ("p.jsonl", "\n\n", [], "no prompts in"),
    "malformed-jsonl": ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n', [], "line 2: malformed JSON"),
    "unknown-key": ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "sed": 1}\n', [], "line 2: unknown key 'sed'"),
    "missing-model": ("p.txt", "a\n", [], "no model folder"),
    "missing-unet-weights": ("p.txt", "a\n", [], "'unet' part"),
    "text-width-mismatch": ("p.txt", "a\n", [], "text of width 16 (unet cross_attention_dim) but the text encoder gives width 32"),
    "latent-mismatch": ("p.txt", "a\n", [], "U-Net has 3 channels (unet in_channels) but the VAE has 4 (vae latent_channels)"),
    "bad-size": ("p.txt", "a\n", ["--height", "15"], "multiples of 2"),
    "bad-batch": ("p.txt", "a\n", ["--batch-size", "0"], "--batch-size must be at least 1"),
    "bad-shard": ("p.txt", "a\n", ["--num-shards", "2", "--shard-index", "2"], "--shard-index must be in 0..1"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_errors_print_one_line_and_exit_2_before_any_image(tiny_model_dir, tmp_path, capsys, case):
    name, text, extra, words = ERROR_CASES[case]
    prompts = tmp_path / name
    if text is not None:
        prompts.write_text(text)
    model = tiny_model_dir
    if case in ("missing-model", "missing-unet-weights", "text-width-mismatch", "latent-mismatch"):
        model = tmp_path / "model"
        if case != "missing-model":
            shutil.copytree(tiny_model_dir, model)
    if case == "missing-unet-weights":
        for weights in (model / "unet").glob("*.safetensors"):
            weights.unlink()
    if case == "text-width-mismatch":  # a U-Net trained for another text encoder
        edit_json(model / "unet" / "config.json", cross_attention_dim=16)
    if case == "latent-mismatch":  # a U-Net trained on another VAE's latents
        edit_json(model / "unet" / "config.json", in_channels=3)
    out = tmp_path / "out"
    assert sample(model, prompts, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
    assert not list(out.glob("*.png"))


def test_shards_take_every_nth_line_and_write_their_own_manifests(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# header\na red circle\na blue square\na green triangle\n")  # prompt lines 2, 3, 4
    out = tmp_path / "out"
    for index in ("0", "1"):
        assert sample(tiny_model_dir, prompts, out, "--num-shards", "2", "--shard-index", index) == 0
    assert [r["line"] for r in manifest(out, "manifest-shard0-of-2.jsonl")] == [2, 4]
    assert [r["line"] for r in manifest(out, "manifest-shard1-of-2.jsonl")] == [3]
    assert not (out / "manifest.jsonl").exists()
    assert (out / "contact_sheet-shard0-of-2.png").is_file() and (out / "contact_sheet-shard1-of-2.png").is_file()
    # A whole-file re-run finds everything done (in both shards' manifests) and makes only the full sheet.
    stamps = {f: (out / f).stat().st_mtime_ns for f in images(out)}
    assert sample(tiny_model_dir, prompts, out) == 0
    assert {f: (out / f).stat().st_mtime_ns for f in images(out)} == stamps and len(stamps) == 3
    assert not (out / "manifest.jsonl").exists()
    assert PIL.Image.open(out / "contact_sheet.png").height == 3 * (96 + 4) + 4


class FakePartialState:
    """What accelerate.PartialState tells process 1 of 3 (no process group is started)."""

    process_index, num_processes, is_main_process = 1, 3, False
    device = torch.device("cpu")


def test_under_accelerate_the_rank_picks_the_shard(tiny_model_dir, tmp_path, monkeypatch):
    import accelerate

    assert (resolve_shard(None, None).index, resolve_shard(None, None).count) == (0, 1)  # a plain process
    assert (resolve_shard(4, 3).index, resolve_shard(4, 3).count) == (3, 4)
    with pytest.raises(LdmError, match="together"):
        resolve_shard(2, None)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(accelerate, "PartialState", FakePartialState)
    shard = resolve_shard(None, None)
    assert (shard.index, shard.count, shard.is_main, shard.suffix) == (1, 3, False, "-shard1-of-3")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--outdir", str(out), *STEPS]) == 0
    assert [r["line"] for r in manifest(out, "manifest-shard1-of-3.jsonl")] == [2, 5]


def test_a_torn_manifest_line_is_ignored_then_cut(tmp_path):
    manifest_file = tmp_path / "manifest.jsonl"
    manifest_file.write_text('{"file": "00001-s0000000001.png", "line": 1}\n{"file": "00002-s00')  # killed mid-append
    assert read_manifests(tmp_path) == {"00001-s0000000001.png"}
    cut_torn_tail(manifest_file)
    assert manifest_file.read_text() == '{"file": "00001-s0000000001.png", "line": 1}\n'


def test_contact_sheet_labels_fit_their_column():
    from PIL import ImageFont

    from ldm.contact_sheet import fit_label
    from ldm.grid import LABEL_WIDTH

    font = ImageFont.load_default(size=16)
    assert fit_label("12: a red\ncircle") == "12: a red circle"
    long = fit_label("7: " + "a very long prompt about a cat in a space suit " * 20)
    assert long.startswith("7: a very") and long.endswith("…") and font.getlength(long) <= LABEL_WIDTH - 16


def test_killed_mid_file_then_rerun_makes_every_line_once(tiny_model_dir, tmp_path):
    """A real SIGKILL while sampling, then a re-run: each line once, every PNG whole, no temporary files."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a shape number {i}\n" for i in range(12)))
    out = tmp_path / "out"
    # Batch size 1 and 10 steps: ~0.2-0.5 s an image here, so the kill lands mid-file.
    cmd = [sys.executable, "-m", "ldm.cli.sample", "--model", str(tiny_model_dir), "--prompts", str(prompts),
           "--outdir", str(out), "--device", "cpu", "--steps", "10", "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not images(out):
            assert proc.poll() is None, "ldm-sample ended before writing an image"
            assert time.monotonic() < deadline, "no image after 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    made = len(images(out))
    assert 1 <= made < 12, f"{made} images when killed: not mid-file"

    # The re-run in-process: the same code, without paying the imports a second time.
    assert main(cmd[3:]) == 0
    assert sorted(r["line"] for r in manifest(out)) == list(range(1, 13))  # every line, each once
    assert len(images(out)) == 12
    for name in images(out) + ["contact_sheet.png"]:
        with PIL.Image.open(out / name) as image:
            image.load()  # whole files: a truncated PNG raises here
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--guidance-scale" in capsys.readouterr().out

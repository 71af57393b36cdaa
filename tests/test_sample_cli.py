"""ldm-sample end to end on a tiny saved model folder, in-process."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from ldm.cli.sample import main
from ldm.pipeline import LatentDiffusionPipeline

STEPS = ["--steps", "2"]


def sample(model, prompts, outdir, *extra):
    return main(["--model", str(model), "--prompts", str(prompts), "--outdir", str(outdir), "--device", "cpu", *STEPS, *extra])


def manifest(outdir):
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(PIL.Image.open(path))


def test_images_manifest_and_rerun_skips(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# skip me\na blue square\n")
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, "--seed", "40") == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00001-s0000000041.png", "00003-s0000000043.png"]  # seed = --seed + line number
    records = manifest(out)
    assert [(r["file"], r["line"], r["prompt"], r["seed"], r["steps"], r["guidance_scale"]) for r in records] == [
        ("00001-s0000000041.png", 1, "a red circle", 41, 2, 7.5),
        ("00003-s0000000043.png", 3, "a blue square", 43, 2, 7.5),
    ]
    assert pixels(out / files[0]).shape == (16, 16, 3)
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind

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
    ]) + "\n")
    assert sample(tiny_model_dir, one, tmp_path / "b1", "--batch-size", "1") == 0
    assert sample(tiny_model_dir, many, tmp_path / "b4", "--batch-size", "4") == 0
    name = "00001-s0000000001.png"
    # Batched kernels may round differently from single ones: allow one level in 255.
    diff = np.abs(pixels(tmp_path / "b1" / name).astype(int) - pixels(tmp_path / "b4" / name))
    assert diff.max() <= 1
    assert (tmp_path / "b4" / "00003-s0000000005.png").is_file()  # a .jsonl seed is kept as given

    # And it is what the Python API gives for that prompt and seed.
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "b1" / name), np.asarray(expected))


def test_several_images_per_prompt(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, "--num-images-per-prompt", "2", "--guidance-scale", "1") == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00001-s0000000001-00.png", "00001-s0000000001-01.png"]
    assert not np.array_equal(pixels(out / "00001-s0000000001-00.png"), pixels(out / "00001-s0000000001-01.png"))


@pytest.mark.parametrize("case, words", [
    ("missing-prompts", "prompt file not found"),
    ("bad-jsonl", "line 2: unknown key 'sed'"),
    ("missing-model", "no model folder"),
    ("bad-size", "multiples of 2"),
    ("bad-batch", "--batch-size must be at least 1"),
])
def test_errors_print_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, case, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "sed": 1}\n' if case == "bad-jsonl" else '{"prompt": "a"}\n')
    model, extra = tiny_model_dir, []
    if case == "missing-prompts":
        prompts = tmp_path / "nope.txt"
    if case == "missing-model":
        model = tmp_path / "no-model"
    if case == "bad-size":
        extra = ["--height", "15"]
    if case == "bad-batch":
        extra = ["--batch-size", "0"]
    assert sample(model, prompts, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--guidance-scale" in capsys.readouterr().out

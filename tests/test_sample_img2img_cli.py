"""ldm-sample .jsonl lines with init_image / mask_image / strength: the pipelines' images, checked lines, one-line errors."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from ldm import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
from ldm.cli.sample import main


def write_images(folder):
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "start.png")
    PIL.Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "big.png")
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    PIL.Image.fromarray(m).save(folder / "mask.png")
    PIL.Image.fromarray(np.zeros((24, 24), np.uint8)).save(folder / "mask24.png")


def jsonl(path, *lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def sample(model, prompts, out, *extra):
    return main(["--model", str(model), "--prompts", str(prompts), "--outdir", str(out), "--device", "cpu",
                 "--steps", "4", *extra])


def test_img2img_and_inpaint_lines_give_the_pipelines_images(tiny_model_dir, tmp_path):
    write_images(tmp_path)
    prompts = jsonl(tmp_path / "p.jsonl",
                    {"prompt": "a red circle", "init_image": "start.png", "strength": 0.5, "seed": 3},
                    {"prompt": "a blue square", "init_image": "start.png", "mask_image": "mask.png", "seed": 4},
                    {"prompt": "a green triangle", "init_image": "big.png", "seed": 5},
                    {"prompt": "a cyan circle", "seed": 6})
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, "--batch-size", "2") == 0
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == ["00001-s0000000003.png", "00002-s0000000004.png", "00003-s0000000005.png", "00004-s0000000006.png"]
    records = {r["line"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert records[1]["strength"] == 0.5 and records[2]["mask_image"].endswith("mask.png") and records[2]["strength"] == 1.0
    assert records[3]["strength"] == 0.8 and "init_image" not in records[4]
    assert PIL.Image.open(out / files[2]).size == (24, 24)  # img2img keeps its image's size

    start = PIL.Image.open(tmp_path / "start.png").convert("RGB")
    img2img = LatentDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir)
    inpaint = LatentDiffusionInpaintPipeline.from_pretrained(tiny_model_dir)
    for pipe in (img2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    expected = img2img(["a red circle"], image=[start], strength=0.5, num_inference_steps=4, negative_prompt=[""],
                       generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out / files[0])), np.asarray(expected))
    expected = inpaint(["a blue square"], image=[start], mask_image=[PIL.Image.open(tmp_path / "mask.png").convert("L")],
                       num_inference_steps=4, negative_prompt=[""], generator=[torch.Generator().manual_seed(4)],
                       height=16, width=16).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out / files[1])), np.asarray(expected))


@pytest.mark.parametrize("line, words", [
    ({"prompt": "x", "init_image": "start.png", "strength": 0}, r"line 1: strength must be in \(0, 1\]"),
    ({"prompt": "x", "init_image": "start.png", "strength": 1.5}, r"line 1: strength must be in \(0, 1\]"),
    ({"prompt": "x", "mask_image": "mask.png"}, "line 1: 'mask_image' needs \"init_image\""),
    ({"prompt": "x", "init_image": "start.png", "mask_image": "mask24.png"}, "line 1: mask_image .*mask24.png is 24x24 but init_image is 16x16"),
    ({"prompt": "x", "init_image": "nowhere.png"}, "line 1: init_image not found"),
])
def test_bad_lines_are_one_line_errors_before_any_image(tiny_model_dir, tmp_path, capsys, line, words):
    import re

    write_images(tmp_path)
    prompts = jsonl(tmp_path / "p.jsonl", line)
    assert sample(tiny_model_dir, prompts, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(words, err[0]), err
    assert not (tmp_path / "out").exists()

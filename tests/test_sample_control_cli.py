"""ldm-sample with --controlnet / --adapter: each .jsonl line's control image, in-process on tiny saved folders."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter

from ldm.cli.sample import main
from ldm.pipeline import LatentDiffusionPipeline

STEPS = ["--steps", "2"]


def sample(model, prompts, outdir, *extra):
    return main(["--model", str(model), "--prompts", str(prompts), "--outdir", str(outdir), "--device", "cpu", *STEPS, *extra])


def manifest(outdir):
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(PIL.Image.open(path))


def perturbed(model, seed):
    """Random non-zero weights (a fresh ControlNet's zero-convs would make it a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory, tiny_unet):
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"controlnet{seed}")
        perturbed(ControlNetModel.from_unet(tiny_unet, conditioning_embedding_out_channels=(16, 32)), seed).save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("adapter")
    T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2).save_pretrained(folder)
    return folder


def write_image(path, seed, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    PIL.Image.fromarray(array).save(path)
    return path


def write_jsonl(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def api_image(model, prompt, seed, image, **kwargs):
    """What the Python API gives for that prompt, seed and control image."""
    pipe = LatentDiffusionPipeline.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(prompt, image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0])


def test_controlnet_lines_use_their_control_images(tiny_model_dir, controlnet_dirs, tmp_path):
    write_image(tmp_path / "edges" / "a.png", 1)
    write_image(tmp_path / "edges" / "b.png", 2)
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a red circle", "image": "edges/a.png"},
        {"prompt": "a blue square", "image": "edges/b.png", "controlnet_conditioning_scale": 0.5},
    ])
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, "--controlnet", str(controlnet_dirs[0])) == 0
    records = manifest(out)
    assert [(r["line"], r["control_image"], r["controlnet_conditioning_scale"]) for r in records] == [
        (1, str(tmp_path / "edges" / "a.png"), 1.0), (2, str(tmp_path / "edges" / "b.png"), 0.5)]
    assert records[0]["controlnet"] == [str(controlnet_dirs[0])]
    assert json.loads(PIL.Image.open(out / records[1]["file"]).text["parameters"])["control_image"] == str(tmp_path / "edges" / "b.png")
    # Each is what the Python API gives for its line's prompt, seed, control image and scale.
    controlnet = ControlNetModel.from_pretrained(controlnet_dirs[0])
    expected = api_image(tiny_model_dir, "a red circle", 1, PIL.Image.open(tmp_path / "edges" / "a.png").convert("RGB"),
                         controlnet=controlnet)
    np.testing.assert_array_equal(pixels(out / records[0]["file"]), expected)
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_model_dir, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    second = pipe("a blue square", image=PIL.Image.open(tmp_path / "edges" / "b.png").convert("RGB"), num_inference_steps=2,
                  controlnet_conditioning_scale=0.5, generator=torch.Generator().manual_seed(2)).images[0]
    np.testing.assert_array_equal(pixels(out / records[1]["file"]), np.asarray(second))
    # And the control image mattered: without it the same line gives another image.
    plain = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    plain.set_progress_bar_config(disable=True)
    alone = np.asarray(plain("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0])
    assert np.abs(alone.astype(int) - expected).max() > 2


def test_two_controlnets_and_an_adapter(tiny_model_dir, controlnet_dirs, adapter_dir, tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle", "image": ["a.png", "b.png"],
                                                  "controlnet_conditioning_scale": [0.5, 1.5]}])
    out = tmp_path / "multi"
    assert sample(tiny_model_dir, prompts, out, "--controlnet", str(controlnet_dirs[0]), "--controlnet", str(controlnet_dirs[1])) == 0
    (record,) = manifest(out)
    assert record["control_image"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert record["controlnet_conditioning_scale"] == [0.5, 1.5]

    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a red circle", "image": "a.png"}])
    out = tmp_path / "adapter"
    assert sample(tiny_model_dir, prompts, out, "--adapter", str(adapter_dir)) == 0
    (record,) = manifest(out)
    expected = api_image(tiny_model_dir, "a red circle", 1, PIL.Image.open(tmp_path / "a.png").convert("RGB"),
                         adapter=T2IAdapter.from_pretrained(adapter_dir))
    np.testing.assert_array_equal(pixels(out / record["file"]), expected)


ERROR_CASES = {
    # case: (prompt file name, its lines, flags ("CN", "CN2", "AD" stand for the folders), words of the one-line error)
    "txt-file": ("p.txt", "a red circle\n", ["--controlnet", "CN"], "p.txt, line 1: no control image for the ControlNet; a .txt"),
    "line-without-image": ("p.jsonl", [{"prompt": "a", "image": "a.png"}, {"prompt": "b"}], ["--controlnet", "CN"],
                           "p.jsonl, line 2: no control image for the ControlNet"),
    "missing-image": ("p.jsonl", [{"prompt": "a", "image": "a.png"}, {"prompt": "b", "image": "nope.png"}],
                      ["--adapter", "AD"], "line 2: control image not found"),
    "wrong-size": ("p.jsonl", [{"prompt": "a", "image": "big.png"}], ["--controlnet", "CN"],
                   "line 1: control image BIG is 32x32 (height x width) but the images are 16x16"),
    "image-without-control": ("p.jsonl", [{"prompt": "a", "image": "a.png"}], [],
                              "line 1 sets \"image\" but no --controlnet or --adapter was given"),
    "one-image-two-controlnets": ("p.jsonl", [{"prompt": "a", "image": "a.png"}], ["--controlnet", "CN", "--controlnet", "CN2"],
                                  "line 1: 1 control images for 2 ControlNets"),
    "scales": ("p.jsonl", [{"prompt": "a", "image": ["a.png", "a.png"], "controlnet_conditioning_scale": [1, 2, 3]}],
               ["--controlnet", "CN", "--controlnet", "CN2"], "controlnet_conditioning_scale has 3 values for 2 ControlNets"),
    "wrong-scale-kind": ("p.jsonl", [{"prompt": "a", "image": "a.png", "adapter_conditioning_scale": 2}],
                         ["--controlnet", "CN"], "sets adapter_conditioning_scale but no --adapter was given"),
    "both-kinds": ("p.jsonl", [{"prompt": "a", "image": "a.png"}], ["--controlnet", "CN", "--adapter", "AD"], "not both"),
    "no-folder": ("p.jsonl", [{"prompt": "a", "image": "a.png"}], ["--controlnet", "NOWHERE"], "no such folder"),
    "another-base": ("p.jsonl", [{"prompt": "a", "image": "a.png"}], ["--controlnet", "CN8"],
                     "downsamples its control image 8x"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_errors_name_the_line_before_any_image(tiny_model_dir, tiny_unet, controlnet_dirs, adapter_dir, tmp_path, capsys, case):
    name, lines, flags, words = ERROR_CASES[case]
    write_image(tmp_path / "a.png", 1)
    big = write_image(tmp_path / "big.png", 2, size=32)
    prompts = tmp_path / name
    prompts.write_text(lines) if isinstance(lines, str) else write_jsonl(prompts, lines)
    folders = {"CN": controlnet_dirs[0], "CN2": controlnet_dirs[1], "AD": adapter_dir, "NOWHERE": tmp_path / "nowhere"}
    if "CN8" in flags:  # a ControlNet for a VAE of factor 8
        folders["CN8"] = tmp_path / "cn8"
        ControlNetModel.from_unet(tiny_unet).save_pretrained(folders["CN8"])
    out = tmp_path / "out"
    assert sample(tiny_model_dir, prompts, out, *[str(folders.get(f, f)) for f in flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words.replace("BIG", str(big)) in err and "\n" not in err
    assert not list(out.glob("*.png"))


def test_prompt_file_control_fields(tmp_path):
    from ldm.errors import LdmError
    from ldm.prompts import read_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    prompts = write_jsonl(folder / "p.jsonl", [
        {"prompt": "a", "image": "edges/a.png", "controlnet_conditioning_scale": 0.5},
        {"prompt": "b", "image": [str(tmp_path / "abs.png"), "b.png"], "adapter_conditioning_scale": [1, 0.5]},
        {"prompt": "c"},
    ])
    a, b, c = read_prompts(prompts)
    assert (a.image, a.controlnet_conditioning_scale) == ([str(folder / "edges" / "a.png")], 0.5)
    assert (b.image, b.adapter_conditioning_scale) == ([str(tmp_path / "abs.png"), str(folder / "b.png")], [1, 0.5])
    assert c.image is None
    for line, words in [({"prompt": "a", "image": 3}, "'image' must be a path or a list of paths"),
                        ({"prompt": "a", "image": []}, "'image' must be a non-empty list of paths"),
                        ({"prompt": "a", "image": ""}, "'image' is empty"),
                        ({"prompt": "a", "controlnet_conditioning_scale": [1, "x"]}, "'controlnet_conditioning_scale' must be a non-empty list of numbers")]:
        write_jsonl(folder / "bad.jsonl", [{"prompt": "ok"}, line])
        with pytest.raises(LdmError, match="line 2: " + words):
            read_prompts(folder / "bad.jsonl")

"""LatentDiffusionPipeline: parity with diffusers' StableDiffusionPipeline, saving/loading, inputs."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from ldm.errors import LdmError
from ldm.pipeline import LatentDiffusionPipeline, unscale_latents
from ldm.text_encoder import OpenCLIPTextModel

STEPS = 2
PROMPT = "a red circle"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def stable_diffusion(parts):
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(parts):
    pipe = LatentDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "generator": gen(0), "output_type": "np", **kwargs}
    return pipe(**kwargs).images


PARITY_CASES = {
    "cfg": {},
    "eta": dict(eta=0.5),
    "no-cfg": dict(guidance_scale=1.0),
    "negative": dict(negative_prompt="a blue square"),
    "2x2": dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, negative_prompt=["green", "cyan"]),
    "latents": dict(latents=torch.randn((1, 4, 8, 8), generator=gen(7))),
    "rescale": dict(guidance_rescale=0.7),
    "euler": dict(scheduler=EulerDiscreteScheduler),  # init_noise_sigma != 1, scaled model input
}


@pytest.mark.parametrize("case", PARITY_CASES, ids=list(PARITY_CASES))
def test_same_images_as_stable_diffusion(hf_parts, case):
    kwargs = dict(PARITY_CASES[case])
    scheduler_cls = kwargs.pop("scheduler", None)
    if scheduler_cls:
        hf_parts["scheduler"] = scheduler_cls.from_config(hf_parts["scheduler"].config)
    expected = run(stable_diffusion(hf_parts), **kwargs)
    got = run(ours(hf_parts), **kwargs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


def test_output_types(tiny_pipe):
    assert isinstance(tiny_pipe.text_encoder, OpenCLIPTextModel)
    latents = run(tiny_pipe, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)  # default size: unet sample_size 8 x VAE factor 2 = 16 px
    pt = run(tiny_pipe, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 16, 16)
    array = run(tiny_pipe, output_type="np")
    assert isinstance(array, np.ndarray) and array.shape == (1, 16, 16, 3)
    assert 0.0 <= array.min() and array.max() <= 1.0
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    pil = run(tiny_pipe, output_type="pil")
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    # The decode divides by the VAE's own scaling factor (0.5 here), not a constant.
    with torch.no_grad():
        decoded = tiny_pipe.vae.decode(latents / tiny_pipe.vae.config.scaling_factor).sample
    np.testing.assert_allclose(pt.numpy(), (decoded / 2 + 0.5).clamp(0, 1).numpy(), atol=1e-6)


def test_height_and_width(tiny_pipe):
    assert run(tiny_pipe, height=24, width=32, output_type="latent").shape == (1, 4, 12, 16)


def test_unscale_latents_reads_the_vae_config():
    z = torch.ones(1, 2, 1, 1)
    sd3 = SimpleNamespace(config=SimpleNamespace(scaling_factor=2.0, shift_factor=0.25))
    assert torch.allclose(unscale_latents(sd3, z), torch.full_like(z, 0.75))
    sdxl = SimpleNamespace(config=SimpleNamespace(scaling_factor=2.0, latents_mean=[1.0, 2.0], latents_std=[4.0, 6.0]))
    assert unscale_latents(sdxl, z).flatten().tolist() == [3.0, 5.0]


def test_save_and_load_give_the_same_images(tiny_pipe, tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["text_encoder"] == ["ldm.text_encoder", "OpenCLIPTextModel"]
    loaded = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)  # ldm_config.yaml is there too
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, OpenCLIPTextModel)
    np.testing.assert_array_equal(run(loaded), run(tiny_pipe))


def test_loads_a_plain_stable_diffusion_folder(hf_parts, tmp_path):
    sd = stable_diffusion(hf_parts)
    sd.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # Components our pipeline does not take may be listed, null, or absent.
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.pop("image_encoder")
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]  # listed, no folder
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert np.abs(run(pipe) - run(sd)).max() <= 1e-5


def test_swapped_scheduler_runs(tiny_pipe):
    tiny_pipe.scheduler = DPMSolverMultistepScheduler.from_config(tiny_pipe.scheduler.config)
    images = run(tiny_pipe, num_inference_steps=3)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_any_words_tokenize(tiny_pipe):
    prompts = ["a cat in a space suit", "zxqvv ünïcödé 猫 🚀 <|endoftext|>", "", "red " * 100]
    assert run(tiny_pipe, prompt=prompts, output_type="latent").shape == (4, 4, 8, 8)


def test_max_batch_size_gives_the_same_images(tiny_pipe):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    whole = run(tiny_pipe, prompt=prompts)
    split = run(tiny_pipe, prompt=prompts, max_batch_size=2)  # the CFG batch of 6 in 3 U-Net calls
    assert np.abs(split - whole).max() <= 1e-5


def test_callback_on_step_end(tiny_pipe):
    steps = []

    def callback(pipe, step, timestep, kwargs):
        steps.append(step)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    latents = run(tiny_pipe, callback_on_step_end=callback, output_type="latent")
    assert steps == list(range(STEPS)) and not latents.any()


@pytest.mark.parametrize("kwargs, words", [
    (dict(height=15), "multiples of 2"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "1 negative prompts for 2 prompts"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents have shape"),
    (dict(prompt=[]), "non-empty"),
    (dict(generator=[gen(0), gen(1)]), "2 generators for 1 images"),
])
def test_bad_inputs_raise_one_line(tiny_pipe, kwargs, words):
    with pytest.raises(LdmError, match=words) as e:
        run(tiny_pipe, **kwargs)
    assert "\n" not in str(e.value)


def test_missing_part_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(LdmError, match="'unet'"):
        LatentDiffusionPipeline.from_pretrained(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(LdmError, match="model_index.json"):
        LatentDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(LdmError, match="no model folder"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nowhere")

"""img2img and inpainting: the same images as diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

from ldm import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline, LatentDiffusionPipeline
from ldm.errors import LdmError

PROMPT = "a red circle"
SIZE = 16


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def picture(seed=0, size=SIZE):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask(size=SIZE, box=(4, 4, 12, 12)):
    m = np.zeros((size, size), np.uint8)
    m[box[1] : box[3], box[0] : box[2]] = 255
    return PIL.Image.fromarray(m)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipe(cls, parts):
    return quiet(cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def inputs(**kwargs):
    out = {"prompt": PROMPT, "num_inference_steps": 4, "output_type": "np", **kwargs}
    out["generator"] = out["generator"]() if callable(out.get("generator")) else out.get("generator", gen(0))
    return out


IMG2IMG_CASES = {
    "default": {},
    "strength-0.5": dict(strength=0.5),
    "strength-1": dict(strength=1.0),
    "eta": dict(eta=0.7, strength=0.6),
    "no-cfg": dict(guidance_scale=1.0),
    "2-prompts-2-images": dict(prompt=["a red circle", "a blue square"], image=[picture(1), picture(2)],
                               negative_prompt=["green", "cyan"]),
    "one-image-2-per-prompt": dict(num_images_per_prompt=2),
    "generators": dict(prompt=["a red circle", "a blue square"], generator=lambda: [gen(3), gen(4)], eta=0.5),
    "euler": dict(scheduler=EulerDiscreteScheduler, strength=0.7),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES, ids=list(IMG2IMG_CASES))
def test_img2img_same_images_as_diffusers(hf_parts, case):
    kwargs = {"image": picture(0), **IMG2IMG_CASES[case]}
    scheduler = kwargs.pop("scheduler", None)
    if scheduler:
        hf_parts["scheduler"] = scheduler.from_config(hf_parts["scheduler"].config)
    expected = diffusers_pipe(StableDiffusionImg2ImgPipeline, hf_parts)(**inputs(**kwargs)).images
    got = quiet(LatentDiffusionImg2ImgPipeline(**hf_parts))(**inputs(**kwargs)).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


def test_img2img_keeps_the_image_at_low_strength_and_the_size_of_the_image(hf_parts):
    pipe = quiet(LatentDiffusionImg2ImgPipeline(**hf_parts))
    start = np.asarray(picture(0), dtype=np.float32) / 255
    near = pipe(**inputs(image=picture(0), strength=0.25, num_inference_steps=4)).images[0]
    far = pipe(**inputs(image=picture(0), strength=1.0, num_inference_steps=4)).images[0]
    assert np.abs(near - start).mean() < np.abs(far - start).mean()
    assert pipe(**inputs(image=picture(0, size=24))).images.shape == (1, 24, 24, 3)


INPAINT_CASES = {
    "default": {},
    "strength-0.6": dict(strength=0.6),
    "eta": dict(eta=0.7),
    "no-cfg": dict(guidance_scale=1.0),
    "negative": dict(negative_prompt="a blue square"),
    "2-prompts": dict(prompt=["a red circle", "a blue square"], generator=lambda: [gen(3), gen(4)], eta=0.3),
    "2-per-prompt": dict(num_images_per_prompt=2),
    "latents": dict(latents=torch.randn((1, 4, 8, 8), generator=gen(9))),
    "euler": dict(scheduler=EulerDiscreteScheduler, strength=0.8),
}


@pytest.mark.parametrize("case", INPAINT_CASES, ids=list(INPAINT_CASES))
def test_inpaint_same_images_as_diffusers(hf_parts, case):
    kwargs = {"image": picture(0), "mask_image": mask(), **INPAINT_CASES[case]}
    scheduler = kwargs.pop("scheduler", None)
    if scheduler:
        hf_parts["scheduler"] = scheduler.from_config(hf_parts["scheduler"].config)
    expected = diffusers_pipe(StableDiffusionInpaintPipeline, hf_parts)(**inputs(**kwargs)).images
    got = quiet(LatentDiffusionInpaintPipeline(**hf_parts))(**inputs(**kwargs)).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


def test_inpaint_keeps_the_known_latents(hf_parts):
    """Outside the mask the final latents are the image's own (the last blend puts them back un-noised)."""
    pipe = quiet(LatentDiffusionInpaintPipeline(**hf_parts))
    seen = {}

    def grab(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    latents = pipe(**inputs(image=picture(0), mask_image=mask(), output_type="latent", callback_on_step_end=grab)).images
    known = (torch.from_numpy(np.asarray(mask().resize((8, 8), PIL.Image.NEAREST))) < 128)
    outside = latents[0][:, known]
    img2img = quiet(LatentDiffusionImg2ImgPipeline(**hf_parts))
    pixels = img2img.image_processor.preprocess(picture(0))
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    z = retrieve_latents(pipe.vae.encode(pixels), generator=gen(0)) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(outside, z[0][:, known], rtol=0, atol=1e-6)
    assert not torch.allclose(latents[0][:, ~known], z[0][:, ~known], atol=1e-2)  # the masked part was made anew


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_strength_outside_0_1_is_a_one_line_error(hf_parts, strength):
    for pipe, extra in ((LatentDiffusionImg2ImgPipeline, {}), (LatentDiffusionInpaintPipeline, {"mask_image": mask()})):
        with pytest.raises(LdmError, match=r"strength must be in \(0, 1\]") as e:
            quiet(pipe(**hf_parts))(**inputs(image=picture(0), strength=strength, **extra))
        assert "\n" not in str(e.value)


def test_a_mask_of_the_wrong_size_is_a_one_line_error(hf_parts):
    with pytest.raises(LdmError, match="mask_image 0 is 24x24 .* but its image is 16x16") as e:
        quiet(LatentDiffusionInpaintPipeline(**hf_parts))(**inputs(image=picture(0), mask_image=mask(size=24)))
    assert "\n" not in str(e.value)


def test_no_step_left_is_a_one_line_error(hf_parts):
    with pytest.raises(LdmError, match="leaves no step"):
        quiet(LatentDiffusionImg2ImgPipeline(**hf_parts))(**inputs(image=picture(0), strength=0.1, num_inference_steps=4))


def test_from_a_model_folder_and_from_pipe(tiny_model_dir):
    base = quiet(LatentDiffusionPipeline.from_pretrained(tiny_model_dir))
    for cls, extra in ((LatentDiffusionImg2ImgPipeline, {}), (LatentDiffusionInpaintPipeline, {"mask_image": mask()})):
        loaded = quiet(cls.from_pretrained(tiny_model_dir))
        shared = quiet(cls.from_pipe(base))
        assert type(loaded) is cls and type(shared) is cls and shared.unet is base.unet
        a = loaded(**inputs(image=picture(0), **extra)).images
        b = shared(**inputs(image=picture(0), **extra)).images
        assert np.array_equal(a, b)

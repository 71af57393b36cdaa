"""LatentDiffusionPipeline with a ControlNet or T2I-Adapter: parity with diffusers' control pipelines, loading, inputs."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    ControlNetModel, EulerDiscreteScheduler, MultiAdapter, StableDiffusionAdapterPipeline, StableDiffusionControlNetPipeline, T2IAdapter,
    UNet2DConditionModel,
)

from ldm.errors import LdmError
from ldm.pipeline import LatentDiffusionPipeline

STEPS = 2
PROMPT = "a red circle"
SIZE = 16  # pixels: the tiny U-Net's 8x8 latents at the tiny VAE's factor 2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturb(model, seed):
    """Random non-zero weights everywhere: zero-initialised zero-convs would make a ControlNet a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_controlnet(unet, seed=1):
    torch.manual_seed(seed)
    # Two conditioning-embedding stages: the control image is brought down 2x, the tiny VAE's factor.
    return perturb(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)), seed)


def tiny_adapter(channels=(32, 64), adapter_type="full_adapter", seed=3):
    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=list(channels), num_res_blocks=1, downscale_factor=2,
                      adapter_type=adapter_type).eval()


def control_image(seed=0, size=SIZE, kind="pil"):
    array = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)
    if kind == "np":
        return array
    if kind == "pt":
        return torch.from_numpy(array).permute(2, 0, 1)
    return PIL.Image.fromarray((array * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def controlnet(tiny_unet):
    return tiny_controlnet(tiny_unet, seed=1)


@pytest.fixture(scope="module")
def controlnet2(tiny_unet):
    return tiny_controlnet(tiny_unet, seed=2)


@pytest.fixture(scope="module")
def unet_32_32():
    """A U-Net whose down blocks both have 32 channels: what a light adapter with channels [32] feeds."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "generator": gen(0), "output_type": "np", **kwargs}
    return pipe(**kwargs).images


CONTROLNET_CASES = {
    "pil": dict(image=control_image()),
    "numpy": dict(image=control_image(kind="np")[None]),  # NHWC: diffusers reads a lone HWC array as H images
    "tensor": dict(image=control_image(kind="pt")[None]),
    "scale": dict(image=control_image(), controlnet_conditioning_scale=0.5),
    # 4 steps: on at steps 1 and 2 only (i/n >= 0.25 and (i+1)/n <= 0.75).
    "window": dict(image=control_image(), control_guidance_start=0.25, control_guidance_end=0.75, num_inference_steps=4),
    "guess-mode": dict(image=control_image(), guess_mode=True),
    "no-cfg": dict(image=control_image(), guidance_scale=1.0),
    "one-image-for-all": dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, image=control_image()),
    "one-image-per-prompt": dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2,
                                 image=[control_image(1), control_image(2)]),
    "eta": dict(image=control_image(), eta=0.5),
    # Euler scales the model input per step: guess mode's conditional half must be scaled alike.
    "euler-guess-mode": dict(image=control_image(), guess_mode=True, scheduler=EulerDiscreteScheduler),
}


@pytest.mark.parametrize("case", CONTROLNET_CASES, ids=list(CONTROLNET_CASES))
def test_same_images_as_diffusers_controlnet_pipeline(hf_parts, controlnet, case):
    kwargs = dict(CONTROLNET_CASES[case])
    scheduler_cls = kwargs.pop("scheduler", None)
    if scheduler_cls:
        hf_parts["scheduler"] = scheduler_cls.from_config(hf_parts["scheduler"].config)
    expected = run(quiet(StableDiffusionControlNetPipeline(
        **hf_parts, controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False)), **kwargs)
    got = run(quiet(LatentDiffusionPipeline(**hf_parts, controlnet=controlnet)), **kwargs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


def test_multi_controlnet_same_images_as_diffusers(hf_parts, controlnet, controlnet2):
    # A nested list (as diffusers reads it): per prompt, one image per ControlNet.
    kwargs = dict(
        prompt=["a red circle", "a blue square"], image=[[control_image(1), control_image(2)], [control_image(3), control_image(4)]],
        controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0],
        num_inference_steps=4,
    )
    expected = run(quiet(StableDiffusionControlNetPipeline(
        **hf_parts, controlnet=[controlnet, controlnet2], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)), **kwargs)
    ours = quiet(LatentDiffusionPipeline(**hf_parts, controlnet=[controlnet, controlnet2]))
    got = run(ours, **kwargs)
    assert np.abs(got - expected).max() <= 1e-5
    # Each ControlNet counts: the second one at scale 0 changes the images.
    alone = run(ours, **{**kwargs, "controlnet_conditioning_scale": [0.7, 0.0]})
    assert np.abs(alone - got).max() > 1e-3
    # A flat list: one image per ControlNet, for all prompts.
    flat = dict(prompt=["a red circle", "a blue square"], image=[control_image(1), control_image(2)])
    expected = run(quiet(StableDiffusionControlNetPipeline(
        **hf_parts, controlnet=[controlnet, controlnet2], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)), **flat)
    assert np.abs(run(ours, **flat) - expected).max() <= 1e-5


def test_control_changes_the_images_and_a_zero_scale_does_not(hf_parts, controlnet):
    plain = run(quiet(LatentDiffusionPipeline(**hf_parts)))
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, controlnet=controlnet))
    assert np.abs(run(pipe, image=control_image()) - plain).max() > 1e-2  # the parity tests are not vacuous
    assert np.abs(run(pipe, image=control_image(), controlnet_conditioning_scale=0.0) - plain).max() <= 1e-6


def test_window_switches_the_controlnet_off_outside_it(hf_parts, controlnet):
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, controlnet=controlnet))
    sizes = []
    handle = controlnet.register_forward_hook(lambda m, args, kwargs_, out: sizes.append(kwargs_["conditioning_scale"]),
                                              with_kwargs=True)
    try:
        run(pipe, image=control_image(), controlnet_conditioning_scale=0.5, control_guidance_start=0.25,
            control_guidance_end=0.75, num_inference_steps=4)
    finally:
        handle.remove()
    assert sizes == [0.0, 0.5, 0.5, 0.0]


def test_max_batch_size_with_control_gives_the_same_images(hf_parts, controlnet):
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, controlnet=controlnet))
    kwargs = dict(prompt=["a red circle", "a blue square", "a green triangle"], image=control_image())
    assert np.abs(run(pipe, max_batch_size=2, **kwargs) - run(pipe, **kwargs)).max() <= 1e-5


ADAPTER_CASES = {
    "pil": dict(image=control_image()),
    "tensor": dict(image=control_image(kind="pt")[None]),
    "scale": dict(image=control_image(), adapter_conditioning_scale=0.5),
    "no-cfg": dict(image=control_image(), guidance_scale=1.0),
    "one-image-per-prompt": dict(prompt=["a red circle", "a blue square"], image=[control_image(1), control_image(2)]),
    "one-prompt-two-images": dict(num_images_per_prompt=2, image=control_image()),
}


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=list(ADAPTER_CASES))
def test_same_images_as_diffusers_adapter_pipeline(hf_parts, case):
    adapter = tiny_adapter()
    kwargs = ADAPTER_CASES[case]
    expected = run(quiet(StableDiffusionAdapterPipeline(
        **hf_parts, adapter=adapter, safety_checker=None, feature_extractor=None, requires_safety_checker=False)), **kwargs)
    got = run(quiet(LatentDiffusionPipeline(**hf_parts, adapter=adapter)), **kwargs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(got - run(quiet(LatentDiffusionPipeline(**hf_parts)), **{k: v for k, v in kwargs.items() if k != "image"})).max() > 1e-3


def test_light_adapter_same_images_as_diffusers(hf_parts, unet_32_32):
    parts = {**hf_parts, "unet": unet_32_32}
    adapter = tiny_adapter(channels=(32,), adapter_type="light_adapter")
    expected = run(quiet(StableDiffusionAdapterPipeline(
        **parts, adapter=adapter, safety_checker=None, feature_extractor=None, requires_safety_checker=False)), image=control_image())
    got = run(quiet(LatentDiffusionPipeline(**parts, adapter=adapter)), image=control_image())
    assert np.abs(got - expected).max() <= 1e-5


def test_multi_adapter_same_images_as_diffusers(hf_parts):
    pair = [tiny_adapter(seed=3), tiny_adapter(seed=4)]
    kwargs = dict(image=[control_image(1), control_image(2)], adapter_conditioning_scale=[0.6, 0.9])
    expected = run(quiet(StableDiffusionAdapterPipeline(
        **hf_parts, adapter=MultiAdapter(pair), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)), **kwargs)
    got = run(quiet(LatentDiffusionPipeline(**hf_parts, adapter=pair)), **kwargs)
    assert np.abs(got - expected).max() <= 1e-5


def test_adapter_per_prompt_images_follow_their_prompts(hf_parts):
    """Two prompts x two images each, one control image per prompt: as the prompts sampled one by one.

    (diffusers' adapter pipeline tiles the features prompt-minor here, so it is not the reference.)
    """
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, adapter=tiny_adapter()))
    latents = torch.randn((4, 4, 8, 8), generator=gen(5))
    both = run(pipe, prompt=["a red circle", "a blue square"], num_images_per_prompt=2,
               image=[control_image(1), control_image(2)], latents=latents)
    first = run(pipe, prompt="a red circle", num_images_per_prompt=2, image=control_image(1), latents=latents[:2])
    second = run(pipe, prompt="a blue square", num_images_per_prompt=2, image=control_image(2), latents=latents[2:])
    assert np.abs(both - np.concatenate([first, second])).max() <= 1e-5


def test_adapter_conditioning_factor_limits_the_steps(hf_parts):
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, adapter=tiny_adapter()))
    plain = run(quiet(LatentDiffusionPipeline(**hf_parts)))
    full = run(pipe, image=control_image())
    assert np.array_equal(run(pipe, image=control_image(), adapter_conditioning_factor=0.0), plain)
    half = run(pipe, image=control_image(), adapter_conditioning_factor=0.5)  # the first of 2 steps only
    assert np.abs(half - full).max() > 1e-4 and np.abs(half - plain).max() > 1e-4


def test_one_image_in_any_form_is_one_image(hf_parts, controlnet):
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, controlnet=controlnet))
    batch = run(pipe, image=control_image(kind="np")[None])
    for one in (control_image(kind="np"), control_image(kind="pt"), [control_image(kind="pt")]):
        assert np.array_equal(run(pipe, image=one), batch)


def test_default_size_is_the_control_image_size(hf_parts, controlnet):
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, controlnet=controlnet))
    assert run(pipe, image=control_image(size=24), output_type="latent").shape == (1, 4, 12, 12)


def test_from_pretrained_with_a_controlnet_or_adapter(tiny_model_dir, tmp_path, tiny_unet):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    # Without control the folder is as before: no controlnet / adapter entries.
    assert set(index) == {"_class_name", "_diffusers_version", "vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    plain = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert plain.controlnet is None and plain.adapter is None
    plain.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert {k: v for k, v in resaved.items() if k != "_name_or_path"} == index

    cn = tiny_controlnet(tiny_unet)
    cn.save_pretrained(tmp_path / "controlnet")
    pipe = quiet(LatentDiffusionPipeline.from_pretrained(tiny_model_dir, controlnet=ControlNetModel.from_pretrained(tmp_path / "controlnet")))
    direct = quiet(LatentDiffusionPipeline(**{k: getattr(plain, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                           controlnet=cn))
    np.testing.assert_array_equal(run(pipe, image=control_image()), run(direct, image=control_image()))
    # Saved with its ControlNet, the folder loads it back by itself.
    pipe.save_pretrained(tmp_path / "with-controlnet")
    again = quiet(LatentDiffusionPipeline.from_pretrained(tmp_path / "with-controlnet"))
    assert isinstance(again.controlnet, ControlNetModel)
    np.testing.assert_array_equal(run(again, image=control_image()), run(direct, image=control_image()))

    adapter = tiny_adapter()
    adapter.save_pretrained(tmp_path / "adapter")
    with_adapter = LatentDiffusionPipeline.from_pretrained(tiny_model_dir, adapter=T2IAdapter.from_pretrained(tmp_path / "adapter"))
    assert isinstance(with_adapter.adapter, T2IAdapter) and with_adapter.controlnet is None


@pytest.mark.parametrize("make, words", [
    (lambda u: ControlNetModel.from_unet(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        conditioning_embedding_out_channels=(16, 32)),
     "ControlNet was made for another base model: its cross_attention_dim is 16 but the U-Net's cross_attention_dim is 32"),
    (lambda u: ControlNetModel(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               conditioning_embedding_out_channels=(16, 32)),
     r"its block_out_channels is \[32, 32\] but the U-Net's block_out_channels is \[32, 64\]"),
    (lambda u: ControlNetModel.from_unet(u), r"downsamples its control image 8x .* VAE's scale factor is 2"),
])
def test_a_controlnet_for_another_base_is_named_with_both_numbers(hf_parts, make, words):
    with pytest.raises(LdmError, match=words) as e:
        LatentDiffusionPipeline(**hf_parts, controlnet=make(hf_parts["unet"]))
    assert "\n" not in str(e.value)


def test_an_adapter_for_another_base_is_named_with_both_numbers(hf_parts):
    with pytest.raises(LdmError, match=r"features of \[32, 32\] channels .* block_out_channels are \[32, 64\]"):
        LatentDiffusionPipeline(**hf_parts, adapter=tiny_adapter(channels=(32, 32)))
    with pytest.raises(LdmError, match="downscale_factor is 8 but the VAE's scale factor is 2"):
        LatentDiffusionPipeline(**hf_parts, adapter=T2IAdapter(channels=[32, 64], num_res_blocks=1, downscale_factor=8))


@pytest.mark.parametrize("control, kwargs, words", [
    ("controlnet", dict(image=control_image(size=32), height=16, width=16),
     "control image 0 is 32x32 .height x width. but the images to make are 16x16: give control images of 16x16"),
    ("adapter", dict(image=[control_image(), control_image(size=24)], prompt=["a", "b"]),
     "control image 1 is 24x24 .* images to make are 16x16"),
    ("controlnet", dict(image=control_image(size=17)), "17x17, not multiples of 2"),
    (None, dict(image=control_image()), "no ControlNet or T2I-Adapter"),
    ("controlnet", dict(), "has a ControlNet but no image= was given"),
    ("adapter", dict(), "has a T2I-Adapter but no image= was given"),
    ("controlnet", dict(prompt=["a", "b"], image=[control_image()] * 3), "got 3 control images for 2 prompts"),
    ("multi", dict(image=[control_image()]), "got 1 image entries for 2 ControlNets"),
    ("multi", dict(image=[[control_image()] * 2, [control_image()]], prompt=["a", "b"]), "every inner list needs 2 images"),
    ("multi", dict(image=[control_image()] * 2, controlnet_conditioning_scale=[1.0, 1.0, 1.0]),
     "controlnet_conditioning_scale has 3 values for 2 ControlNets"),
    ("controlnet", dict(image=control_image(), control_guidance_start=0.8, control_guidance_end=0.2), "start < end"),
])
def test_bad_control_inputs_raise_one_line(hf_parts, controlnet, controlnet2, control, kwargs, words):
    models = {"controlnet": dict(controlnet=controlnet), "adapter": dict(adapter=tiny_adapter()),
              "multi": dict(controlnet=[controlnet, controlnet2]), None: {}}[control]
    pipe = quiet(LatentDiffusionPipeline(**hf_parts, **models))
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LdmError, match=words) as e:
            run(pipe, **kwargs)
    finally:
        handle.remove()
    assert "\n" not in str(e.value) and not calls  # before sampling starts

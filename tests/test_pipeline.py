"""LatentDiffusionPipeline: parity with diffusers' StableDiffusionPipeline, saving/loading, inputs."""

import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ldm.errors import LdmError
from ldm.model_parts import check_components, check_parts_agree
from ldm.pipeline import LatentDiffusionPipeline, unscale_latents
from ldm.text_encoder import OpenCLIPTextModel
from ldm.vae_decode import decode_latents

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
    if callable(kwargs["generator"]):  # fresh generators for each pipeline of a comparison
        kwargs["generator"] = kwargs["generator"]()
    return pipe(**kwargs).images


PARITY_CASES = {
    "cfg": {},
    "eta": dict(eta=0.5),
    "no-cfg": dict(guidance_scale=1.0),
    "negative": dict(negative_prompt="a blue square"),
    "2x2": dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, negative_prompt=["green", "cyan"]),
    "latents": dict(latents=torch.randn((1, 4, 8, 8), generator=gen(7))),
    # One generator per image, as ldm-sample passes them; eta > 0 draws DDIM's noise from them.
    "per-image-generators": dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, eta=0.5,
                                 generator=lambda: [gen(1), gen(2), gen(3), gen(4)]),
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


def count_calls(module, sizes):
    """Record the batch size of every call of `module` (remove the returned handle after)."""
    return module.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))


@pytest.mark.parametrize("guidance, unet_batch, text_calls", [(1.0, 1, 1), (7.5, 2, 2)])
def test_guidance_1_makes_no_unconditional_pass(tiny_pipe, guidance, unet_batch, text_calls):
    unet_sizes, text_sizes = [], []
    handles = [count_calls(tiny_pipe.unet, unet_sizes), count_calls(tiny_pipe.text_encoder, text_sizes)]
    try:
        run(tiny_pipe, guidance_scale=guidance, output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    assert unet_sizes == [unet_batch] * STEPS  # one U-Net call a step; the unconditional half only with guidance
    assert len(text_sizes) == text_calls  # no "" / negative prompt encoded at guidance 1


def fake_decode(vae, calls, first=None):
    """Replace `vae.decode`: record (VAE dtype, latent dtype) of each call; the first call returns `first` if given."""
    real = vae.decode

    def decode(z, return_dict=True):
        calls.append((vae.dtype, z.dtype))
        if first is not None and len(calls) == 1:
            return (first.to(z.dtype),)
        return real(z, return_dict=return_dict)

    return decode


def test_a_non_finite_half_precision_decode_is_redone_in_float32(open_clip_parts, monkeypatch):
    vae = copy.deepcopy(open_clip_parts["vae"]).to(torch.bfloat16)  # bf16 runs on CPU; fp16 overflows the same way
    pipe = ours({**open_clip_parts, "vae": vae})
    calls = []
    monkeypatch.setattr(vae, "decode", fake_decode(vae, calls, first=torch.full((1, 3, 16, 16), float("inf"))))
    with pytest.warns(UserWarning, match="decoding again in float32"):
        images = run(pipe)
    assert calls == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    assert np.isfinite(images).all() and 0.0 <= images.min() and images.max() <= 1.0
    assert vae.dtype == torch.bfloat16  # back in its own dtype (training shares it)


def test_fp16_vae_with_force_upcast_decodes_in_float32_once(tiny_vae, monkeypatch):
    vae = copy.deepcopy(tiny_vae).half()
    assert vae.config.force_upcast  # diffusers' default for AutoencoderKL
    calls = []
    monkeypatch.setattr(vae, "decode", fake_decode(vae, calls))
    assert torch.isfinite(decode_latents(vae, torch.randn(1, 4, 8, 8))).all()
    assert calls == [(torch.float32, torch.float32)] and vae.dtype == torch.float16


def test_a_float32_vae_is_never_decoded_twice(tiny_vae, monkeypatch):
    vae = copy.deepcopy(tiny_vae)
    calls = []
    monkeypatch.setattr(vae, "decode", fake_decode(vae, calls, first=torch.full((1, 3, 16, 16), float("nan"))))
    assert torch.isnan(decode_latents(vae, torch.randn(1, 4, 8, 8))).all()  # nothing better to retry in
    assert calls == [(torch.float32, torch.float32)]


def test_parts_that_do_not_fit_are_named_with_both_numbers(open_clip_parts):
    torch.manual_seed(0)
    unet16 = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32,
    )
    with pytest.raises(LdmError, match="text of width 16 .unet cross_attention_dim. but the text encoder gives width 32"):
        LatentDiffusionPipeline(**{**open_clip_parts, "unet": unet16})
    vae3 = SimpleNamespace(config={"latent_channels": 3})
    with pytest.raises(LdmError, match="U-Net has 4 channels .unet in_channels. but the VAE has 3"):
        check_components(vae=vae3, unet=open_clip_parts["unet"])
    # A U-Net with encoder_hid_dim projects the text itself: that is the width it reads.
    check_parts_agree(text_encoder={"hidden_size": 48}, unet={"cross_attention_dim": 32, "encoder_hid_dim": 48})
    with pytest.raises(LdmError, match=r"text of width \[32, 32\]"):
        check_parts_agree(text_encoder={"width": 64}, unet={"cross_attention_dim": [32, 32]})
    with pytest.raises(LdmError, match="tokenizer pads to 77 tokens .* at most 16"):
        check_parts_agree(text_encoder={"context_length": 16}, tokenizer_length=77)

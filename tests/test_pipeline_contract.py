"""diffusers' pipeline contract (tests/pipelines/test_pipelines_common.py, PipelineTesterMixin), ported.

The common tests that apply to a text-to-image pipeline, on our tiny components (see
conftest.py), plus parity with diffusers' StableDiffusionPipeline for the parts of its
call that this file adds: prompt_embeds, clip_skip, custom timesteps / sigmas, LoRA
scale, and a callback that switches guidance off mid-run.
"""

import contextlib
import copy
import inspect
import io

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback

from ldm.errors import LdmError
from ldm.pipeline import LatentDiffusionPipeline
from ldm.text_encoder import OpenCLIPTextModel

STEPS = 2
PROMPT = "a red circle"
# diffusers' tests/pipelines/pipeline_params.py: TEXT_TO_IMAGE_PARAMS, TEXT_TO_IMAGE_BATCH_PARAMS.
TEXT_TO_IMAGE_PARAMS = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
                        "negative_prompt_embeds", "cross_attention_kwargs"}
BATCH_PARAMS = {"prompt", "negative_prompt"}
REQUIRED_OPTIONAL_PARAMS = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                            "return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion(parts):
    return quiet(StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def dummy_inputs(**kwargs):
    return {"prompt": PROMPT, "num_inference_steps": STEPS, "generator": gen(0), "output_type": "np", **kwargs}


def assert_same(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= tol


@pytest.fixture
def pipe(open_clip_parts):
    return quiet(LatentDiffusionPipeline(**open_clip_parts))


# --------------------------------------------------------------------------- the call signature


def test_call_signature_has_diffusers_parameters_in_their_order():
    ours = list(inspect.signature(LatentDiffusionPipeline.__call__).parameters)[1:]
    theirs = [p for p in inspect.signature(StableDiffusionPipeline.__call__).parameters if p not in ("self", "kwargs")]
    shared = [p for p in theirs if p in ours]
    missing = set(theirs) - set(ours)
    assert missing == {"ip_adapter_image", "ip_adapter_image_embeds"}  # no image encoder in this family
    assert ours[: len(shared)] == shared  # diffusers' own arguments first, in its order; the control ones after
    optional = {k for k, v in inspect.signature(LatentDiffusionPipeline.__call__).parameters.items() if v.default is not inspect._empty}
    assert TEXT_TO_IMAGE_PARAMS <= set(ours) and REQUIRED_OPTIONAL_PARAMS <= optional
    assert LatentDiffusionPipeline._callback_tensor_inputs == StableDiffusionPipeline._callback_tensor_inputs


def test_components_function(open_clip_parts):
    pipe = LatentDiffusionPipeline(**open_clip_parts)
    assert set(pipe.components) == set(open_clip_parts) | {"controlnet", "adapter"}
    assert set(pipe._optional_components) == {"controlnet", "adapter"}


# --------------------------------------------------------------------------- prompts and embeddings


def test_prompt_embeds_give_the_same_images_as_stable_diffusion(hf_parts):
    sd = stable_diffusion(hf_parts)
    ours = quiet(LatentDiffusionPipeline(**hf_parts))
    embeds, negative = sd.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True, ["green", "cyan"])
    expected = sd(prompt_embeds=embeds, negative_prompt_embeds=negative, **dummy_inputs(prompt=None)).images
    got = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, **dummy_inputs(prompt=None)).images
    assert_same(got, expected)
    # and the same as from the prompts themselves
    from_prompts = ours(**dummy_inputs(prompt=["a red circle", "a blue square"], negative_prompt=["green", "cyan"])).images
    assert_same(got, from_prompts, 0.0)


def test_our_encode_prompt_matches_stable_diffusions(hf_parts):
    sd = stable_diffusion(hf_parts)
    ours = LatentDiffusionPipeline(**hf_parts)
    for args in [(PROMPT, "cpu", 2, True, "a blue square"), ([PROMPT, "x"], "cpu", 1, False, None)]:
        for a, b in zip(ours.encode_prompt(*args), sd.encode_prompt(*args)):
            assert (a is None and b is None) or torch.equal(a, b)
    # The older call (no guidance flag) still gives the prompts' embeddings alone.
    assert torch.equal(ours.encode_prompt([PROMPT], "cpu"), sd.encode_prompt(PROMPT, "cpu", 1, False)[0])


def test_encode_prompt_works_in_isolation(open_clip_parts):
    """diffusers' test_encode_prompt_works_in_isolation: text parts alone encode; the rest samples from the embeddings."""
    text_only = LatentDiffusionPipeline(**{k: v if "text" in k or "tokenizer" in k else None for k, v in open_clip_parts.items()})
    embeds, negative = text_only.encode_prompt(PROMPT, torch.device("cpu"), 1, True, "a blue square")
    without_text = quiet(LatentDiffusionPipeline(**{k: None if "text" in k or "tokenizer" in k else v
                                                    for k, v in open_clip_parts.items()}))
    got = without_text(prompt_embeds=embeds, negative_prompt_embeds=negative, **dummy_inputs(prompt=None)).images
    full = quiet(LatentDiffusionPipeline(**open_clip_parts))
    assert_same(got, full(**dummy_inputs(negative_prompt="a blue square")).images, 1e-6)
    with pytest.raises(LdmError, match="no text encoder"):
        without_text(**dummy_inputs())


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt_embeds=torch.zeros(1, 16, 32)), "prompt or prompt_embeds, not both"),
    (dict(prompt=None), "give a prompt"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 16, 32)), "not both"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 32), negative_prompt_embeds=torch.zeros(2, 16, 32)), "same shape"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"]), "may name"),
    (dict(timesteps=[999, 500]), "DDIMScheduler takes no custom timesteps"),
    (dict(timesteps=[999], sigmas=[1.0]), "timesteps or sigmas, not both"),
])
def test_bad_contract_inputs_raise_one_line(pipe, kwargs, words):
    with pytest.raises(LdmError, match=words) as e:
        pipe(**dummy_inputs(**kwargs))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- clip_skip


def diffusers_clip_skip_embeds(text_encoder, tokenizer, prompt, clip_skip):
    """StableDiffusionPipeline.encode_prompt's clip_skip branch, written out: diffusers 0.42 reads
    `text_encoder.text_model.final_layer_norm`, which transformers 5's CLIPTextModel no longer has."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True)[-1][-(clip_skip + 1)]
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def test_clip_skip_gives_the_same_images_as_stable_diffusion(hf_parts):
    sd = stable_diffusion(hf_parts)
    embeds = diffusers_clip_skip_embeds(hf_parts["text_encoder"], hf_parts["tokenizer"], PROMPT, 1)
    negative = sd.encode_prompt("a blue square", "cpu", 1, False)[0]  # diffusers encodes negatives without clip_skip
    expected = sd(**dummy_inputs(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)).images
    got = quiet(LatentDiffusionPipeline(**hf_parts))(**dummy_inputs(clip_skip=1, negative_prompt="a blue square")).images
    assert_same(got, expected)
    assert np.abs(got - quiet(LatentDiffusionPipeline(**hf_parts))(**dummy_inputs(negative_prompt="a blue square")).images).max() > 1e-4


def test_clip_skip_1_on_an_open_clip_tower_is_its_penultimate_layer(open_clip_text_encoder, open_clip_parts):
    penultimate = OpenCLIPTextModel(**{**open_clip_text_encoder.config, "layer": "penultimate"}).eval()
    penultimate.load_state_dict(open_clip_text_encoder.state_dict())
    ours = LatentDiffusionPipeline(**open_clip_parts)
    skipped, _ = ours.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=1)
    plain, _ = LatentDiffusionPipeline(**{**open_clip_parts, "text_encoder": penultimate}).encode_prompt(PROMPT, "cpu", 1, False)
    assert torch.equal(skipped, plain)
    assert not torch.equal(skipped, ours.encode_prompt(PROMPT, "cpu", 1, False)[0])
    with pytest.raises(LdmError, match="clip_skip 2 skips every block"):
        ours.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=2)


# --------------------------------------------------------------------------- custom schedules


@pytest.mark.parametrize("custom", [dict(timesteps=[999, 600, 200]), dict(sigmas=[14.6, 3.0, 0.5])])
def test_custom_timesteps_and_sigmas_give_the_same_images_as_stable_diffusion(hf_parts, custom):
    hf_parts["scheduler"] = EulerDiscreteScheduler.from_config(hf_parts["scheduler"].config)
    expected = stable_diffusion(hf_parts)(**dummy_inputs(**custom)).images
    ours = quiet(LatentDiffusionPipeline(**hf_parts))
    got = ours(**dummy_inputs(**custom)).images
    assert_same(got, expected)
    assert ours.num_timesteps == len(ours.scheduler.timesteps) == 3 - ("sigmas" in custom)  # Euler's sigmas end in 0
    # A custom schedule is not the default one of the same length.
    assert np.abs(got - ours(**dummy_inputs(num_inference_steps=3)).images).max() > 1e-4


# --------------------------------------------------------------------------- callbacks


def test_callback_inputs(pipe):
    """diffusers' test_callback_inputs: only the named tensors, all of them on request, and replacements taken."""
    seen = []

    def subset(p, i, t, kwargs):
        seen.append(sorted(kwargs))
        return kwargs

    pipe(**dummy_inputs(callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"], output_type="latent"))
    assert seen == [["latents"]] * STEPS
    seen.clear()

    def everything(p, i, t, kwargs):
        seen.append(sorted(kwargs))
        assert kwargs["prompt_embeds"].shape[0] == 2 * kwargs["negative_prompt_embeds"].shape[0]  # [negative, prompt]
        return kwargs

    pipe(**dummy_inputs(callback_on_step_end=everything, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs))
    assert seen == [sorted(pipe._callback_tensor_inputs)] * STEPS

    def zero_last(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = pipe(**dummy_inputs(callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
                              output_type="latent")).images
    assert out.abs().sum() == 0


def test_callback_cfg(pipe):
    """diffusers' test_callback_cfg: a callback raising the guidance scale at every step is heard."""
    def increase(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    pipe(**dummy_inputs(guidance_scale=2.0, callback_on_step_end=increase,
                        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs))
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


@pytest.mark.parametrize("cutoff", [1, 2])
def test_switching_guidance_off_mid_run_gives_the_same_images_as_stable_diffusion(hf_parts, cutoff):
    """SDCFGCutoffCallback: after step `cutoff` the U-Net runs on the prompt alone, as in diffusers."""
    kwargs = lambda: dummy_inputs(num_inference_steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff))  # noqa: E731
    expected = stable_diffusion(hf_parts)(**kwargs()).images
    ours = quiet(LatentDiffusionPipeline(**hf_parts))
    sizes = []
    hook = ours.unet.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    try:
        got = ours(**kwargs()).images
    finally:
        hook.remove()
    assert_same(got, expected)
    assert sizes == [2] * (cutoff + 1) + [1] * (3 - cutoff)  # the unconditional pass stops after the cutoff step


# --------------------------------------------------------------------------- cross_attention_kwargs: a LoRA scale


@pytest.fixture
def lora_parts(hf_parts):
    """The hf parts with LoRA layers (random, non-zero) in the U-Net and the text encoder, through peft."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    unet, text = copy.deepcopy(hf_parts["unet"]), copy.deepcopy(hf_parts["text_encoder"])
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]), text)
    return {**hf_parts, "unet": unet, "text_encoder": text}


def test_lora_scale_gives_the_same_images_as_stable_diffusion(lora_parts, hf_parts):
    kwargs = lambda scale: dummy_inputs(cross_attention_kwargs={"scale": scale})  # noqa: E731
    ours = quiet(LatentDiffusionPipeline(**lora_parts))
    half = ours(**kwargs(0.5)).images
    assert_same(half, stable_diffusion(lora_parts)(**kwargs(0.5)).images)
    # Scale 0 switches the LoRA layers off (U-Net and text encoder); 1 is the plain LoRA model.
    assert_same(ours(**kwargs(0.0)).images, quiet(LatentDiffusionPipeline(**hf_parts))(**dummy_inputs()).images)
    assert_same(ours(**kwargs(1.0)).images, ours(**dummy_inputs()).images, 0.0)
    assert np.abs(half - ours(**dummy_inputs()).images).max() > 1e-4


# --------------------------------------------------------------------------- saving, loading, dtypes, from_pipe


def test_save_load_local(pipe, tmp_path):
    expected = pipe(**dummy_inputs()).images
    pipe.save_pretrained(tmp_path)
    loaded = quiet(LatentDiffusionPipeline.from_pretrained(tmp_path))
    assert_same(loaded(**dummy_inputs()).images, expected, 0.0)


def test_save_load_optional_components(pipe, tmp_path):
    for name in pipe._optional_components:
        setattr(pipe, name, None)
    expected = pipe(**dummy_inputs()).images
    pipe.save_pretrained(tmp_path)
    loaded = quiet(LatentDiffusionPipeline.from_pretrained(tmp_path))
    assert all(getattr(loaded, name) is None for name in pipe._optional_components)
    assert_same(loaded(**dummy_inputs()).images, expected, 0.0)


def test_save_load_float16(open_clip_parts, tmp_path):
    """Saved in float16, loaded with torch_dtype=float16: every part stays float16 and gives the same images."""
    half = {k: copy.deepcopy(v).half() if hasattr(v, "half") else v for k, v in open_clip_parts.items()}
    pipe = quiet(LatentDiffusionPipeline(**half))
    expected = pipe(**dummy_inputs(output_type="latent")).images
    pipe.save_pretrained(tmp_path)
    loaded = quiet(LatentDiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16))
    for name, part in loaded.components.items():
        if hasattr(part, "dtype"):
            assert part.dtype == torch.float16, name
    got = loaded(**dummy_inputs(output_type="latent")).images
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert torch.equal(got, expected)


def test_to_dtype(open_clip_parts):
    pipe = LatentDiffusionPipeline(**{k: copy.deepcopy(v) for k, v in open_clip_parts.items()})
    assert all(part.dtype == torch.float32 for part in pipe.components.values() if hasattr(part, "dtype"))
    pipe.to(torch.float16)
    assert all(part.dtype == torch.float16 for part in pipe.components.values() if hasattr(part, "dtype"))


def test_from_pipe_shares_the_parts_and_the_images(pipe):
    again = quiet(LatentDiffusionPipeline.from_pipe(pipe))
    assert all(again.components[k] is v for k, v in pipe.components.items())
    assert_same(again(**dummy_inputs()).images, pipe(**dummy_inputs()).images, 0.0)


# --------------------------------------------------------------------------- the rest of PipelineTesterMixin


def test_dict_tuple_outputs_equivalent(pipe):
    assert_same(pipe(**dummy_inputs()).images, pipe(**dummy_inputs(), return_dict=False)[0], 0.0)


def test_num_images_per_prompt(pipe):
    for batch in (1, 2):
        for n in (1, 2):
            images = pipe(**dummy_inputs(prompt=[PROMPT] * batch), num_images_per_prompt=n)[0]
            assert images.shape[0] == batch * n


def test_inference_batch_single_identical(pipe):
    """One image alone equals the same image in a batch (unequal prompts, the last very long)."""
    single = pipe(**dummy_inputs())[0]
    batch = pipe(**dummy_inputs(prompt=[PROMPT, PROMPT[:6], 100 * "very long"], negative_prompt=["x"] * 3,
                                generator=[gen(0), gen(1), gen(2)]))[0]
    single_neg = pipe(**dummy_inputs(negative_prompt="x"))[0]
    assert batch.shape[0] == 3 and not np.array_equal(single, single_neg)
    assert np.abs(batch[0] - single_neg[0]).max() < 1e-4


def test_cfg_and_attention_slicing(open_clip_parts):
    pipe = quiet(LatentDiffusionPipeline(**{k: copy.deepcopy(v) for k, v in open_clip_parts.items()}))  # slicing sticks to the U-Net
    assert pipe(**dummy_inputs(guidance_scale=1.0))[0].shape == pipe(**dummy_inputs(guidance_scale=7.5))[0].shape
    plain = pipe(**dummy_inputs())[0]
    pipe.enable_attention_slicing(slice_size=1)
    assert np.abs(pipe(**dummy_inputs())[0] - plain).max() < 1e-3


def test_progress_bar(pipe):
    pipe.set_progress_bar_config(disable=False)  # (None: tqdm's "off unless a terminal", and a StringIO is none)
    with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
        pipe(**dummy_inputs())
        assert f"{STEPS}/{STEPS}" in stderr.getvalue()
    pipe.set_progress_bar_config(disable=True)
    with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
        pipe(**dummy_inputs())
        assert stderr.getvalue() == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error; on a GPU xformers may run")
def test_xformers_on_cpu_is_a_one_line_error(pipe):
    with pytest.raises(LdmError) as e:
        pipe.enable_xformers_memory_efficient_attention()
    assert "\n" not in str(e.value) and ("CUDA" in str(e.value) or "pip install xformers" in str(e.value))


def test_old_positional_and_keyword_calls_still_work(pipe, ddim):
    """Every call written before the contract (keywords; prompt first) gives the same images."""
    assert isinstance(pipe.scheduler, DDIMScheduler)
    a = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=gen(0), output_type="np").images
    b = pipe(PROMPT, 16, 16, STEPS, generator=gen(0), output_type="np").images
    assert_same(a, b, 0.0)

"""The classifier-free-guided sampling loop, as one function.

It does step for step what `diffusers.StableDiffusionPipeline` does, so the same U-Net,
scheduler, latents and text embeddings give the same images. The update rule belongs to
the diffusers scheduler (DDIM by default, any other swappable); this file only wires
the U-Net, guidance and the scheduler together. img2img and inpainting run the same loop:
they start from a noised image part-way down the schedule (`set_schedule` with a
`strength`) and inpainting adds a `blend` after each step.
"""

import functools
import inspect
from typing import Callable, Optional, Union

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from tqdm.auto import tqdm

from ldm.errors import LdmError


def step_kwargs(scheduler, eta: float, generator) -> dict:
    """`eta` and `generator` for the schedulers whose `step` takes them (DDIM takes both)."""
    params = inspect.signature(scheduler.step).parameters
    return {name: value for name, value in (("eta", eta), ("generator", generator)) if name in params}


def set_schedule(scheduler, num_inference_steps: int, device=None, timesteps=None, sigmas=None,
                 strength: Optional[float] = None) -> torch.Tensor:
    """The timesteps to run, set on `scheduler`, as diffusers' pipelines set them.

    `timesteps` or `sigmas`: a custom schedule (diffusers' `retrieve_timesteps`; the scheduler
    must take it). `strength` (img2img, inpainting; SDEdit, Meng et al. 2022): keep only
    the last `int(num_inference_steps * strength)` steps, as `StableDiffusionImg2ImgPipeline.get_timesteps`.
    """
    if timesteps is not None and sigmas is not None:
        raise LdmError("give timesteps or sigmas, not both")
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None and name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise LdmError(f"{type(scheduler).__name__} takes no custom {name}: use num_inference_steps, "
                           f"or a scheduler that does (e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    schedule, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    if strength is None:
        return schedule
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_steps, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def batch_rows(kwargs: dict, rows: slice) -> dict:
    """The rows `rows` of every tensor (or list of tensors) in U-Net keyword arguments."""
    return {k: [v[rows] for v in value] if isinstance(value, (list, tuple)) else value[rows] for k, value in kwargs.items()}


def predict_noise(unet, x, t, embeds, max_batch_size: Optional[int] = None, unet_kwargs: Optional[dict] = None,
                  cross_attention_kwargs: Optional[dict] = None) -> torch.Tensor:
    """The U-Net's prediction for a batch, in chunks of at most `max_batch_size` (bounds peak memory).

    `unet_kwargs`: more per-row U-Net arguments (a control model's residuals), cut along with the batch.
    `cross_attention_kwargs` (e.g. a LoRA `scale`) go to every call as they are.
    """
    unet_kwargs = unet_kwargs or {}
    if cross_attention_kwargs is not None:
        unet = functools.partial(unet, cross_attention_kwargs=cross_attention_kwargs)
    if not max_batch_size or len(x) <= max_batch_size:
        return unet(x, t, encoder_hidden_states=embeds, **unet_kwargs, return_dict=False)[0]
    chunks = [slice(i, i + max_batch_size) for i in range(0, len(x), max_batch_size)]
    return torch.cat([
        unet(x[rows], t, encoder_hidden_states=embeds[rows], **batch_rows(unet_kwargs, rows), return_dict=False)[0]
        for rows in chunks
    ])


@torch.no_grad()
def sample_cfg(
    unet,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: Optional[torch.Tensor] = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    generator=None,
    guidance_rescale: float = 0.0,
    callback: Optional[Callable] = None,
    progress: Union[bool, Callable] = True,
    max_batch_size: Optional[int] = None,
    control: Optional[Callable] = None,
    timesteps: Optional[torch.Tensor] = None,
    cross_attention_kwargs: Optional[dict] = None,
    blend: Optional[Callable] = None,
) -> torch.Tensor:
    """Denoise `latents` (unit-variance noise) into clean latents with classifier-free guidance.

    DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2020), arXiv:2010.02502.
    Classifier-free guidance: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022),
    arXiv:2207.12598. `guidance_rescale`: Lin et al., "Common Diffusion Noise Schedules and
    Sample Steps are Flawed" (2023), sec. 3.4.

    Guidance is on when `guidance_scale > 1` (then `negative_embeds` is required); at 1 or
    below the U-Net runs on the prompt alone. `callback(step, timestep, state)` sees the
    dict `state` ("latents"; "prompt_embeds", the U-Net's text batch, [negative, prompt] under
    guidance; "negative_prompt_embeds"; "guidance_scale") after each step and may return a
    dict of new values: guidance is on at a step while the current `guidance_scale` > 1, so a
    callback can switch it off mid-run (with "prompt_embeds" cut to the prompt half), as
    diffusers' `SDCFGCutoffCallback` does. `progress` is a bool or a tqdm-like factory such as a pipeline's
    `progress_bar`. `max_batch_size` splits each U-Net call into smaller ones.
    `control(step, num_steps, timestep, model_input, embeds)` (a ControlNet or T2I-Adapter,
    see `ldm.pipeline_control`) returns more U-Net keyword arguments for the whole batch
    (e.g. `down_block_additional_residuals`), or None. `timesteps`: the steps to run, already
    set on the scheduler (`set_schedule`), with `latents` already at the first one's noise
    level (img2img); without them all `num_inference_steps` steps run from unit-variance noise.
    `blend(step, latents)` returns the latents after each scheduler step (inpainting puts the
    known region back). `cross_attention_kwargs` go to every U-Net call.
    """
    if guidance_scale > 1.0 and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (the unconditional text embeddings)")
    if timesteps is None:
        # 1. The timesteps for this many steps. Some schedulers' initial sigma depends on them,
        #    so this comes before the noise is scaled.
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = scheduler.timesteps
        # 2. Scale the unit-variance noise to the scheduler's first noise level (1 for DDIM,
        #    sqrt(sigma_max^2 + 1) for EDM). Flow matching starts from unit noise and has no
        #    init_noise_sigma, as diffusers' SD3 pipeline knows.
        init_sigma = getattr(scheduler, "init_noise_sigma", None)
        if init_sigma is not None:
            latents = latents * init_sigma
    # 3. One batch for both passes: [unconditional, conditional], as diffusers orders it.
    embeds = torch.cat([negative_embeds, prompt_embeds]) if guidance_scale > 1.0 else prompt_embeds
    extra = step_kwargs(scheduler, eta, generator)
    bar = progress(total=len(timesteps)) if callable(progress) else tqdm(
        total=len(timesteps), disable=not progress, desc="sampling", leave=False
    )
    with bar:
        for i, t in enumerate(timesteps):
            # Guidance is decided at each step: a callback may have switched it off.
            do_cfg = guidance_scale > 1.0
            # 4. Per-step input scaling (identity for DDIM, 1/sqrt(sigma^2+1) for Euler-type,
            #    EDM's c_in); flow matching feeds x_t as it is (no scale_model_input).
            x = torch.cat([latents] * 2) if do_cfg else latents
            if hasattr(scheduler, "scale_model_input"):
                x = scheduler.scale_model_input(x, t)
            unet_kwargs = control(i, len(timesteps), t, x, embeds) if control is not None else None
            noise_pred = predict_noise(unet, x, t, embeds, max_batch_size, unet_kwargs, cross_attention_kwargs)
            # 5. Guidance: move from the unconditional prediction towards the conditional one.
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, cond, guidance_rescale=guidance_rescale)
            # 6. The scheduler's update x_t -> x_{t-1}.
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if blend is not None:
                latents = blend(i, latents)
            # 7. Let the caller look at (or replace) the latents, the text batch and the guidance.
            if callback is not None:
                state = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds,
                         "guidance_scale": guidance_scale}
                state.update(callback(i, t, state) or {})
                latents, embeds, negative_embeds = state["latents"], state["prompt_embeds"], state["negative_prompt_embeds"]
                guidance_scale = state["guidance_scale"]
            bar.update()
    # 8. A diverged model (or an fp16 overflow) gives NaN latents, which decode to black
    #    images: say so instead of writing them.
    if not bool(torch.isfinite(latents).all()):
        raise LdmError(
            f"sampling produced non-finite (NaN or inf) latents after {len(timesteps)} steps: the model's weights are "
            "diverged or overflow in this precision; check its training run (metrics.jsonl), or sample in float32"
        )
    return latents

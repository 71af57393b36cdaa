"""The classifier-free-guided sampling loop, as one function.

It does step for step what `diffusers.StableDiffusionPipeline` does, so the same U-Net,
scheduler, latents and text embeddings give the same images. The update rule belongs to
the diffusers scheduler (DDIM by default, any other swappable); this file only wires
the U-Net, guidance and the scheduler together.
"""

import inspect
from typing import Callable, Optional, Union

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from tqdm.auto import tqdm

from ldm.errors import LdmError


def step_kwargs(scheduler, eta: float, generator) -> dict:
    """`eta` and `generator` for the schedulers whose `step` takes them (DDIM takes both)."""
    params = inspect.signature(scheduler.step).parameters
    return {name: value for name, value in (("eta", eta), ("generator", generator)) if name in params}


def batch_rows(kwargs: dict, rows: slice) -> dict:
    """The rows `rows` of every tensor (or list of tensors) in U-Net keyword arguments."""
    return {k: [v[rows] for v in value] if isinstance(value, (list, tuple)) else value[rows] for k, value in kwargs.items()}


def predict_noise(unet, x, t, embeds, max_batch_size: Optional[int] = None, unet_kwargs: Optional[dict] = None) -> torch.Tensor:
    """The U-Net's prediction for a batch, in chunks of at most `max_batch_size` (bounds peak memory).

    `unet_kwargs`: more per-row U-Net arguments (a control model's residuals), cut along with the batch.
    """
    unet_kwargs = unet_kwargs or {}
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
) -> torch.Tensor:
    """Denoise `latents` (unit-variance noise) into clean latents with classifier-free guidance.

    DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2020), arXiv:2010.02502.
    Classifier-free guidance: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022),
    arXiv:2207.12598. `guidance_rescale`: Lin et al., "Common Diffusion Noise Schedules and
    Sample Steps are Flawed" (2023), sec. 3.4.

    Guidance is on when `guidance_scale > 1` (then `negative_embeds` is required); at 1 or
    below the U-Net runs on the prompt alone. `callback(step, timestep, latents)` may return
    new latents. `progress` is a bool or a tqdm-like factory such as a pipeline's
    `progress_bar`. `max_batch_size` splits each U-Net call into smaller ones.
    `control(step, num_steps, timestep, model_input, embeds)` (a ControlNet or T2I-Adapter,
    see `ldm.pipeline_control`) returns more U-Net keyword arguments for the whole batch
    (e.g. `down_block_additional_residuals`), or None.
    """
    do_cfg = guidance_scale > 1.0
    if do_cfg and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (the unconditional text embeddings)")
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
    embeds = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds
    extra = step_kwargs(scheduler, eta, generator)
    bar = progress(total=len(timesteps)) if callable(progress) else tqdm(
        total=len(timesteps), disable=not progress, desc="sampling", leave=False
    )
    with bar:
        for i, t in enumerate(timesteps):
            # 4. Per-step input scaling (identity for DDIM, 1/sqrt(sigma^2+1) for Euler-type,
            #    EDM's c_in); flow matching feeds x_t as it is (no scale_model_input).
            x = torch.cat([latents] * 2) if do_cfg else latents
            if hasattr(scheduler, "scale_model_input"):
                x = scheduler.scale_model_input(x, t)
            unet_kwargs = control(i, len(timesteps), t, x, embeds) if control is not None else None
            noise_pred = predict_noise(unet, x, t, embeds, max_batch_size, unet_kwargs)
            # 5. Guidance: move from the unconditional prediction towards the conditional one.
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, cond, guidance_rescale=guidance_rescale)
            # 6. The scheduler's update x_t -> x_{t-1}.
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            # 7. Let the caller look at (or replace) the latents.
            if callback is not None:
                replaced = callback(i, t, latents)
                latents = latents if replaced is None else replaced
            bar.update()
    # 8. A diverged model (or an fp16 overflow) gives NaN latents, which decode to black
    #    images: say so instead of writing them.
    if not bool(torch.isfinite(latents).all()):
        raise LdmError(
            f"sampling produced non-finite (NaN or inf) latents after {len(timesteps)} steps: the model's weights are "
            "diverged or overflow in this precision; check its training run (metrics.jsonl), or sample in float32"
        )
    return latents

"""img2img: `LatentDiffusionImg2ImgPipeline`, with the names and meaning of diffusers' StableDiffusionImg2ImgPipeline.

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", arXiv:2108.01073): encode the image, noise its latents to the
level of step `(1 - strength) * num_inference_steps` of the schedule, and denoise from
there with the one sampling loop (`ldm.sampling.sample_cfg`). `strength` 1 starts from
(almost) pure noise; small values keep the image. Same components, generator and scheduler
give the same images as diffusers' pipeline.
"""

from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from ldm import pipeline_control as pc
from ldm.codec import LatentCodec
from ldm.errors import LdmError
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling import set_schedule


def check_strength(strength: float) -> None:
    if not 0.0 < strength <= 1.0:
        raise LdmError(f"strength must be in (0, 1] (1: start from noise; near 0: keep the image), got {strength}")


def check_steps_left(schedule, strength: float, num_inference_steps: int) -> None:
    if len(schedule) == 0:
        raise LdmError(f"strength {strength} at {num_inference_steps} steps leaves no step to run: "
                       f"raise strength or num_inference_steps (int(steps * strength) must be at least 1)")


def size_of(image) -> tuple:
    """(height, width) of one image or mask: PIL, numpy HW / HWC, or a tensor ...HW."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return tuple(image.shape[:2])
    return tuple(image.shape[-2:])


def as_list(images, name: str, num_prompts: int) -> list:
    """One image (or mask) for all prompts, or one per prompt, as a list of single images."""
    if images is None:
        raise LdmError(f"give {name}= (one image for all prompts, or one per prompt)")
    if isinstance(images, np.ndarray) and images.ndim == 2:  # a numpy mask, H x W
        images = images[:, :, None]
    if isinstance(images, torch.Tensor) and images.ndim == 2:
        images = images[None]
    listed = pc.split_images(images, name)
    if len(listed) not in (1, num_prompts):
        raise LdmError(f"got {len(listed)} {name}s for {num_prompts} prompts: give one for all prompts, or one per prompt")
    return listed


def encode_images(vae, pixels: torch.Tensor, generator) -> torch.Tensor:
    """Scaled latent samples of images in [-1, 1], drawn as diffusers' pipelines draw them (one generator per row if a list)."""
    if isinstance(generator, list):
        z = torch.cat([retrieve_latents(vae.encode(pixels[i : i + 1]), generator=generator[i]) for i in range(len(pixels))])
    else:
        z = retrieve_latents(vae.encode(pixels), generator=generator)
    return LatentCodec(vae).scale(z)


class LatentDiffusionImg2ImgPipeline(LatentDiffusionPipeline):
    """Text-guided image-to-image on a model folder of ours (or a Stable Diffusion one)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        max_batch_size: Optional[int] = None,
    ):
        """`StableDiffusionImg2ImgPipeline.__call__`: `image` (PIL, numpy, tensor in [0, 1]; one for all
        prompts or one per prompt) is the start; the output has its size (rounded down to the VAE's factor)."""
        self._no_control()
        prompts, negatives, tensor_inputs = self._begin(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale, 0.0, clip_skip,
            cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_prompts = len(prompts) if prompts is not None else len(prompt_embeds)
        check_strength(strength)
        images = as_list(image, "image", num_prompts)
        pixels = self.image_processor.preprocess(pc.batch_of(images))
        h, w = pixels.shape[-2:]
        self.check_inputs(prompts, negatives, h, w, num_inference_steps, num_images_per_prompt, output_type, None,
                          (num_prompts * num_images_per_prompt, self.unet.config.in_channels, h // self.vae_scale_factor,
                           w // self.vae_scale_factor), generator)
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self._encode(
            prompts, negatives, prompt_embeds, negative_prompt_embeds, device, num_images_per_prompt)

        schedule = set_schedule(self.scheduler, num_inference_steps, device, timesteps, sigmas, strength)
        check_steps_left(schedule, strength, num_inference_steps)
        latents = self.noised_image_latents(pixels, schedule[:1], num_prompts, num_images_per_prompt,
                                            prompt_embeds.dtype, device, generator)
        latents = self._denoise(latents, schedule, prompt_embeds, negative_prompt_embeds, eta, generator, max_batch_size,
                                callback_on_step_end, tensor_inputs)
        return self._finish(latents, output_type, return_dict)

    def noised_image_latents(self, pixels, first_t, num_prompts, num_images_per_prompt, dtype, device, generator):
        """`StableDiffusionImg2ImgPipeline.prepare_latents`: the image's latents noised to the first step's level."""
        batch = num_prompts * num_images_per_prompt
        pixels = pixels.to(device=device, dtype=dtype)
        if isinstance(generator, list):  # one generator per image: each encodes its own copy
            z = encode_images(self.vae, pc.per_image(pixels, num_prompts, num_images_per_prompt), generator)
        else:
            z = pc.per_image(encode_images(self.vae, pixels, generator), num_prompts, num_images_per_prompt)
        noise = randn_tensor(z.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(z, noise, first_t.repeat(batch))

    def _no_control(self) -> None:
        if self.controlnet is not None or self.adapter is not None:
            raise LdmError(f"{type(self).__name__} takes no ControlNet or T2I-Adapter: load the model without one")

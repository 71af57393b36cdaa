"""Inpainting: `LatentDiffusionInpaintPipeline`, with the names and meaning of diffusers' StableDiffusionInpaintPipeline.

Our U-Nets take the latents alone (4 channels, no mask input), so inpainting is done as
diffusers does it for such U-Nets (after RePaint, Lugmayr et al. 2022, arXiv:2201.09865,
in latent space): after every step the known region (mask black) is replaced by the image's
own latents noised to the next step's level, and only the masked region (white) is
generated. It runs the one sampling loop (`ldm.sampling.sample_cfg`) with that `blend` hook.
Same components, generator, latents and scheduler give the same images as diffusers' pipeline.
"""

from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ldm import pipeline_control as pc
from ldm.errors import LdmError
from ldm.pipeline_img2img import (
    LatentDiffusionImg2ImgPipeline, as_list, check_steps_left, check_strength, encode_images, size_of,
)
from ldm.sampling import set_schedule


def check_masks_fit(images: list, masks: list) -> None:
    """Each mask has its image's size (one line naming both, before any work)."""
    for i, mask in enumerate(masks):
        image = images[i if len(images) > 1 else 0]
        if size_of(mask) != size_of(image):
            (mh, mw), (ih, iw) = size_of(mask), size_of(image)
            raise LdmError(f"mask_image {i} is {mh}x{mw} (height x width) but its image is {ih}x{iw}: "
                           f"give a mask of the image's size (white: repaint, black: keep)")


class RepaintBlend:
    """The `blend` hook: (1 - mask) * image latents at the next step's noise level + mask * latents."""

    def __init__(self, scheduler, schedule, image_latents, noise, mask):
        self.scheduler, self.schedule = scheduler, schedule
        self.image_latents, self.noise, self.mask = image_latents, noise, mask

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        known = self.image_latents
        if step < len(self.schedule) - 1:  # the last step lands on the clean image itself
            known = self.scheduler.add_noise(known, self.noise, torch.tensor([self.schedule[step + 1]]))
        return (1 - self.mask) * known + self.mask * latents


class LatentDiffusionInpaintPipeline(LatentDiffusionImg2ImgPipeline):
    """Text-guided inpainting on a model folder of ours (or a Stable Diffusion one with a 4-channel U-Net)."""

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """As StableDiffusionInpaintPipeline's: masks to one channel in [0, 1], then 0 or 1 (>= 0.5 is white)."""
        return VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        image=None,
        mask_image=None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
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
        """`StableDiffusionInpaintPipeline.__call__`: repaint the white part of `mask_image` in `image`.

        `image` and `mask_image` (PIL, numpy, tensor; one for all prompts or one per prompt;
        each mask of its image's size) are resized to `height` x `width` (default: the
        model's size). `strength` < 1 starts from the noised image instead of noise.
        """
        self._no_control()
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise LdmError(f"the U-Net takes {self.unet.config.in_channels} channels: only U-Nets that take the latents alone "
                           f"({self.vae.config.latent_channels} channels) inpaint here")
        prompts, negatives, tensor_inputs = self._begin(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale, 0.0, clip_skip,
            cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_prompts = len(prompts) if prompts is not None else len(prompt_embeds)
        check_strength(strength)
        images, masks = as_list(image, "image", num_prompts), as_list(mask_image, "mask_image", num_prompts)
        check_masks_fit(images, masks)
        default_h, default_w = self.default_size
        height, width = height or default_h, width or default_w
        f, batch = self.vae_scale_factor, num_prompts * num_images_per_prompt
        shape = (batch, self.vae.config.latent_channels, height // f, width // f)
        self.check_inputs(prompts, negatives, height, width, num_inference_steps, num_images_per_prompt, output_type,
                          latents, shape, generator)
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self._encode(
            prompts, negatives, prompt_embeds, negative_prompt_embeds, device, num_images_per_prompt)
        dtype = prompt_embeds.dtype

        schedule = set_schedule(self.scheduler, num_inference_steps, device, timesteps, sigmas, strength)
        check_steps_left(schedule, strength, num_inference_steps)
        pixels = self.image_processor.preprocess(pc.batch_of(images), height=height, width=width).to(torch.float32)
        mask = self.mask_processor.preprocess(pc.batch_of(masks), height=height, width=width)

        # The draws in StableDiffusionInpaintPipeline's order: the image's latents, the noise, then the
        # masked image's latents (a 4-channel U-Net never reads them, but the generator's stream must match).
        image_latents = pc.per_image(self._encode_rows(pixels.to(device=device, dtype=dtype), generator), num_prompts,
                                     num_images_per_prompt)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma if strength == 1.0 else \
                self.scheduler.add_noise(image_latents, noise, schedule[:1].repeat(batch))
        else:
            noise = latents.to(device)
            latents = noise * self.scheduler.init_noise_sigma  # as diffusers: given latents start as noise at any strength
        self._encode_rows((pixels * (mask < 0.5)).to(device=device, dtype=dtype), generator)
        mask = pc.per_image(F.interpolate(mask, size=(height // f, width // f)).to(device=device, dtype=dtype),
                            num_prompts, num_images_per_prompt)

        blend = RepaintBlend(self.scheduler, schedule, image_latents, noise, mask)
        latents = self._denoise(latents, schedule, prompt_embeds, negative_prompt_embeds, eta, generator, max_batch_size,
                                callback_on_step_end, tensor_inputs, blend=blend)
        return self._finish(latents, output_type, return_dict)

    def _encode_rows(self, pixels, generator):
        """`StableDiffusionInpaintPipeline._encode_vae_image`: generator k encodes row k of a list."""
        return encode_images(self.vae, pixels, generator)

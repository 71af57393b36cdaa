"""`LatentDiffusionPipeline`: text in, images out.

A `diffusers.DiffusionPipeline`, so saving, loading, `.to(device)`, CPU offload and
progress bars come from diffusers, and a model folder is in the diffusers layout that
the ecosystem reads. `__call__` mirrors `diffusers.StableDiffusionPipeline.__call__`
(same names, defaults and meaning) and gives the same images from the same components;
it also loads a plain Stable Diffusion folder as it is. The loop itself lives in
`ldm.sampling.sample_cfg`; the way back from latents to images in `ldm.codec`; the
checks that a folder's parts exist and fit together in `ldm.model_parts`.
"""

from typing import Callable, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ldm.autoencoder import vae_scale_factor
from ldm.codec import LatentCodec, unscale_latents  # noqa: F401 (unscale_latents: its old home)
from ldm.errors import LdmError
from ldm.model_parts import COMPONENTS, check_components, check_folder_parts_agree, check_model_folder  # noqa: F401
from ldm.sampling import sample_cfg
from ldm.text_encoder import encode_text, tokenize

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LatentDiffusionPipeline(DiffusionPipeline):
    """VAE + text encoder (open_clip tower or transformers CLIP) + U-Net + any diffusers scheduler."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        # Parts from different trainings fail here with both numbers, not in a matmul mid-sampling.
        check_components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a local model folder (ours or a plain Stable Diffusion one); never a download."""
        given = [k for k in COMPONENTS if k in kwargs]
        check_model_folder(pretrained_model_name_or_path, given)
        check_folder_parts_agree(pretrained_model_name_or_path, given)  # configs only: before any weights load
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def default_size(self) -> tuple:
        """(height, width) in pixels that the U-Net was built for."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def encode_prompt(self, prompts: List[str], device, num_images_per_prompt: int = 1) -> torch.Tensor:
        """Per-token text embeddings, each prompt repeated for its images (prompt-major order)."""
        embeds = encode_text(self.text_encoder, tokenize(self.tokenizer, prompts, device))
        embeds = embeds.to(dtype=self.text_encoder.dtype, device=device)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def check_inputs(self, prompts, negatives, height, width, num_inference_steps, num_images_per_prompt,
                     output_type, latents, latent_shape, generator) -> None:
        """Reject bad arguments with one line each, before any work is done."""
        f = self.vae_scale_factor
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise LdmError("prompt must be a string or a non-empty list of strings")
        if negatives is not None and len(negatives) != len(prompts):
            raise LdmError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt, or one string")
        if height <= 0 or width <= 0 or height % f or width % f:
            raise LdmError(f"height and width must be positive multiples of {f} (the VAE's scale factor), got {height}x{width}")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise LdmError("num_inference_steps and num_images_per_prompt must be at least 1")
        if output_type not in OUTPUT_TYPES:
            raise LdmError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise LdmError(f"latents have shape {tuple(latents.shape)}, expected {latent_shape} for these prompts and size")
        if isinstance(generator, list) and len(generator) != latent_shape[0]:
            raise LdmError(f"got {len(generator)} generators for {latent_shape[0]} images: give one per image, or one")

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        callback_on_step_end: Optional[Callable] = None,
        max_batch_size: Optional[int] = None,
    ):
        """Generate images for `prompt`; arguments as in `diffusers.StableDiffusionPipeline.__call__`.

        `callback_on_step_end(pipe, step, timestep, {"latents": ...})` may return a dict
        with new "latents". `max_batch_size` caps the batch of each U-Net call (the CFG
        batch is twice the number of images). Progress bars: `set_progress_bar_config`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        default_h, default_w = self.default_size
        height, width = height or default_h, width or default_w
        f = self.vae_scale_factor
        shape = (len(prompts) * num_images_per_prompt, self.unet.config.in_channels, height // f, width // f)
        self.check_inputs(prompts, negatives, height, width, num_inference_steps, num_images_per_prompt,
                          output_type, latents, shape, generator)
        device = self._execution_device

        # Text: the unconditional embeddings (negative prompt, or "") only when guidance is on.
        prompt_embeds = self.encode_prompt(prompts, device, num_images_per_prompt)
        negative_embeds = None
        if guidance_scale > 1.0:
            negative_embeds = self.encode_prompt(negatives or [""] * len(prompts), device, num_images_per_prompt)

        # Noise, drawn as diffusers draws it, unless given.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = sample_cfg(
            self.unet, self.scheduler, latents.to(device), prompt_embeds, negative_embeds,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, eta=eta,
            generator=generator, guidance_rescale=guidance_rescale, progress=self.progress_bar,
            max_batch_size=max_batch_size, callback=self._step_callback(callback_on_step_end),
        )

        if output_type == "latent":
            images = latents
        else:
            images = LatentCodec(self.vae).decode(latents)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _step_callback(self, callback_on_step_end):
        """Adapt diffusers' `callback_on_step_end(pipe, step, t, kwargs) -> dict` to the loop's callback."""
        if callback_on_step_end is None:
            return None

        def callback(step, t, latents):
            out = callback_on_step_end(self, step, t, {"latents": latents})
            return (out or {}).get("latents")

        return callback

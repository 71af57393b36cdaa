"""`LatentDiffusionPipeline`: text in, images out.

A `diffusers.DiffusionPipeline`, so saving, loading, `.to(device)`, CPU offload and
progress bars come from diffusers, and a model folder is in the diffusers layout that
the ecosystem reads. `__call__` mirrors `diffusers.StableDiffusionPipeline.__call__`
(same names, defaults and meaning) and gives the same images from the same components;
it also loads a plain Stable Diffusion folder as it is. The loop itself lives in
`ldm.sampling.sample_cfg`; the way back from latents to images in `ldm.codec`; the
checks that a folder's parts exist and fit together in `ldm.model_parts`.

Conditional control: an optional `controlnet` (or a list, for multi-control) or `adapter`
(T2I-Adapter, or a list) component; `__call__` then takes `image=` and the control
arguments of diffusers' `StableDiffusionControlNetPipeline` / `StableDiffusionAdapterPipeline`
and gives their images on the same components (see `ldm.pipeline_control`).
"""

import json
from typing import Callable, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ldm import pipeline_control as pc
from ldm.autoencoder import vae_scale_factor
from ldm.codec import LatentCodec, unscale_latents  # noqa: F401 (unscale_latents: its old home)
from ldm.errors import LdmError
from ldm.finite import check_finite_module, check_finite_number
from ldm.lora import LoraLoading
from ldm.model_parts import COMPONENTS, check_components, check_folder_parts_agree, check_model_folder  # noqa: F401
from ldm.sampling import sample_cfg
from ldm.text_encoder import encode_text, tokenize

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LatentDiffusionPipeline(DiffusionPipeline, LoraLoading):
    """VAE + text encoder (open_clip tower or transformers CLIP) + U-Net + any diffusers scheduler.

    LoRA: `load_lora_weights(DIR)`, `set_adapters`, `fuse_lora`, ... of diffusers' Stable Diffusion
    pipelines (ldm.lora.LoraLoading), on the U-Net and a transformers CLIP text encoder.
    """

    # The ControlNet runs at every step beside the U-Net, so (as in diffusers) it is not in the chain.
    model_cpu_offload_seq = "text_encoder->adapter->unet->vae"
    _optional_components = ["controlnet", "adapter"]
    CONTROL = ("controlnet", "adapter")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, controlnet=None, adapter=None):
        super().__init__()
        # Parts from different trainings fail here with both numbers, not in a matmul mid-sampling.
        check_components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
        controlnet, adapter = pc.wrap_controlnet(controlnet), pc.wrap_adapter(adapter)
        pc.check_control_fits(unet, vae_scale_factor(vae), controlnet=controlnet, adapter=adapter)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              controlnet=controlnet, adapter=adapter)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # As StableDiffusionControlNetPipeline: control images stay in [0, 1] (no normalisation), RGB.
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    def to_json_string(self) -> str:
        """model_index.json; without a control model it is as before control existed (no null entries)."""
        index = json.loads(super().to_json_string())
        for name in self.CONTROL:
            if index.get(name, [None])[0] is None:
                index.pop(name, None)
        return json.dumps(index, indent=2, sort_keys=True) + "\n"  # as ConfigMixin.to_json_string writes it

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a local model folder (ours or a plain Stable Diffusion one); never a download."""
        given = [k for k in COMPONENTS if k in kwargs]
        check_model_folder(pretrained_model_name_or_path, given)
        check_folder_parts_agree(pretrained_model_name_or_path, given)  # configs only: before any weights load
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_finite_pipeline(pipe, pretrained_model_name_or_path)
        return pipe

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
                     output_type, latents, latent_shape, generator, control_images=None) -> None:
        """Reject bad arguments with one line each, before any work is done."""
        f = self.vae_scale_factor
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise LdmError("prompt must be a string or a non-empty list of strings")
        if negatives is not None and len(negatives) != len(prompts):
            raise LdmError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt, or one string")
        if control_images is not None:
            pc.check_control_images(control_images, len(prompts), height, width, f)
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
        image=None,
        controlnet_conditioning_scale: Union[float, List[float]] = 1.0,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
        guess_mode: bool = False,
        adapter_conditioning_scale: Union[float, List[float]] = 1.0,
        adapter_conditioning_factor: float = 1.0,
    ):
        """Generate images for `prompt`; arguments as in `diffusers.StableDiffusionPipeline.__call__`.

        `callback_on_step_end(pipe, step, timestep, {"latents": ...})` may return a dict
        with new "latents". `max_batch_size` caps the batch of each U-Net call (the CFG
        batch is twice the number of images). Progress bars: `set_progress_bar_config`.

        With a ControlNet: `image` (PIL, numpy, tensor; one for all prompts or a list of one
        per prompt; for several ControlNets a list of one image per ControlNet, or, per
        prompt, a list of such lists, as diffusers reads a nested list),
        `controlnet_conditioning_scale`, `control_guidance_start` / `_end` (fractions of the
        steps; float or one per ControlNet) and `guess_mode`, as in diffusers'
        `StableDiffusionControlNetPipeline`. With a T2I-Adapter: `image`,
        `adapter_conditioning_scale` (float, or one per adapter) as in
        `StableDiffusionAdapterPipeline`, and `adapter_conditioning_factor` (the fraction of
        steps the adapter acts on) as in `StableDiffusionXLAdapterPipeline`. Height and width
        default to the control image's; a control image of another size is an error.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        control_images = self._control_images(image)
        default_h, default_w = self.default_size if control_images is None else pc.default_size(control_images, height, width)
        height, width = height or default_h, width or default_w
        f = self.vae_scale_factor
        shape = (len(prompts) * num_images_per_prompt, self.unet.config.in_channels, height // f, width // f)
        self.check_inputs(prompts, negatives, height, width, num_inference_steps, num_images_per_prompt,
                          output_type, latents, shape, generator, control_images)
        device = self._execution_device
        control = None
        if control_images is not None:
            control = self._control_hook(
                control_images, len(prompts), num_images_per_prompt, height, width, device, guidance_scale > 1.0,
                num_inference_steps, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                guess_mode, adapter_conditioning_scale, adapter_conditioning_factor,
            )

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
            max_batch_size=max_batch_size, callback=self._step_callback(callback_on_step_end), control=control,
        )

        if output_type == "latent":
            images = latents
        else:
            images = LatentCodec(self.vae).decode(latents)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _control_images(self, image) -> Optional[list]:
        """The control images of each control model (a list per model), or None without control."""
        model = self.controlnet if self.controlnet is not None else self.adapter
        if model is None:
            if image is not None:
                raise LdmError("image= was given but the pipeline has no ControlNet or T2I-Adapter: "
                               "load one with from_pretrained(MODEL, controlnet=...) or adapter=..., or drop image=")
            return None
        kind = "ControlNet" if self.controlnet is not None else "T2I-Adapter"
        if image is None:
            raise LdmError(f"the pipeline has a {kind} but no image= was given: pass the control image "
                           f"(one for all prompts, or one per prompt)")
        count = len(pc.controlnets(model)) if self.controlnet is not None else len(pc.adapters(model))
        return pc.per_model_images(image, count, kind)

    def _control_hook(self, images, num_prompts, num_images_per_prompt, height, width, device, do_cfg, num_inference_steps,
                      controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode,
                      adapter_conditioning_scale, adapter_conditioning_factor):
        """The per-step U-Net arguments of the control model (`sample_cfg`'s `control` hook)."""
        n = len(images)
        if self.controlnet is not None:
            scales = pc.as_list(controlnet_conditioning_scale, n, "controlnet_conditioning_scale", "ControlNet")
            starts, ends = pc.controlnet_guidance_window(control_guidance_start, control_guidance_end, n)
            # A ControlNet trained with global pooling is always run in guess mode (as diffusers does).
            guess_mode = guess_mode or pc.controlnets(self.controlnet)[0].config.global_pool_conditions
            conds = [pc.controlnet_image(self.control_image_processor, one, num_prompts, num_images_per_prompt, height,
                                         width, device, self.controlnet.dtype, do_cfg, guess_mode) for one in images]
            return pc.ControlNetHook(self.controlnet, conds[0] if n == 1 else conds, scales, starts, ends, guess_mode, do_cfg)
        scales = pc.as_list(adapter_conditioning_scale, n, "adapter_conditioning_scale", "T2I-Adapter")
        if not 0.0 <= adapter_conditioning_factor <= 1.0:
            raise LdmError(f"adapter_conditioning_factor must be within [0, 1], got {adapter_conditioning_factor}")
        inputs = [pc.adapter_input(one, height, width, device, self.adapter.dtype) for one in images]
        state = pc.adapter_state(self.adapter, inputs, scales, num_prompts, num_images_per_prompt, do_cfg)
        return pc.AdapterHook(state, int(num_inference_steps * adapter_conditioning_factor))

    def _step_callback(self, callback_on_step_end):
        """Adapt diffusers' `callback_on_step_end(pipe, step, t, kwargs) -> dict` to the loop's callback."""
        if callback_on_step_end is None:
            return None

        def callback(step, t, latents):
            out = callback_on_step_end(self, step, t, {"latents": latents})
            return (out or {}).get("latents")

        return callback


def check_finite_pipeline(pipe, folder) -> None:
    """Refuse a model folder (or a control model given with it) holding NaN/inf weights or scaling factor:
    a diverged run's model samples black images."""
    fix = "its training diverged: use an earlier checkpoint's model or train again with a lower train.learning_rate"
    check_finite_number(pipe.vae.config.scaling_factor, f"{folder}: vae scaling_factor", fix)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            check_finite_module(module, f"{folder}: {name}", fix)

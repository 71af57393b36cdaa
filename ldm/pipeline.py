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

The rest of diffusers' pipeline contract (its tests' `PipelineTesterMixin`): `prompt_embeds` /
`negative_prompt_embeds` in place of prompts, `cross_attention_kwargs` (a LoRA `scale`),
`callback_on_step_end` with `callback_on_step_end_tensor_inputs` (any of
`_callback_tensor_inputs`; a callback may change `pipe._guidance_scale`), custom `timesteps` /
`sigmas`, `clip_skip`, `from_pipe`, a pipeline of only some parts (the text encoder and
tokenizer alone give `encode_prompt`), and `enable_xformers_memory_efficient_attention`.
img2img and inpainting: `ldm.pipeline_img2img`.
"""

import json
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from diffusers import (
    AutoencoderKL, ControlNetModel, DiffusionPipeline, ImagePipelineOutput, MultiAdapter, MultiControlNetModel, SchedulerMixin,
    T2IAdapter, UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm import pipeline_control as pc
from ldm.autoencoder import vae_scale_factor
from ldm.codec import LatentCodec, unscale_latents  # noqa: F401 (unscale_latents: its old home)
from ldm.errors import LdmError
from ldm.finite import check_finite_module, check_finite_number
from ldm.lora import LoraLoading
from ldm.readable import reading
from ldm.model_parts import COMPONENTS, check_components, check_folder_parts_agree, check_model_folder  # noqa: F401
from ldm.sampling import sample_cfg, set_schedule
from ldm.text_encoder import OpenCLIPTextModel, encode_text, tokenize
from ldm.text_lora import scaled_text_lora

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LatentDiffusionPipeline(DiffusionPipeline, LoraLoading):
    """VAE + text encoder (open_clip tower or transformers CLIP) + U-Net + any diffusers scheduler.

    LoRA: `load_lora_weights(DIR)`, `set_adapters`, `fuse_lora`, ... of diffusers' Stable Diffusion
    pipelines (ldm.lora.LoraLoading), on the U-Net and a transformers CLIP text encoder.
    """

    # The ControlNet runs at every step beside the U-Net, so (as in diffusers) it is not in the chain.
    model_cpu_offload_seq = "text_encoder->adapter->unet->vae"
    _optional_components = ["controlnet", "adapter"]
    # What `callback_on_step_end` may ask for, as StableDiffusionPipeline: under guidance
    # "prompt_embeds" is the U-Net's text batch [negative, prompt].
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    CONTROL = ("controlnet", "adapter")

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: Union[OpenCLIPTextModel, CLIPTextModel],
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        controlnet: Optional[Union[ControlNetModel, MultiControlNetModel, list, tuple]] = None,
        adapter: Optional[Union[T2IAdapter, MultiAdapter, list, tuple]] = None,
    ):
        # The annotations are what `from_pipe` matches parts against (diffusers reads them).
        super().__init__()
        # Parts from different trainings fail here with both numbers, not in a matmul mid-sampling.
        # Any part may be None (a pipeline of only the text parts encodes prompts, as diffusers allows).
        check_components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
        controlnet, adapter = pc.wrap_controlnet(controlnet), pc.wrap_adapter(adapter)
        # 8 without a VAE, as StableDiffusionPipeline assumes.
        self.vae_scale_factor = vae_scale_factor(vae) if vae is not None else 8
        if unet is not None:
            pc.check_control_fits(unet, self.vae_scale_factor, controlnet=controlnet, adapter=adapter)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              controlnet=controlnet, adapter=adapter)
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
        with reading(pretrained_model_name_or_path, "a loadable model folder (a part's weights or config file is damaged)",
                     "save the model again with save_pretrained"):
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_finite_pipeline(pipe, pretrained_model_name_or_path)
        return pipe

    @property
    def default_size(self) -> tuple:
        """(height, width) in pixels that the U-Net was built for."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    # The state of a call, read by callbacks (as StableDiffusionPipeline's properties).
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> Optional[int]:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def cross_attention_kwargs(self) -> Optional[dict]:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def enable_xformers_memory_efficient_attention(self, attention_op: Optional[Callable] = None) -> None:
        """xformers' attention in every part (diffusers' method), or a one-line error where it cannot run."""
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            raise LdmError("xformers is not installed: pip install xformers (CUDA only), or keep PyTorch's SDPA attention") from None
        if self._execution_device.type != "cuda":
            raise LdmError(f"xformers attention needs the pipeline on a CUDA GPU, it is on {self._execution_device.type}: "
                           f"call pipe.to('cuda') first, or keep PyTorch's SDPA attention on CPU")
        super().enable_xformers_memory_efficient_attention(attention_op)

    def _text_embeddings(self, prompts: List[str], device, clip_skip: Optional[int] = None) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise LdmError("this pipeline has no text encoder and tokenizer: pass prompt_embeds (and negative_prompt_embeds "
                           "with guidance) from a pipeline that has them, e.g. pipe.encode_prompt(...)")
        return encode_text(self.text_encoder, tokenize(self.tokenizer, prompts, device), clip_skip)

    def encode_prompt(self, prompt, device, num_images_per_prompt: int = 1, do_classifier_free_guidance: Optional[bool] = None,
                      negative_prompt=None, prompt_embeds: Optional[torch.Tensor] = None,
                      negative_prompt_embeds: Optional[torch.Tensor] = None, lora_scale: Optional[float] = None,
                      clip_skip: Optional[int] = None):
        """`StableDiffusionPipeline.encode_prompt`: (prompt_embeds, negative_prompt_embeds), each prompt repeated
        for its images (prompt-major order); the negatives only with `do_classifier_free_guidance` (else None).

        `lora_scale` scales the text encoder's LoRA layers for this call. Called the older way,
        `encode_prompt(prompts, device[, num_images_per_prompt])` (no guidance flag), it returns
        the prompts' embeddings alone.
        """
        with scaled_text_lora(self.text_encoder, lora_scale):
            if prompt_embeds is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds = self._text_embeddings(prompts, device, clip_skip)
            batch = len(prompt_embeds)
            dtype = self.text_encoder.dtype if self.text_encoder is not None else (
                self.unet.dtype if self.unet is not None else prompt_embeds.dtype)
            prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
            if do_classifier_free_guidance is None:
                return prompt_embeds
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
                if negatives is not None and len(negatives) != batch:
                    raise LdmError(f"got {len(negatives)} negative prompts for {batch} prompts: give one per prompt, or one string")
                # No clip_skip for the negatives: StableDiffusionPipeline encodes them with the last layer too.
                negative_prompt_embeds = self._text_embeddings(negatives or [""] * batch, device)
            if do_classifier_free_guidance:
                negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(
                    num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(self, prompts, negatives, height, width, num_inference_steps, num_images_per_prompt,
                     output_type, latents, latent_shape, generator, control_images=None) -> None:
        """Reject bad arguments with one line each, before any work is done."""
        f = self.vae_scale_factor
        if prompts is not None and (not prompts or not all(isinstance(p, str) for p in prompts)):
            raise LdmError("prompt must be a string or a non-empty list of strings")
        if negatives is not None and prompts is not None and len(negatives) != len(prompts):
            raise LdmError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt, or one string")
        if control_images is not None:
            pc.check_control_images(control_images, len(prompts) if prompts is not None else latent_shape[0] // num_images_per_prompt,
                                    height, width, f)
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

    def check_text_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, tensor_inputs) -> None:
        """`StableDiffusionPipeline.check_inputs`' rules for prompts, embeddings and callback inputs, one line each."""
        if prompt is not None and prompt_embeds is not None:
            raise LdmError("give prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise LdmError("give a prompt (or prompt_embeds)")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise LdmError("give negative_prompt or negative_prompt_embeds, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise LdmError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                           f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        unknown = [k for k in tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise LdmError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {unknown}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        max_batch_size: Optional[int] = None,
        image=None,
        controlnet_conditioning_scale: Union[float, List[float]] = 1.0,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
        guess_mode: bool = False,
        adapter_conditioning_scale: Union[float, List[float]] = 1.0,
        adapter_conditioning_factor: float = 1.0,
    ):
        """Generate images for `prompt`; arguments as in `diffusers.StableDiffusionPipeline.__call__`, in its order.

        `prompt_embeds` / `negative_prompt_embeds` replace the prompts (`encode_prompt` makes
        them); `timesteps` or `sigmas` give a custom schedule; `clip_skip` takes the text
        encoder's hidden states that many blocks early; `cross_attention_kwargs` go to the
        U-Net (`{"scale": s}` scales LoRA layers, the text encoder's too).
        `callback_on_step_end(pipe, step, timestep, kwargs)` gets the tensors named in
        `callback_on_step_end_tensor_inputs` and may return new ones; it may also set
        `pipe._guidance_scale` (e.g. `diffusers.callbacks.SDCFGCutoffCallback`). `max_batch_size`
        caps the batch of each U-Net call (the CFG batch is twice the number of images).
        Progress bars: `set_progress_bar_config`.

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
        prompts, negatives, tensor_inputs = self._begin(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale, clip_skip,
            cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_prompts = len(prompts) if prompts is not None else len(prompt_embeds)
        control_images = self._control_images(image)
        default_h, default_w = self.default_size if control_images is None else pc.default_size(control_images, height, width)
        height, width = height or default_h, width or default_w
        f = self.vae_scale_factor
        shape = (num_prompts * num_images_per_prompt, self.unet.config.in_channels, height // f, width // f)
        steps = len(timesteps if timesteps is not None else sigmas if sigmas is not None else range(num_inference_steps))
        self.check_inputs(prompts, negatives, height, width, steps, num_images_per_prompt,
                          output_type, latents, shape, generator, control_images)
        device = self._execution_device
        control = None
        if control_images is not None:
            control = self._control_hook(
                control_images, num_prompts, num_images_per_prompt, height, width, device, guidance_scale > 1.0,
                steps, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                guess_mode, adapter_conditioning_scale, adapter_conditioning_factor,
            )

        # Text: the unconditional embeddings (negative prompt, or "") only when guidance is on.
        prompt_embeds, negative_prompt_embeds = self._encode(
            prompts, negatives, prompt_embeds, negative_prompt_embeds, device, num_images_per_prompt)

        # The schedule, then the noise, drawn as diffusers draws it unless given, at the first noise level.
        schedule = set_schedule(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device)
        init_sigma = getattr(self.scheduler, "init_noise_sigma", None)  # flow matching has none: unit noise
        if init_sigma is not None:
            latents = latents * init_sigma
        latents = self._denoise(latents, schedule, prompt_embeds, negative_prompt_embeds, eta, generator, max_batch_size,
                                callback_on_step_end, tensor_inputs, control=control)
        return self._finish(latents, output_type, return_dict)

    # --- the steps every pipeline of this family shares (img2img and inpainting too) -----------------------

    def _begin(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale, guidance_rescale,
               clip_skip, cross_attention_kwargs, callback_on_step_end, tensor_inputs):
        """Check the text inputs and record the call's state; (prompts, negatives, callback tensor inputs)."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, tensor_inputs)
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) and prompts else negative_prompt
        if isinstance(negatives, str):  # prompt_embeds given: one negative prompt for all of them
            negatives = [negatives] * len(prompt_embeds)
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, guidance_rescale, clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._num_timesteps = 0
        return prompts, negatives, tensor_inputs

    def _encode(self, prompts, negatives, prompt_embeds, negative_prompt_embeds, device, num_images_per_prompt):
        """(prompt_embeds, negative_prompt_embeds or None) for the call, as `encode_prompt` gives them."""
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        return self.encode_prompt(
            prompts, device, num_images_per_prompt, self.do_classifier_free_guidance, negatives,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

    def _denoise(self, latents, schedule, prompt_embeds, negative_prompt_embeds, eta, generator, max_batch_size,
                 callback_on_step_end, tensor_inputs, control=None, blend=None) -> torch.Tensor:
        """The one sampling loop (`ldm.sampling.sample_cfg`) over `schedule`, from `latents` at its first noise level."""
        self._num_timesteps = len(schedule)
        return sample_cfg(
            self.unet, self.scheduler, latents, prompt_embeds, negative_prompt_embeds,
            guidance_scale=self.guidance_scale, num_inference_steps=len(schedule), eta=eta, generator=generator,
            guidance_rescale=self.guidance_rescale, progress=self.progress_bar, max_batch_size=max_batch_size,
            callback=self._step_callback(callback_on_step_end, tensor_inputs), control=control, timesteps=schedule,
            cross_attention_kwargs=self.cross_attention_kwargs, blend=blend,
        )

    def _finish(self, latents, output_type, return_dict):
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

    def _step_callback(self, callback_on_step_end, tensor_inputs=("latents",)):
        """Adapt diffusers' `callback_on_step_end(pipe, step, t, kwargs) -> dict` to the loop's callback.

        The callback sees the tensors it asked for and may replace them, and may change
        `pipe._guidance_scale` (the loop reads it back: at 1 or below guidance stops).
        """
        if callback_on_step_end is None:
            return None

        def callback(step, t, state):
            self._guidance_scale = state["guidance_scale"]
            out = callback_on_step_end(self, step, t, {k: state[k] for k in tensor_inputs}) or {}
            return {**{k: out[k] for k in self._callback_tensor_inputs if k in out}, "guidance_scale": self._guidance_scale}

        return callback


def check_finite_pipeline(pipe, folder) -> None:
    """Refuse a model folder (or a control model given with it) holding NaN/inf weights or scaling factor:
    a diverged run's model samples black images."""
    fix = "its training diverged: use an earlier checkpoint's model or train again with a lower train.learning_rate"
    check_finite_number(pipe.vae.config.scaling_factor, f"{folder}: vae scaling_factor", fix)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            check_finite_module(module, f"{folder}: {name}", fix)

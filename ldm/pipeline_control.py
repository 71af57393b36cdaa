"""Conditional control for `LatentDiffusionPipeline`: ControlNet and T2I-Adapter inputs and residuals.

ControlNet: Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion
Models" (2023), arXiv:2302.05543. T2I-Adapter: Mou et al., "T2I-Adapter: Learning Adapters
to Dig out More Controllable Ability for Text-to-Image Diffusion Models" (2023), arXiv:2302.08453.

Everything here does what diffusers' `StableDiffusionControlNetPipeline` and
`StableDiffusionAdapterPipeline` do (same image preprocessing, same classifier-free-guidance
doubling, same per-step scales), so the same components give the same images. The
sampling loop stays `ldm.sampling.sample_cfg`: a control model only adds U-Net keyword
arguments per step through its `control` hook, built here.

Checks raise a one-line `LdmError` before any sampling: a control model made for another
base model (at construction), and control images that are missing, unexpected, too many
or too few, or of the wrong size (at call).
"""

from typing import List, Optional

import numpy as np
import PIL.Image
import torch
from diffusers import ControlNetModel, MultiAdapter, MultiControlNetModel, T2IAdapter
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image

from ldm.errors import LdmError


# --- the models -----------------------------------------------------------------------------

def wrap_controlnet(controlnet):
    """A list or tuple of ControlNets becomes one `MultiControlNetModel` (as diffusers' pipeline does)."""
    if isinstance(controlnet, (list, tuple)):
        return controlnet[0] if len(controlnet) == 1 else MultiControlNetModel(list(controlnet))
    return controlnet


def wrap_adapter(adapter):
    """A list or tuple of T2I-Adapters becomes one `MultiAdapter`."""
    if isinstance(adapter, (list, tuple)):
        return adapter[0] if len(adapter) == 1 else MultiAdapter(list(adapter))
    return adapter


def controlnets(controlnet) -> list:
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def adapters(adapter) -> list:
    return list(adapter.adapters) if isinstance(adapter, MultiAdapter) else [adapter]


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _differs(what: str, key: str, mine, unet_key: str, theirs) -> LdmError:
    return LdmError(
        f"the {what} was made for another base model: its {key} is {mine} but the U-Net's {unet_key} is {theirs}: "
        f"use a {what} trained on this model's U-Net"
    )


def adapter_feature_channels(config) -> list:
    """Channels of a T2I-Adapter's features, one per U-Net down block (a light adapter adds a last one)."""
    channels = list(config.channels)
    return channels + channels[-1:] if config.adapter_type == "light_adapter" else channels


def check_control_fits(unet, vae_factor: int, controlnet=None, adapter=None) -> None:
    """A ControlNet (or T2I-Adapter) must share the U-Net's shapes; name both numbers if not."""
    if controlnet is not None and adapter is not None:
        raise LdmError("give a controlnet or an adapter, not both")
    u = unet.config
    for i, net in enumerate(controlnets(controlnet) if controlnet is not None else []):
        what = "ControlNet" if not isinstance(controlnet, MultiControlNetModel) else f"ControlNet {i}"
        if not isinstance(net, ControlNetModel):
            raise LdmError(f"controlnet must be a diffusers ControlNetModel (or a list of them), got {type(net).__name__}")
        c = net.config
        for key in ("in_channels", "cross_attention_dim", "block_out_channels"):
            mine, theirs = _listed(c[key]), _listed(u[key])  # a config read from JSON holds lists, a built one tuples
            if mine != theirs:
                raise _differs(what, key, mine, key, theirs)
        # The conditioning embedding brings the control image down to the latent size.
        down = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
        if down != vae_factor:
            raise LdmError(
                f"the {what} downsamples its control image {down}x (conditioning_embedding_out_channels "
                f"{list(c.conditioning_embedding_out_channels)}) but the VAE's scale factor is {vae_factor}: "
                f"use a ControlNet trained on this model"
            )
    for i, ad in enumerate(adapters(adapter) if adapter is not None else []):
        what = "T2I-Adapter" if not isinstance(adapter, MultiAdapter) else f"T2I-Adapter {i}"
        if not isinstance(ad, T2IAdapter):
            raise LdmError(f"adapter must be a diffusers T2IAdapter (or a list of them), got {type(ad).__name__}")
        features = adapter_feature_channels(ad.config)
        if features != list(u.block_out_channels):
            raise LdmError(
                f"the {what} was made for another base model: it gives features of {features} channels "
                f"({ad.config.adapter_type}, channels {list(ad.config.channels)}) but the U-Net's block_out_channels "
                f"are {list(u.block_out_channels)}: use a T2I-Adapter trained on this model's U-Net"
            )
        if ad.config.downscale_factor != vae_factor:
            raise LdmError(
                f"the {what} was made for another base model: its downscale_factor is {ad.config.downscale_factor} "
                f"but the VAE's scale factor is {vae_factor}: use a T2I-Adapter trained on this model"
            )


# --- the images -------------------------------------------------------------------------------

def split_images(image, name: str = "image") -> list:
    """One image or a batch (PIL, numpy HWC/NHWC, tensor CHW/NCHW, or a list of them) as a list of single images."""
    if isinstance(image, PIL.Image.Image):
        return [image]
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim == 4:
            return list(image)
        if image.ndim == 3:
            return [image]
        raise LdmError(f"{name} has {image.ndim} dimensions: give an image (HWC array, CHW tensor) or a batch of them")
    if isinstance(image, (list, tuple)) and image:
        if any(isinstance(i, (list, tuple)) for i in image):
            raise LdmError(f"{name} is a nested list: give one image, or a list of one image per prompt")
        return [one for i in image for one in split_images(i, name)]
    raise LdmError(f"{name} must be a PIL image, a numpy array, a torch tensor, or a non-empty list of them; got {type(image).__name__}")


def image_size(image) -> tuple:
    """(height, width) of one image."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return tuple(image.shape[:2])  # HWC, as diffusers' image processor reads numpy images
    return tuple(image.shape[-2:])  # CHW


def per_model_images(image, num_models: int, kind: str) -> List[list]:
    """The images of each control model: `image` itself for one model, `image[k]` for model k of several."""
    if num_models == 1:
        return [split_images(image)]
    if isinstance(image, (list, tuple)) and any(isinstance(i, (list, tuple)) for i in image):
        # As diffusers: a nested list is per prompt, each inner list one image per model.
        if not all(isinstance(i, (list, tuple)) and len(i) == num_models for i in image):
            raise LdmError(
                f"a nested image list holds, for each prompt, one image per {kind}: every inner list needs "
                f"{num_models} images"
            )
        image = [list(t) for t in zip(*image)]
    if not isinstance(image, (list, tuple)) or len(image) != num_models:
        got = len(image) if isinstance(image, (list, tuple)) else 1
        raise LdmError(
            f"got {got} image entries for {num_models} {kind}s: give a list of one image per {kind}, or (one per "
            f"prompt) a list of such lists"
        )
    return [split_images(one, f"image[{k}]") for k, one in enumerate(image)]


def default_size(images: List[list], height: Optional[int], width: Optional[int]) -> tuple:
    """As diffusers' control pipelines: a height or width not given is the (first) control image's."""
    h, w = image_size(images[0][0])
    return height or h, width or w


def check_control_images(images: List[list], num_prompts: int, height: int, width: int, vae_factor: int) -> None:
    """Each control model gets one image for all prompts or one per prompt, each of the images' size."""
    for k, batch in enumerate(images):
        which = "" if len(images) == 1 else f" for control model {k}"
        if len(batch) not in (1, num_prompts):
            raise LdmError(
                f"got {len(batch)} control images{which} for {num_prompts} prompts: give one image for all prompts, "
                f"or one per prompt"
            )
        for i, one in enumerate(batch):
            h, w = image_size(one)
            if (h, w) != (height, width):
                raise LdmError(
                    f"control image {i}{which} is {h}x{w} (height x width) but the images to make are "
                    f"{height}x{width}: give control images of {height}x{width}, or set height and width to theirs"
                )
    if height % vae_factor or width % vae_factor:
        raise LdmError(
            f"the control images are {height}x{width}, not multiples of {vae_factor} (the VAE's scale factor): "
            f"resize them, e.g. to {height // vae_factor * vae_factor}x{width // vae_factor * vae_factor}"
        )


def batch_of(images: list):
    """A list of single images in the form diffusers' preprocessors take (list of PIL, NHWC array, NCHW tensor)."""
    if isinstance(images[0], np.ndarray):
        return np.stack(images)
    if isinstance(images[0], torch.Tensor):
        return torch.stack(images)
    return images


def per_image(x: torch.Tensor, num_prompts: int, num_images_per_prompt: int) -> torch.Tensor:
    """One row per image to make (prompt-major): one given image for all, or each prompt's for its images."""
    if len(x) == 1:
        return x.repeat_interleave(num_prompts * num_images_per_prompt, dim=0)
    return x.repeat_interleave(num_images_per_prompt, dim=0)


def as_list(value, n: int, name: str, kind: str) -> list:
    """A float for all control models, or a list of one per model."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise LdmError(f"{name} has {len(value)} values for {n} {kind}s: give one number, or one per {kind}")
        return [float(v) for v in value]
    return [float(value)] * n


# --- ControlNet -------------------------------------------------------------------------------

def controlnet_image(processor, images: list, num_prompts: int, num_images_per_prompt: int, height: int, width: int,
                     device, dtype, do_cfg: bool, guess_mode: bool) -> torch.Tensor:
    """`StableDiffusionControlNetPipeline.prepare_image`: [0, 1] RGB (no normalisation), a row per image, doubled for CFG."""
    x = processor.preprocess(batch_of(images), height=height, width=width).to(dtype=torch.float32)
    x = per_image(x, num_prompts, num_images_per_prompt).to(device=device, dtype=dtype)
    # In guess mode the ControlNet sees only the conditional half of the batch.
    return torch.cat([x] * 2) if do_cfg and not guess_mode else x


def controlnet_guidance_window(start, end, n: int) -> tuple:
    """control_guidance_start / _end as lists of one per ControlNet, checked."""
    if not isinstance(start, (list, tuple)) and isinstance(end, (list, tuple)):
        start = [start] * len(end)
    elif not isinstance(end, (list, tuple)) and isinstance(start, (list, tuple)):
        end = [end] * len(start)
    starts = as_list(start, n, "control_guidance_start", "ControlNet")
    ends = as_list(end, n, "control_guidance_end", "ControlNet")
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise LdmError(f"control_guidance_start {s} and control_guidance_end {e}: need 0 <= start < end <= 1")
    return starts, ends


class ControlNetHook:
    """The `control` hook of `sample_cfg` for a ControlNet (or several): its residuals at each step.

    As in `StableDiffusionControlNetPipeline`: at step i of n, ControlNet k is scaled by
    `scale_k` while `start_k <= i/n` and `(i+1)/n <= end_k`, else by 0. In guess mode the
    ControlNet runs on the conditional half only, and the unconditional half gets zeros.
    """

    def __init__(self, controlnet, image, scales, starts, ends, guess_mode: bool, do_cfg: bool):
        self.controlnet, self.image = controlnet, image
        self.multi = isinstance(controlnet, MultiControlNetModel)
        self.scales, self.starts, self.ends = scales, starts, ends
        self.guess_mode, self.do_cfg = guess_mode, do_cfg

    def __call__(self, step: int, num_steps: int, t, x: torch.Tensor, embeds: torch.Tensor) -> dict:
        keeps = [1.0 - float(step / num_steps < s or (step + 1) / num_steps > e) for s, e in zip(self.starts, self.ends)]
        scale = [c * k for c, k in zip(self.scales, keeps)] if self.multi else self.scales[0] * keeps[0]
        half = self.guess_mode and self.do_cfg
        down, mid = self.controlnet(
            x.chunk(2)[1] if half else x, t, encoder_hidden_states=embeds.chunk(2)[1] if half else embeds,
            controlnet_cond=self.image, conditioning_scale=scale, guess_mode=self.guess_mode, return_dict=False,
        )
        if half:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


# --- T2I-Adapter ------------------------------------------------------------------------------

def adapter_input(images: list, height: int, width: int, device, dtype) -> torch.Tensor:
    """`StableDiffusionAdapterPipeline`'s preprocessing: PIL resized (Lanczos) and / 255, tensors as given; [0, 1]."""
    batch = batch_of(images)
    if isinstance(batch, np.ndarray):  # diffusers takes no numpy here; read it as its image processor does (NHWC in [0, 1])
        batch = torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32))
    return _preprocess_adapter_image(batch, height, width).to(device=device, dtype=dtype)


def adapter_state(adapter, inputs: list, scales: list, num_prompts: int, num_images_per_prompt: int, do_cfg: bool) -> list:
    """The adapter's features, scaled, one row per image to make, doubled for CFG (computed once, before the loop)."""
    if isinstance(adapter, MultiAdapter):
        state = adapter(inputs, scales)  # the weighted sum of the adapters' features
    else:
        state = [v * scales[0] for v in adapter(inputs[0])]
    state = [per_image(v, num_prompts, num_images_per_prompt) for v in state]
    return [torch.cat([v] * 2, dim=0) for v in state] if do_cfg else state


class AdapterHook:
    """The `control` hook of `sample_cfg` for a T2I-Adapter: the same features at each of the first steps.

    `active_steps` = int(num_inference_steps * adapter_conditioning_factor), as in
    diffusers' `StableDiffusionXLAdapterPipeline`; the U-Net consumes the list it is given.
    """

    def __init__(self, state: list, active_steps: int):
        self.state, self.active_steps = state, active_steps

    def __call__(self, step: int, num_steps: int, t, x, embeds) -> Optional[dict]:
        if step >= self.active_steps:
            return None
        return {"down_intrablock_additional_residuals": [v.clone() for v in self.state]}

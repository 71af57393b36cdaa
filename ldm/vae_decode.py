"""Decode latents with the VAE without NaN/inf images in half precision.

The KL-VAE decoder's activations can exceed fp16's range (65504): Stable Diffusion's VAE
is known to overflow to inf and then NaN in fp16, giving black images. diffusers' answer
(SDXL pipelines, `needs_upcasting`) is a `force_upcast` flag in the VAE config: an fp16
VAE with it set always decodes in float32. We do that, and also check every reduced-
precision decode and redo it in float32 when it came out non-finite, so a VAE without
the flag (or a bf16 one that hit an overflow) still gives a picture.
"""

import warnings
from contextlib import contextmanager

import torch


def needs_upcasting(vae) -> bool:
    """diffusers' rule: an fp16 VAE whose config says `force_upcast` decodes in float32."""
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


@contextmanager
def in_float32(vae):
    """The VAE in float32 for the block, then back in its own dtype (it may be shared, e.g. by training)."""
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(dtype)


def decode_float32(vae, z: torch.Tensor) -> torch.Tensor:
    # Autocast (training's validation runs under it) would cast the convolutions back to half.
    with in_float32(vae), torch.autocast(z.device.type, enabled=False):
        return vae.decode(z.float(), return_dict=False)[0]


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] from unscaled latents `z`; finite whenever a float32 decode is."""
    if needs_upcasting(vae):
        return decode_float32(vae, z)
    images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    if vae.dtype != torch.float32 and not torch.isfinite(images).all():
        warnings.warn(f"the VAE decode in {vae.dtype} gave NaN/inf values; decoding again in float32", stacklevel=2)
        images = decode_float32(vae, z)
    return images

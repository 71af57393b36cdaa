"""Stage 2 model: build the text-conditioned latent U-Net and pick its attention kernel."""

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from ldm.errors import LdmError

BACKENDS = ("sdpa", "xformers")


def build_unet(cfg, sample_size: int, latent_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """A `UNet2DConditionModel` from a `UNetModelConfig` for latents of the given size."""
    if len(cfg.down_block_types) != len(cfg.block_out_channels) or len(cfg.up_block_types) != len(cfg.block_out_channels):
        raise LdmError(
            "model.down_block_types, model.up_block_types and model.block_out_channels must have the same length"
        )
    if cfg.cross_attention_dim is not None and cfg.cross_attention_dim != cross_attention_dim:
        raise LdmError(
            f"the text encoder's width is {cross_attention_dim} but model.cross_attention_dim is "
            f"{cfg.cross_attention_dim}: set model.cross_attention_dim={cross_attention_dim} or pick a matching text encoder"
        )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
    )
    set_attention_backend(unet, cfg.attention_backend)
    return unet


def set_attention_backend(unet, backend: str) -> None:
    """PyTorch SDPA (default), or xformers' memory-efficient attention on CUDA."""
    if backend not in BACKENDS:
        raise LdmError(f"unknown attention backend '{backend}': use one of {BACKENDS}")
    if backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
        return
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise LdmError("attention_backend=xformers but xformers is not installed: pip install '.[xformers]' or use sdpa") from None
    if not torch.cuda.is_available():
        raise LdmError("attention_backend=xformers needs a CUDA GPU; use attention_backend=sdpa on CPU")
    unet.enable_xformers_memory_efficient_attention()

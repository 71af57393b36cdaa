"""The trained part of the control stage: a ControlNet or a T2I-Adapter fitted to a base U-Net.

ControlNet (Zhang, Rao & Agrawala 2023, arXiv:2302.05543) copies the U-Net's encoder and
middle block (`diffusers.ControlNetModel.from_unet`, weights included) and feeds their
outputs back through zero-initialised convolutions, so training starts from the base
model's behaviour. Its conditioning embedding downsamples the control image to the
latent size: one stride-2 convolution per halving, so a VAE with factor f needs
log2(f) + 1 embedding widths.

T2I-Adapter (Mou et al. 2023, arXiv:2302.08453) is a small separate network whose
features, one per U-Net down block at that block's resolution and width, are added
inside the down blocks (`down_intrablock_additional_residuals`). Its pixel-unshuffle
takes the control image straight to the latent size: `downscale_factor` = the VAE factor.
"""

import math
from pathlib import Path

from diffusers import ControlNetModel, T2IAdapter

from ldm.errors import LdmError

KINDS = ("controlnet", "t2i_adapter")
ADAPTER_TYPES = ("full_adapter", "light_adapter")
# ControlNet's conditioning-embedding widths in Stable Diffusion (factor 8); a smaller VAE factor uses the first ones.
SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def check_control_config(cfg) -> None:
    """Reject a bad `ControlModelConfig` before anything is built."""
    if cfg.kind not in KINDS:
        raise LdmError(f"control.kind must be one of {', '.join(KINDS)}, got '{cfg.kind}'")
    if cfg.adapter_type not in ADAPTER_TYPES:
        raise LdmError(f"control.adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got '{cfg.adapter_type}'")
    if not 0.0 <= cfg.conditioning_dropout <= 1.0:
        raise LdmError(f"control.conditioning_dropout is a probability, got {cfg.conditioning_dropout}")
    if cfg.init_from is not None and not (Path(cfg.init_from) / "config.json").is_file():
        raise LdmError(
            f"control.init_from={cfg.init_from} is not a ControlNet/T2I-Adapter folder (no config.json): "
            "give a folder written by train_control.py (runs/NAME/final) or null to start from the base U-Net"
        )


def embedding_channels(vae_factor: int) -> tuple:
    """ControlNet conditioning-embedding widths that downsample by `vae_factor`."""
    halvings = int(math.log2(vae_factor))
    if 2 ** halvings != vae_factor:
        raise LdmError(f"the VAE's downsampling factor {vae_factor} is not a power of 2: ControlNet's embedding halves")
    if halvings + 1 <= len(SD_EMBEDDING_CHANNELS):
        return SD_EMBEDDING_CHANNELS[: halvings + 1]
    return SD_EMBEDDING_CHANNELS + (SD_EMBEDDING_CHANNELS[-1],) * (halvings + 1 - len(SD_EMBEDDING_CHANNELS))


def build_control_model(cfg, unet, vae_factor: int):
    """A ControlNet initialised from `unet` or a fresh T2I-Adapter fitted to it (or `cfg.init_from`)."""
    check_control_config(cfg)
    if cfg.kind == "controlnet":
        if cfg.init_from is not None:
            return ControlNetModel.from_pretrained(cfg.init_from)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels(vae_factor))
    if cfg.init_from is not None:
        return T2IAdapter.from_pretrained(cfg.init_from)
    return T2IAdapter(
        in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=cfg.num_res_blocks,
        downscale_factor=vae_factor, adapter_type=cfg.adapter_type,
    )

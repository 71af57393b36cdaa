"""Stage 1 model: build the KL autoencoder and measure its latent statistics.

The latent scaling factor is a property of a trained VAE on its data, not a constant:
Rombach et al. (2022, sec. 4 / appendix G) rescale latents to unit variance with
1 / std measured on the training set. We measure it over many samples (one batch is
too noisy) and store it in the VAE's own config, where the U-Net trainer and the
pipeline read it (`vae.config.scaling_factor`). `latents_mean` / `latents_std`
optionally hold a per-channel shift and scale.
"""

from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL

from ldm.codec import LatentCodec
from ldm.errors import LdmError
from ldm.finite import check_finite_module, check_finite_number
from ldm.model_parts import read_json
from ldm.readable import reading


def build_vae(cfg, sample_size: int) -> AutoencoderKL:
    """An `AutoencoderKL` from a `VAEModelConfig`; factor 2 ** (levels - 1)."""
    levels = len(cfg.block_out_channels)
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        raise LdmError(
            f"model.block_out_channels {list(cfg.block_out_channels)} must all be divisible by "
            f"model.norm_num_groups={cfg.norm_num_groups}"
        )
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
    )


def downsampling_factor(block_out_channels) -> int:
    """Pixels per latent along one side for a VAE with these levels (one halving between levels)."""
    return 2 ** (len(block_out_channels) - 1)


def vae_scale_factor(vae) -> int:
    """Pixels per latent along one side (8 for Stable Diffusion's VAE)."""
    return downsampling_factor(vae.config.block_out_channels)


@torch.no_grad()
def measure_latent_stats(vae, batches: Iterable[torch.Tensor], num_samples: int, per_channel: bool = False):
    """Scaling factor 1 / std of posterior samples over `num_samples` images in [-1, 1].

    Returns a dict of config entries: `scaling_factor`, and with `per_channel` the
    `latents_mean` / `latents_std` lists diffusers' AutoencoderKL config also carries.
    """
    codec = LatentCodec(vae)
    latents, seen = [], 0
    for images in batches:
        images = images[: num_samples - seen]
        latents.append(codec.sample(*codec.encode(images)).float().cpu())  # unscaled: this measures the scale
        seen += len(images)
        if seen >= num_samples:
            break
    if not latents:
        raise LdmError("no images to measure the latent scaling factor on: is the data set empty?")
    if len({z.shape[1:] for z in latents}) > 1:  # aspect-ratio buckets: per channel, every latent pixel of every shape
        z = torch.cat([z.transpose(0, 1).flatten(1) for z in latents], dim=1).T[:, :, None, None]
    else:
        z = torch.cat(latents)
    stats = {"scaling_factor": float(1.0 / z.std())}
    if per_channel:
        stats["latents_mean"] = z.mean(dim=(0, 2, 3)).tolist()
        stats["latents_std"] = z.std(dim=(0, 2, 3)).tolist()
    return stats


def load_vae(path) -> AutoencoderKL:
    """Load a stage-1 VAE folder and check that it carries a measured scaling factor."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise LdmError(f"no VAE at {path}: expected a diffusers AutoencoderKL folder with config.json (train one with train_vae.py)")
    values = read_json(config)
    if "scaling_factor" not in values:
        raise LdmError(
            f"the VAE at {path} has no latent scaling_factor in config.json: "
            "train it with train_vae.py, which measures and stores it"
        )
    fix = "its training diverged; train it again (lower train.learning_rate) or use another VAE"
    for key in ("scaling_factor", "latents_mean", "latents_std"):
        if values.get(key) is not None:
            check_finite_number(values[key], f"the VAE at {path}: {key} in config.json", fix)
    with reading(path, "a loadable AutoencoderKL folder (its weights or config file is damaged)", "train or save it again"):
        vae = AutoencoderKL.from_pretrained(str(path))
    check_finite_module(vae, f"the VAE at {path}", fix)
    return vae

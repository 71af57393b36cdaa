"""The latent codec: pixels <-> the unit-variance latents the U-Net models.

After edm2's `training/encoders.py` (Karras et al. 2024): one object owns the way down
(encode to the VAE posterior q(z|x), draw a sample from it, scale it) and the way back
(unscale, decode), so that training, `ldm-cache` and the pipeline cannot disagree about
the latent space. The scaling is read from the VAE's config (Rombach et al. 2022,
sec. 4.3: z * scaling_factor with the factor measured on the data), never a literal;
per-channel `latents_mean` / `latents_std` (SDXL-style) or `shift_factor` (SD3-style)
are applied when the VAE carries them.
"""

from typing import Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from ldm.vae_decode import decode_latents


def _channels(values, like: torch.Tensor) -> torch.Tensor:
    # Through float64 (which holds a Python float exactly): float32 gets what it always got,
    # float64 latents get the config's values without a float32 rounding.
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1).to(like)


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE posterior samples -> the unit-variance space the U-Net models (inverse: `unscale_latents`)."""
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = _channels(cfg.latents_mean, z)
        std = _channels(cfg.latents_std, z)
        return (z - mean) * cfg.scaling_factor / std
    shift = getattr(cfg, "shift_factor", None)
    return (z - shift if shift is not None else z) * cfg.scaling_factor


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent scaling the U-Net was trained with, as read from the VAE's config.

    Per-channel `latents_mean`/`latents_std` when set (SDXL-style), else divide by
    `scaling_factor` and add `shift_factor` when set (SD3-style).
    """
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = _channels(cfg.latents_mean, latents)
        std = _channels(cfg.latents_std, latents)
        return latents * std / cfg.scaling_factor + mean
    latents = latents / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    return latents + shift if shift is not None else latents


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, generator=None) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I): a sample of the diagonal Gaussian posterior.

    The noise is drawn exactly as diffusers' `DiagonalGaussianDistribution.sample` draws
    it (one `randn_tensor` of the mean's shape, dtype and device), so a posterior read
    back from an `ldm-cache` folder gives the same sample as the encoder's own, draw for
    draw, and a cached run follows the uncached run's random stream.
    """
    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


class LatentCodec:
    """A frozen VAE seen as a codec: `encode` / `sample` / `scale` down, `unscale` / `decode` back."""

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the posterior q(z|x) of images in [-1, 1], in the VAE's dtype."""
        posterior = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    @staticmethod
    def sample(mean: torch.Tensor, std: torch.Tensor, generator=None) -> torch.Tensor:
        """A posterior sample, unscaled (see `posterior_sample`)."""
        return posterior_sample(mean, std, generator)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return scale_latents(self.vae, z)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return unscale_latents(self.vae, latents)

    def encode_latents(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Images -> scaled latent samples: what the U-Net trains on."""
        return self.scale(self.sample(*self.encode(pixels), generator=generator))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1] (half-precision-safe, see `ldm.vae_decode`)."""
        return decode_latents(self.vae, self.unscale(latents))

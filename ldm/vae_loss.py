"""The stage-1 loss: reconstruction + kl_weight * KL(q(z|x) || N(0, I)).

Rombach et al. (2022, appendix G) train the autoencoder with a perceptual loss, a
patch discriminator and a very small KL weight: the KL term only keeps the latent
space from drifting to arbitrary scales, it is not a VAE's ELBO. Here the
reconstruction is a per-pixel mean and the KL is summed over latent elements (mean
over the batch), so kl_weight is relative to one pixel's error. The discriminator
and LPIPS come later and add terms to `vae_loss`.
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ldm.errors import LdmError

RECONSTRUCTIONS = ("l1", "l2")


def check_loss_config(cfg) -> None:
    """Reject a bad `VAELossConfig` before any training starts."""
    if cfg.reconstruction not in RECONSTRUCTIONS:
        raise LdmError(f"loss.reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got '{cfg.reconstruction}'")
    if cfg.kl_weight < 0:
        raise LdmError(f"loss.kl_weight must be 0 or more, got {cfg.kl_weight}")


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error per pixel."""
    if kind == "l1":
        return F.l1_loss(x_hat.float(), x.float())
    if kind == "l2":
        return F.mse_loss(x_hat.float(), x.float())
    raise LdmError(f"loss.reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got '{kind}'")


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, posterior, cfg) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(total loss, its detached parts) for images x, reconstructions x_hat and q(z|x)."""
    rec = reconstruction_loss(x, x_hat, cfg.reconstruction)
    kl = posterior.kl().float().mean()  # diffusers sums over (C, H, W) per example
    loss = rec + cfg.kl_weight * kl
    return loss, {"rec_loss": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1]."""
    mse = ((x_hat.float().clamp(-1, 1) - x.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))

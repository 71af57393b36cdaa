"""The stage-1 loss (Rombach et al. 2022, appendix G; Esser et al. 2021):

    nll  = mean |x - x_hat|  (or squared)  +  perceptual_weight * LPIPS(x, x_hat)
    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) + lambda * discriminator_weight * g_loss

with g_loss = -mean D(x_hat) and lambda the adaptive weight from the gradient norms at
the decoder's last layer (`ldm.discriminator.adaptive_weight`), 0 before
loss.discriminator_start. The discriminator itself learns from `discriminator_loss`.

The KL term only keeps the latent space from drifting to arbitrary scales, it is not a
VAE's ELBO. Here the reconstruction is a per-pixel mean and the KL is summed over latent
elements (mean over the batch), so kl_weight is relative to one pixel's error; LDM sums
the pixel error per image instead, so LDM's kl_weight equals ours times the number of
pixel values (3 x H x W). The perceptual and adversarial terms scale with the
reconstruction term, so their weights mean the same in both.
"""

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ldm.discriminator import DISCRIMINATOR_LOSSES, adaptive_weight, generator_loss
from ldm.errors import LdmError

RECONSTRUCTIONS = ("l1", "l2")


def check_loss_config(cfg) -> None:
    """Reject a bad `VAELossConfig` before any training starts (file paths included)."""
    if cfg.reconstruction not in RECONSTRUCTIONS:
        raise LdmError(f"loss.reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got '{cfg.reconstruction}'")
    for key in ("kl_weight", "perceptual_weight", "discriminator_weight"):
        if getattr(cfg, key) < 0:
            raise LdmError(f"loss.{key} must be 0 or more, got {getattr(cfg, key)}")
    if cfg.discriminator_loss not in DISCRIMINATOR_LOSSES:
        names = ", ".join(DISCRIMINATOR_LOSSES)
        raise LdmError(f"loss.discriminator_loss must be one of {names}, got '{cfg.discriminator_loss}'")
    if cfg.discriminator_start is not None and cfg.discriminator_start < 0:
        raise LdmError(f"loss.discriminator_start must be 0 or more (or null: no discriminator), got {cfg.discriminator_start}")
    for key in ("discriminator_layers", "discriminator_channels"):
        if getattr(cfg, key) < 1:
            raise LdmError(f"loss.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.discriminator_learning_rate is not None and cfg.discriminator_learning_rate <= 0:
        raise LdmError(
            f"loss.discriminator_learning_rate must be positive (or null: train.learning_rate), got {cfg.discriminator_learning_rate}"
        )
    if cfg.perceptual_weight > 0:
        check_lpips_files(cfg)


def check_lpips_files(cfg) -> None:
    """LPIPS needs two local weight files; nothing is downloaded."""
    for key, what in (
        ("lpips_vgg_weights", "torchvision's VGG16 ImageNet weights, vgg16-397923af.pth"),
        ("lpips_linear_weights", "the LPIPS v0.1 linear layers, lpips/weights/v0.1/vgg.pth"),
    ):
        path = getattr(cfg, key)
        if path is None:
            raise LdmError(
                f"loss.perceptual_weight={cfg.perceptual_weight} needs loss.{key}: a local copy of {what} "
                "(nothing is downloaded), or set loss.perceptual_weight=0"
            )
        if not Path(path).is_file():
            raise LdmError(f"loss.{key}: no file at {path} (it should be {what})")


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error per pixel."""
    if kind == "l1":
        return F.l1_loss(x_hat.float(), x.float())
    if kind == "l2":
        return F.mse_loss(x_hat.float(), x.float())
    raise LdmError(f"loss.reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got '{kind}'")


def vae_loss(
    x: torch.Tensor, x_hat: torch.Tensor, posterior, cfg, lpips=None,
    logits_fake: Optional[torch.Tensor] = None, last_layer: Optional[torch.Tensor] = None, grad_scale: float = 1.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(the autoencoder's total loss, its detached parts) for images x, reconstructions x_hat, q(z|x).

    lpips: the `LPIPS` module when cfg.perceptual_weight > 0. logits_fake: the
    discriminator's logits on x_hat while it is on (None before discriminator_start);
    last_layer: the decoder's last weight, where the adaptive weight is measured
    (grad_scale: see `adaptive_weight`).
    """
    rec = reconstruction_loss(x, x_hat, cfg.reconstruction)
    parts = {"rec_loss": rec.detach()}
    nll = rec
    if cfg.perceptual_weight > 0:
        perceptual = lpips(x.float(), x_hat.float()).mean()
        nll = nll + cfg.perceptual_weight * perceptual
        parts["perceptual"] = perceptual.detach()
    kl = posterior.kl().float().mean()  # diffusers sums over (C, H, W) per example
    loss = nll + cfg.kl_weight * kl
    parts["kl"] = kl.detach()
    if logits_fake is not None:
        g_loss = generator_loss(logits_fake.float())
        d_weight = adaptive_weight(nll, g_loss, last_layer, grad_scale) * cfg.discriminator_weight
        loss = loss + d_weight * g_loss
        parts.update(g_loss=g_loss.detach(), d_weight=d_weight)
    return loss, parts


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, cfg) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(the discriminator's loss, its detached parts) from its logits on images and reconstructions."""
    loss = DISCRIMINATOR_LOSSES[cfg.discriminator_loss](logits_real.float(), logits_fake.float())
    return loss, {"disc_loss": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                  "logits_fake": logits_fake.detach().float().mean()}

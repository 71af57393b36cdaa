"""The noise every objective adds: Gaussian, optionally with offset noise."""

import torch


def sample_noise(z0: torch.Tensor, offset: float = 0.0, generator=None) -> torch.Tensor:
    """eps ~ N(0, I), plus `offset` * a per-(example, channel) constant N(0, 1) (offset noise).

    Plain Gaussian noise barely touches an image's mean, so a model trained on it cannot
    make images much darker or brighter than average; a shared per-channel offset
    (Guttenberg 2023) lets it learn the low frequencies too. The offset is part of the
    noise, so the epsilon target includes it.
    """
    eps = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    if offset > 0:
        b, c = z0.shape[:2]
        eps = eps + offset * torch.randn((b, c, 1, 1), generator=generator, device=z0.device, dtype=z0.dtype)
    return eps

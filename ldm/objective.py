"""The stage-2 training objective: noise the latents, pick the target, drop captions.

Notation of Ho et al. (2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with
abar_t the cumulative product of (1 - beta) up to step t. The noise schedule itself is
diffusers' `DDPMScheduler`, so training and the samplers read the same betas.
"""

from typing import List, Optional, Sequence

import torch
from diffusers import DDPMScheduler

from ldm.errors import LdmError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def build_noise_scheduler(cfg) -> DDPMScheduler:
    """The training noise schedule from an `ObjectiveConfig`; checks its names first."""
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise LdmError(f"objective.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got '{cfg.prediction_type}'")
    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise LdmError(f"objective.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got '{cfg.beta_schedule}'")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        raise LdmError(f"objective.caption_dropout is a probability, got {cfg.caption_dropout}")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        raise LdmError(f"objective.min_snr_gamma must be positive (5.0 in the paper) or null, got {cfg.min_snr_gamma}")
    if cfg.num_train_timesteps < 1:
        raise LdmError(f"objective.num_train_timesteps must be at least 1, got {cfg.num_train_timesteps}")
    if cfg.offset_noise < 0:
        raise LdmError(f"objective.offset_noise must be 0 (off) or more (0.1 is usual), got {cfg.offset_noise}")
    if cfg.rescale_zero_terminal_snr and cfg.prediction_type != "v_prediction":
        # At SNR 0, x_T holds no signal: x_0 cannot be recovered from an epsilon prediction
        # (the sampler divides by sqrt(abar_T) = 0). Lin et al. 2024, sec. 3.2.
        raise LdmError(
            f"objective.rescale_zero_terminal_snr needs objective.prediction_type=v_prediction "
            f"(got '{cfg.prediction_type}'): with zero terminal SNR, x_0 cannot be recovered from a noise prediction"
        )
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        # Latents have unit variance, not the [-1, 1] range of pixels: never clip x_0 to it
        # (DDPMScheduler clips by default, and samplers built from this config inherit it).
        clip_sample=False,
        # Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar_t) so that abar_T = 0.
        rescale_betas_zero_snr=cfg.rescale_zero_terminal_snr,
    )


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE posterior samples -> the unit-variance space the U-Net models.

    z * scaling_factor, with the factor measured on the data and read from the VAE's
    config (Rombach et al. 2022, sec. 4.3), never a literal. Per-channel
    `latents_mean` / `latents_std` (SDXL-style) or `shift_factor` (SD3-style) are applied
    when a VAE carries them. The exact inverse of `ldm.pipeline.unscale_latents`.
    """
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
        return (z - mean) * cfg.scaling_factor / std
    shift = getattr(cfg, "shift_factor", None)
    return (z - shift if shift is not None else z) * cfg.scaling_factor


def sample_timesteps(scheduler: DDPMScheduler, batch_size: int, device=None, generator=None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, one per example (Ho et al. 2020, Algorithm 1)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device, generator=generator)


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


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: the forward process q(x_t | x_0)."""
    return scheduler.add_noise(x0, noise, t)


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to output, by the scheduler's `prediction_type`.

    epsilon: eps (Ho et al. 2020); v_prediction: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
    (Salimans & Ho 2022, sec. 4); sample: x_0.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise LdmError(f"objective.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got '{kind}'")


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), the signal-to-noise ratio of x_t."""
    abar = scheduler.alphas_cumprod.to(t.device)[t]
    return abar / (1 - abar)


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: Optional[float]) -> torch.Tensor:
    """Per-example loss weights of Min-SNR-gamma (Hang et al. 2023, eq. 8).

    The x_0 loss is weighted by min(SNR, gamma) so that the easy, low-noise steps stop
    dominating the gradient; expressed for the target actually learned, that is
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, and
    min(SNR, gamma) for x_0. gamma None: all ones (plain MSE).
    """
    if gamma is None:
        return torch.ones(t.shape, device=t.device)
    if gamma <= 0:
        raise LdmError(f"objective.min_snr_gamma must be positive (5.0 in the paper) or null, got {gamma}")
    ratio = snr(scheduler, t)
    clipped = torch.clamp(ratio, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / ratio
    if kind == "v_prediction":
        return clipped / (ratio + 1)
    return clipped


def drop_captions(captions: Sequence[str], p: float, generator: Optional[torch.Generator] = None) -> List[str]:
    """Replace each caption by "" with probability p.

    The model then also learns the unconditional p(x), which classifier-free guidance
    needs at sampling time (Ho & Salimans 2022); "" is what the sampler feeds as the
    unconditional prompt.
    """
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]

"""The DDPM objective (Ho et al. 2020): a discrete noise schedule, epsilon / v / x_0 targets.

Notation of Ho et al.: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with abar_t the
cumulative product of (1 - beta) up to step t. The noise schedule itself is diffusers'
`DDPMScheduler`, so training and the samplers read the same betas. Options: the target
(epsilon; v, Salimans & Ho 2022; x_0), Min-SNR-gamma weighting (Hang et al. 2023),
zero terminal SNR (Lin et al. 2024), offset noise, and uniform or cubic timesteps.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.errors import LdmError
from ldm.objectives.base import Objective, mean_per_example, timestep_sampling

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SAMPLING = ("uniform", "cubic")


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


def sample_timesteps(scheduler: DDPMScheduler, batch_size: int, device=None, generator=None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, one per example (Ho et al. 2020, Algorithm 1)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device, generator=generator)


def sample_timesteps_cubic(scheduler: DDPMScheduler, batch_size: int, device=None, generator=None) -> torch.Tensor:
    """t = (1 - u^3) T, u ~ U(0, 1): most steps are noisy ones (Mou et al. 2023, T2I-Adapter, sec. 3.4).

    As diffusers' examples/t2i_adapter/train_t2i_adapter_sdxl.py draws them: floored to an
    integer and clamped to T - 1. P(t < k) = 1 - (1 - k / T)^(1/3).
    """
    total = scheduler.config.num_train_timesteps
    u = torch.rand((batch_size,), device=device, generator=generator)
    return ((1 - u**3) * total).long().clamp(0, total - 1)


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


def ddim_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM (Song et al. 2021) on the training schedule, with Stable Diffusion's step conventions.

    With zero terminal SNR the sampler must start at the last training step, where the
    model saw pure noise: "trailing" spacing (Lin et al. 2024, sec. 3.3).
    """
    if noise_scheduler.config.rescale_betas_zero_snr:
        return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False)
    return DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False, steps_offset=1)


class DDPMObjective(Objective):
    """|| target - net(x_t, t, c) ||^2, weighted by Min-SNR-gamma when asked (Rombach et al. 2022, eq. 2)."""

    kind = "ddpm"

    def __init__(self, cfg):
        super().__init__(cfg)
        sampling = timestep_sampling(cfg, "ddpm", TIMESTEP_SAMPLING)
        self.timestep_sampling = sampling
        self.scheduler = build_noise_scheduler(cfg)

    def sample_t(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        draw = sample_timesteps_cubic if self.timestep_sampling == "cubic" else sample_timesteps
        return draw(self.scheduler, batch_size, device, generator)

    def t_at_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """Integer steps: floor(q T) for uniform t (evenly spaced over [0, T)); floor((1 - (1 - q)^3) T) for cubic.

        Both are `sample_t`'s own map from u ~ U(0, 1) to a step, at u = q (cubic: u^3 = 1 - q).
        """
        total = self.scheduler.config.num_train_timesteps
        if self.timestep_sampling == "cubic":
            q = 1 - (1 - q) ** 3
        return (q * total).long().clamp(0, total - 1)

    def loss(self, net, z0, context, t, noise) -> torch.Tensor:
        z_t = add_noise(self.scheduler, z0, noise, t)
        target = training_target(self.scheduler, z0, noise, t)
        prediction = net(z_t, t, context)
        per_example = mean_per_example(F.mse_loss(prediction.float(), target.float(), reduction="none"))
        return min_snr_weights(self.scheduler, t, self.cfg.min_snr_gamma) * per_example

    def sampling_scheduler(self) -> DDIMScheduler:
        return ddim_scheduler(self.scheduler)

"""The EDM objective: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", arXiv:2206.00364, Table 1 (training column).

x = z0 + sigma n, and the denoiser is D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),
F the raw U-Net, with

    c_skip = sd^2 / (sigma^2 + sd^2)       c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in = 1 / sqrt(sigma^2 + sd^2)        c_noise = ln(sigma) / 4

(sd = sigma_data), ln(sigma) ~ N(P_mean, P_std^2) and the loss weight
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes lambda c_out^2 = 1: the
effective target of F has unit weight at every noise level. These are exactly the
preconditionings diffusers' `EDMEulerScheduler` (prediction_type="epsilon") applies when
sampling: `scale_model_input` multiplies by c_in, its timesteps are c_noise and
`precondition_outputs` forms D, so the scheduler samples the network trained here.
"""

import torch
from diffusers import EDMEulerScheduler

from ldm.errors import LdmError
from ldm.objectives.base import Objective, mean_per_example

def check_edm_config(cfg) -> None:
    for key in ("p_std", "sigma_data", "sigma_min", "sigma_max", "rho"):
        if getattr(cfg, key) <= 0:
            raise LdmError(f"objective.{key} must be positive for objective.kind=edm, got {getattr(cfg, key)}")
    if cfg.sigma_min >= cfg.sigma_max:
        raise LdmError(f"objective.sigma_min ({cfg.sigma_min}) must be below objective.sigma_max ({cfg.sigma_max})")
    if (cfg.timestep_sampling or "log_normal") != "log_normal":
        raise LdmError(
            f"objective.timestep_sampling must be log_normal (or null) for objective.kind=edm, got '{cfg.timestep_sampling}'"
        )

class EDMObjective(Objective):
    """lambda(sigma) || D(z0 + sigma n; sigma) - z0 ||^2 with ln sigma ~ N(P_mean, P_std^2)."""

    kind = "edm"

    def __init__(self, cfg):
        super().__init__(cfg)
        check_edm_config(cfg)
        self.sigma_data = cfg.sigma_data

    def sample_t(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        """sigma = exp(P_mean + P_std n), n ~ N(0, 1): the noise levels that matter most (sec. 5)."""
        n = torch.randn((batch_size,), device=device, generator=generator)
        return (self.cfg.p_mean + self.cfg.p_std * n).exp()

    def t_at_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """sigma = exp(P_mean + P_std Phi^-1(q)): quantiles of the training log-normal."""
        return (self.cfg.p_mean + self.cfg.p_std * torch.special.ndtri(q.double())).exp().float()

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) of Table 1, for sigma of any shape."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    @staticmethod
    def noised(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x = z0 + sigma n (the variance-exploding forward process; `EDMEulerScheduler.add_noise`)."""
        return z0 + noise * sigma.view(-1, *([1] * (z0.ndim - 1)))

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor, context) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), sigma of shape [batch]."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        shape = (-1,) + (1,) * (x.ndim - 1)
        raw = net(c_in.view(shape) * x, c_noise, context)
        return c_skip.view(shape) * x + c_out.view(shape) * raw.to(x.dtype)

    def loss(self, net, z0, context, t, noise) -> torch.Tensor:
        # In float32 (or wider): lambda reaches ~1e5 at the smallest sigmas.
        dtype = torch.promote_types(z0.dtype, torch.float32)
        z0, noise, sigma = z0.to(dtype), noise.to(dtype), t.to(z0.device, dtype)
        denoised = self.denoise(net, self.noised(z0, noise, sigma), sigma, context)
        weight = self.loss_weight(sigma)
        return weight * mean_per_example((denoised - z0) ** 2)

    def sampling_scheduler(self) -> EDMEulerScheduler:
        """Euler on the Karras sigma schedule (Karras et al. 2022, eq. 5), with this objective's preconditioning.

        `EDMDPMSolverMultistepScheduler.from_config(...)` of it samples the same network.
        """
        cfg = self.cfg
        return EDMEulerScheduler(
            sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data, sigma_schedule="karras",
            num_train_timesteps=cfg.num_train_timesteps, prediction_type="epsilon", rho=cfg.rho,
        )


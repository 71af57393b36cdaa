"""Flow matching with the rectified-flow path: Lipman et al. 2023 ("Flow Matching for
Generative Modeling", arXiv:2210.02747), Liu et al. 2023, and Esser et al. 2024 ("Scaling
Rectified Flow Transformers", arXiv:2403.03206, sec. 2 and 3.1).

x_t = (1 - t) z0 + t eps, t in [0, 1] (t = 1 is pure noise); the network predicts the
velocity v = dx_t/dt = eps - z0. t = sigmoid(n), n ~ N(logit_mean, logit_std^2)
("logit-normal", Esser et al. eq. 19: more weight on the middle of the path), or
uniform. The U-Net sees the timestep t * num_train_timesteps, as diffusers'
`FlowMatchEulerDiscreteScheduler` feeds it (its timesteps are sigmas * 1000, sigma
playing t), whose Euler step x + (sigma_next - sigma) v follows the same path.
"""

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from ldm.errors import LdmError
from ldm.objectives.base import Objective, mean_per_example, timestep_sampling

TIMESTEP_SAMPLING = ("logit_normal", "uniform")


class FlowMatchingObjective(Objective):
    """|| (eps - z0) - net(x_t, t T, c) ||^2 on the straight path x_t = (1 - t) z0 + t eps."""

    kind = "flow"

    def __init__(self, cfg):
        super().__init__(cfg)
        sampling = timestep_sampling(cfg, "flow", TIMESTEP_SAMPLING)
        if cfg.logit_std <= 0:
            raise LdmError(f"objective.logit_std must be positive, got {cfg.logit_std}")
        self.timestep_sampling = sampling

    def sample_t(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        if self.timestep_sampling == "uniform":
            return torch.rand((batch_size,), device=device, generator=generator)
        n = torch.randn((batch_size,), device=device, generator=generator)
        return torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * n)

    def t_at_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """t = q (uniform) or sigmoid(m + s Phi^-1(q)) (logit-normal): quantiles of the training t."""
        q = q.double()
        if self.timestep_sampling == "logit_normal":
            q = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.special.ndtri(q))
        return q.float()

    @staticmethod
    def noised(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) z0 + t eps (`FlowMatchEulerDiscreteScheduler.scale_noise` with sigma = t)."""
        t = t.to(z0.device, z0.dtype).view(-1, *([1] * (z0.ndim - 1)))
        return (1 - t) * z0 + t * noise

    @staticmethod
    def target(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = d x_t / dt = eps - z0."""
        return noise - z0

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net's time embedding sees: t * num_train_timesteps (float)."""
        return t * self.cfg.num_train_timesteps

    def loss(self, net, z0, context, t, noise) -> torch.Tensor:
        t = t.to(z0.device)
        prediction = net(self.noised(z0, noise, t), self.timestep(t), context)
        dtype = torch.promote_types(z0.dtype, torch.float32)  # float32 under mixed precision, float64 stays
        return mean_per_example(F.mse_loss(prediction.to(dtype), self.target(z0, noise).to(dtype), reduction="none"))

    def sampling_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.cfg.num_train_timesteps, shift=1.0)

"""What every stage-2 objective is: a small object called like edm2's `EDM2Loss`.

`objective(net, z0, context)` draws the noise and the noise level, runs the network on
the noised latents and returns one loss per example; `net(x, timestep, context)` is any
callable giving the network's raw output (the U-Net through a one-line adapter, or a
ControlNet wrapper). `t` and `noise` may be given instead of drawn, in the objective's
own units (DDPM: integer steps; EDM: sigma; flow: t in [0, 1]), so that a validation
loss can use fixed ones: `validation_levels(n)` gives n fixed noise levels, the midpoint
quantiles of the kind's own training distribution of them. `sampling_scheduler()` is the diffusers scheduler that samples
a network trained this way, saved with the model folder.
"""

from typing import Callable, Optional

import torch

from ldm.errors import LdmError
from ldm.objectives.noise import sample_noise

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mean_per_example(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def timestep_sampling(cfg, kind: str, allowed: tuple) -> str:
    """`cfg.timestep_sampling`, or the kind's default (the first of `allowed`); one line if it is not allowed."""
    sampling = cfg.timestep_sampling or allowed[0]
    if sampling not in allowed:
        raise LdmError(
            f"objective.timestep_sampling must be one of {', '.join(allowed)} for objective.kind={kind}, got '{sampling}'"
        )
    return sampling


class Objective:
    """Base class: noise first, then the noise level (the order of the random draws is part of the contract)."""

    kind = "?"

    def __init__(self, cfg):
        self.cfg = cfg

    def sample_noise(self, z0: torch.Tensor, generator=None) -> torch.Tensor:
        return sample_noise(z0, self.cfg.offset_noise, generator=generator)

    def sample_t(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def t_at_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """The inverse CDF of `sample_t`'s distribution at probabilities `q` (float64), in the kind's units."""
        raise NotImplementedError

    def validation_levels(self, n: int) -> torch.Tensor:
        """n fixed noise levels spread over the training distribution, from least to most noise.

        The quantiles (k + 1/2) / n, k = 0..n-1, of the noise levels `sample_t` draws: each
        stands for an equal share of training, so their mean loss is a fixed-point estimate of
        the expected training loss. Esser et al. 2024 (arXiv:2403.03206) track validation loss
        at fixed noise levels and find it follows human preference.
        """
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return self.t_at_quantile(q)

    def loss(self, net: Net, z0: torch.Tensor, context, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net: Net, z0: torch.Tensor, context, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example losses, shape [batch], in float32."""
        noise = self.sample_noise(z0) if noise is None else noise
        t = self.sample_t(len(z0), z0.device) if t is None else t
        return self.loss(net, z0, context, t, noise)

    def sampling_scheduler(self):
        raise NotImplementedError

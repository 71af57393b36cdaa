"""What every stage-2 objective is: a small object called like edm2's `EDM2Loss`.

`objective(net, z0, context)` draws the noise and the noise level, runs the network on
the noised latents and returns one loss per example; `net(x, timestep, context)` is any
callable giving the network's raw output (the U-Net through a one-line adapter, or a
ControlNet wrapper). `t` and `noise` may be given instead of drawn, in the objective's
own units (DDPM: integer steps; EDM: sigma; flow: t in [0, 1]), so that a validation
loss can use fixed ones. `sampling_scheduler()` is the diffusers scheduler that samples
a network trained this way, saved with the model folder.
"""

from typing import Callable, Optional

import torch

from ldm.objectives.noise import sample_noise

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mean_per_example(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class Objective:
    """Base class: noise first, then the noise level (the order of the random draws is part of the contract)."""

    kind = "?"

    def __init__(self, cfg):
        self.cfg = cfg

    def sample_noise(self, z0: torch.Tensor, generator=None) -> torch.Tensor:
        return sample_noise(z0, self.cfg.offset_noise, generator=generator)

    def sample_t(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        raise NotImplementedError

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

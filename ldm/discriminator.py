"""The PatchGAN discriminator and the adversarial terms of the stage-1 loss.

PatchGAN (Isola et al. 2017, pix2pix) scores overlapping patches rather than whole
images, which pushes the decoder towards locally sharp texture, the part L1 and LPIPS
leave blurry. Esser et al. 2021 (taming-transformers) add it to the autoencoder loss
with an adaptive weight; Rombach et al. 2022 keep that loss for the KL autoencoders of
latent diffusion. The layout, initialisation and losses below are theirs.
"""

import torch
import torch.nn.functional as F
from torch import nn


def weights_init(m: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016): conv N(0, 0.02), BatchNorm scale N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `layers` 4x4 stride-2 convolutions, one 4x4 stride-1, then a 1-channel logit map.

    Each logit sees a 70x70 patch with the default 3 layers. Channels double per layer
    up to 8x `channels`; BatchNorm (so no conv bias) on all but the first and last.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1  # the last of these keeps the resolution
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def logit_map_size(resolution: int, layers: int) -> int:
    """Side of the logit map for `resolution`-pixel images: 4x4 convs with padding 1, `layers` halvings."""
    side = resolution
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1
    return side - 2  # two stride-1 4x4 convs each lose one pixel


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (Lim & Ye 2017): push real logits above 1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The original GAN's cross-entropy (Goodfellow et al. 2014), written with softplus."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISCRIMINATOR_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g_loss|| + 1e-4), clamped to [0, 1e4] and detached
    (Esser et al. 2021, eq. 7), L the decoder's last layer: the adversarial term gets
    gradients as large as the reconstruction term's there, whatever their scales.

    `scale` multiplies both losses before differentiating (the 1e-4 with them, so lambda is
    unchanged): under fp16 the unscaled per-pixel gradients can underflow.
    """
    nll_grad = torch.autograd.grad(nll * scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * scale, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4 * scale)
    return weight.clamp(0.0, 1e4).detach()

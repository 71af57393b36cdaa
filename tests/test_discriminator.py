"""PatchGAN discriminator, GAN losses and the adaptive weight, against known values."""

import math

import pytest
import torch

from ldm.discriminator import (
    NLayerDiscriminator, adaptive_weight, generator_loss, hinge_d_loss, logit_map_size, vanilla_d_loss,
)


def test_pix2pix_patchgan_layout():
    torch.manual_seed(0)
    d = NLayerDiscriminator()  # 3 layers, 64 channels: pix2pix's 70x70 PatchGAN
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # pix2pix prints "2.765 M" for its D
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.bias is None for c in convs] == [False, True, True, True, False]  # BatchNorm follows the middle ones
    # DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02) and zero shifts.
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert all(abs(n.weight.mean().item() - 1) < 0.01 and not n.bias.any() for n in norms)


@pytest.mark.parametrize("resolution,layers", [(16, 2), (32, 3), (64, 3), (24, 1), (12, 2)])
def test_logit_map_size(resolution, layers):
    d = NLayerDiscriminator(channels=4, layers=layers)
    assert d(torch.randn(2, 3, resolution, resolution)).shape[-1] == logit_map_size(resolution, layers)
    assert logit_map_size(resolution, layers) >= 1


def test_logit_map_too_small():
    assert logit_map_size(16, 3) < 1  # 16 -> 8 -> 4 -> 2, then two 4x4 convs: nothing left


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.5 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.625)
    # vanilla with zero logits: 0.5 * (log 2 + log 2), the discriminator's loss at chance
    assert vanilla_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    assert vanilla_d_loss(torch.tensor([10.0]), torch.tensor([-10.0])).item() < 1e-4  # confident and right
    assert generator_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    nll, g = (w * a).sum(), (w * b).sum()  # gradients a and b
    expected = a.norm() / (b.norm() + 1e-4)
    lam = adaptive_weight(nll, g, w)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-6) and not lam.requires_grad
    # A loss scale (fp16) leaves it unchanged, the 1e-4 included.
    assert adaptive_weight(nll, g, w, scale=1024.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # With no adversarial gradient, ||a|| / 1e-4 > 1e4: capped at 1e4.
    assert adaptive_weight((w * 10).sum(), (w * 0).sum(), w).item() == 1e4

"""PSNR, SSIM and MAE on [0, 1], against known values and a float64 reference."""

import math

import pytest
import torch

from ldm.image_metrics import mean_absolute_error, psnr, ssim


def reference_ssim(x, y):
    """Wang et al. 2004 written out window by window in float64: Gaussian weights (11, sigma 1.5)
    over every 11x11 window inside the image, C1 = 0.01^2, C2 = 0.03^2, mean over windows and channels."""
    a, b = ((x.double() + 1) / 2).clamp(0, 1), ((y.double() + 1) / 2).clamp(0, 1)
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    n, c, h, wd = a.shape
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        values = []
        for ch in range(c):
            for top in range(h - 10):
                for left in range(wd - 10):
                    p, q = a[i, ch, top:top + 11, left:left + 11], b[i, ch, top:top + 11, left:left + 11]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    values.append(((2 * mp * mq + 1e-4) * (2 * cov + 9e-4)) / ((mp**2 + mq**2 + 1e-4) * (vp + vq + 9e-4)))
        out[i] = torch.stack(values).mean()
    return out


def test_ssim_matches_the_window_by_window_formula():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 14) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.allclose(ssim(x, y).double(), reference_ssim(x, y), atol=1e-5)


def test_ssim_known_values():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    # Two flat images, 0.25 and 0.75 on [0, 1]: no variance, only the luminance term
    # (2 * 0.25 * 0.75 + C1) / (0.25^2 + 0.75^2 + C1).
    flat = torch.full((1, 3, 16, 16), -0.5), torch.full((1, 3, 16, 16), 0.5)
    assert ssim(*flat).item() == pytest.approx((0.375 + 1e-4) / (0.625 + 1e-4), rel=1e-5)
    assert ssim(x, -x).mean() < 0.5 < ssim(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)).mean()


def test_psnr_and_mae():
    x = torch.zeros(1, 3, 4, 4)
    # An error of 0.2 on [-1, 1] is 0.1 on [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB, MAE = 0.1.
    assert psnr(x, x + 0.2).item() == pytest.approx(20.0, rel=1e-5)
    assert mean_absolute_error(x, x + 0.2).item() == pytest.approx(0.1, rel=1e-5)
    # Reconstructions are clamped to the image range first, as when written to a file.
    assert psnr(torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 3.0)).item() == pytest.approx(100.0)
    assert math.isfinite(psnr(x, x).item())

"""Reconstruction metrics per image: PSNR, SSIM and mean absolute error.

All take images in [-1, 1] (the model's range) and measure on [0, 1] (the range the
literature reports in), so a PSNR or an MAE here reads like one in a paper.
"""

import torch
import torch.nn.functional as F

from ldm.errors import LdmError

# SSIM as Wang et al. 2004 define it (and skimage with gaussian_weights=True,
# use_sample_covariance=False, data_range=1): an 11x11 Gaussian window of sigma 1.5,
# C1 = (0.01 L)^2, C2 = (0.03 L)^2 with dynamic range L = 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model images to [0, 1], clamped, in float32 (what an image file would hold)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, 10 log10(1 / MSE) on [0, 1]."""
    mse = (to_unit_range(x_hat) - to_unit_range(x)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def mean_absolute_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean |x - x_hat| per image on [0, 1]."""
    return (to_unit_range(x_hat) - to_unit_range(x)).abs().flatten(1).mean(1)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D Gaussian weights, (size, size)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


@torch.no_grad()
def ssim(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image: the mean over channels and over every
    window position that fits inside the image (no padding, as skimage's cropped mean).

    In float64: the variances are differences of near-equal moments (E[a^2] - E[a]^2), and
    float32's cancellation error (~4e-7) is not small next to C2 = 9e-4."""
    a, b = to_unit_range(x).double(), to_unit_range(x_hat).double()
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise LdmError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    w = gaussian_window().to(a.device, a.dtype).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t):  # the Gaussian-weighted local mean, channel by channel
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2))
    return s.flatten(1).mean(1).float()

"""ldm.codec: the one way between pixels and the U-Net's latents."""

import pytest
import torch
from diffusers import AutoencoderKL

from ldm.codec import LatentCodec, posterior_sample, scale_latents, unscale_latents
from ldm.vae_decode import decode_latents

PER_CHANNEL = {"latents_mean": [0.1, -0.2, 0.0, 0.5], "latents_std": [1.0, 2.0, 0.5, 1.5]}


def pixels(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_posterior_sample_draws_as_diagonal_gaussian_sample(tiny_vae):
    """The same noise, draw for draw, from the global RNG and from a generator: cached runs follow uncached ones."""
    codec = LatentCodec(tiny_vae)
    x = pixels()
    with torch.no_grad():
        posterior = tiny_vae.encode(x).latent_dist
    mean, std = codec.encode(x)
    assert torch.equal(mean, posterior.mean) and torch.equal(std, posterior.std)
    torch.manual_seed(5)
    expected = posterior.sample()
    after_expected = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(codec.sample(mean, std), expected)
    assert torch.equal(torch.rand(3), after_expected)  # the stream moved on by the same draws
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(posterior_sample(mean, std, generator=g1), posterior.sample(generator=g2))


def test_posterior_sample_from_float32_cache_entries():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    torch.manual_seed(0)
    got = posterior_sample(mean, std)
    torch.manual_seed(0)
    assert torch.equal(got, mean + std * torch.randn(mean.shape, dtype=mean.dtype))


@pytest.mark.parametrize("extra", [{}, {"shift_factor": 0.3}, PER_CHANNEL])
def test_scale_and_unscale_are_inverse_and_read_the_config(extra):
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, scaling_factor=0.6, **extra)
    codec = LatentCodec(vae)
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = z * 0.6
    if "shift_factor" in extra:
        expected = (z - 0.3) * 0.6
    if "latents_mean" in extra:
        m = torch.tensor(extra["latents_mean"], dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.tensor(extra["latents_std"], dtype=torch.float64).view(1, -1, 1, 1)
        expected = (z - m) * 0.6 / s
    torch.testing.assert_close(codec.scale(z), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(codec.unscale(codec.scale(z)), z, rtol=1e-12, atol=1e-12)
    assert torch.equal(codec.scale(z), scale_latents(vae, z)) and torch.equal(codec.unscale(z), unscale_latents(vae, z))


def test_encode_latents_and_decode(tiny_vae):
    codec = LatentCodec(tiny_vae)
    x = pixels()
    torch.manual_seed(1)
    z = codec.encode_latents(x)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = tiny_vae.encode(x).latent_dist.sample() * 0.5  # the fixture's scaling_factor
        torch.testing.assert_close(z, expected, rtol=0, atol=0)
        images = codec.decode(z)
        assert torch.equal(images, decode_latents(tiny_vae, z / 0.5))
    assert images.shape == (2, 3, 16, 16)


def test_old_names_still_import():
    from ldm.objective import scale_latents as old_scale
    from ldm.pipeline import unscale_latents as old_unscale

    assert old_scale is scale_latents and old_unscale is unscale_latents

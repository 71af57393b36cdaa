"""The stage-1 loss: each term against its formula, the adaptive weight's effect, config errors."""

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.config import VAELossConfig
from ldm.errors import LdmError
from ldm.vae_loss import check_loss_config, discriminator_loss, vae_loss


def posterior_and_images(seed=0):
    torch.manual_seed(seed)
    mean, logvar = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    x, x_hat = torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    return mean, logvar, posterior, x, x_hat


def test_kl_and_reconstruction_match_their_formulas():
    mean, logvar, posterior, x, x_hat = posterior_and_images()
    # KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), averaged over the batch.
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    loss, parts = vae_loss(x, x_hat, posterior, VAELossConfig(reconstruction="l1", kl_weight=0.01))
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert loss.item() == pytest.approx(((x - x_hat).abs().mean() + 0.01 * kl).item(), rel=1e-6)
    assert set(parts) == {"rec_loss", "kl"}  # no perceptual or adversarial parts when they are off
    loss2, _ = vae_loss(x, x_hat, posterior, VAELossConfig(reconstruction="l2", kl_weight=0.0))
    assert loss2.item() == pytest.approx(((x - x_hat) ** 2).mean().item(), rel=1e-6)


def test_perceptual_term_is_weighted_and_averaged_over_the_batch():
    _, _, posterior, x, x_hat = posterior_and_images()
    distances = torch.tensor([0.2, 0.6]).view(2, 1, 1, 1)
    fake_lpips = lambda a, b: distances  # LPIPS' shape: one distance per image  # noqa: E731
    cfg = VAELossConfig(kl_weight=0.0, perceptual_weight=0.5, lpips_vgg_weights="v", lpips_linear_weights="l")
    loss, parts = vae_loss(x, x_hat, posterior, cfg, lpips=fake_lpips)
    assert parts["perceptual"].item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx((x - x_hat).abs().mean().item() + 0.5 * 0.4, rel=1e-6)


def test_adversarial_gradient_matches_the_reconstruction_gradient_at_the_last_layer():
    """The adaptive weight's purpose (Esser et al. 2021, eq. 7): at the decoder's last layer the
    adversarial term pushes as hard as the reconstruction term, times discriminator_weight."""
    torch.manual_seed(0)
    decoder = torch.nn.Conv2d(4, 3, 3, padding=1)
    critic = torch.nn.Conv2d(3, 1, 4, stride=2)
    z, x = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 8, 8) * 2 - 1
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 2, 2))
    cfg = VAELossConfig(kl_weight=0.0, discriminator_start=0, discriminator_weight=0.5)

    def grad_at_last_layer(term):
        x_hat = decoder(z)
        loss, parts = vae_loss(x, x_hat, posterior, cfg, logits_fake=critic(x_hat), last_layer=decoder.weight)
        nll = (x_hat - x).abs().mean()
        value = {"all": loss, "nll": nll, "gan": parts["d_weight"] * -critic(x_hat).mean()}[term]
        return torch.autograd.grad(value, decoder.weight)[0], parts

    g_nll, parts = grad_at_last_layer("nll")
    g_gan, _ = grad_at_last_layer("gan")
    assert g_gan.norm().item() == pytest.approx(0.5 * g_nll.norm().item(), rel=1e-3)
    g_all, _ = grad_at_last_layer("all")
    assert torch.allclose(g_all, g_nll + g_gan, atol=1e-7)  # the loss is exactly those two terms here
    assert set(parts) == {"rec_loss", "kl", "g_loss", "d_weight"} and not parts["d_weight"].requires_grad


@pytest.mark.parametrize("kind,expected", [("hinge", 0.625), ("vanilla", None)])
def test_discriminator_loss(kind, expected):
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    loss, parts = discriminator_loss(real, fake, VAELossConfig(discriminator_loss=kind))
    if expected is None:  # vanilla: 0.5 * (mean softplus(-real) + mean softplus(fake))
        sp = torch.nn.functional.softplus
        expected = (0.5 * (sp(-real).mean() + sp(fake).mean())).item()
    assert loss.item() == pytest.approx(expected)
    assert parts["logits_real"].item() == pytest.approx(1.0) and parts["logits_fake"].item() == pytest.approx(-0.75)


def test_config_errors(tmp_path):
    def error(**kw):
        with pytest.raises(LdmError) as e:
            check_loss_config(VAELossConfig(**kw))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "loss.lpips_vgg_weights" in error(perceptual_weight=1.0) and "perceptual_weight=0" in error(perceptual_weight=1.0)
    (tmp_path / "vgg.pth").write_bytes(b"")
    assert "loss.lpips_linear_weights" in error(perceptual_weight=1.0, lpips_vgg_weights=str(tmp_path / "vgg.pth"))
    missing = error(perceptual_weight=1.0, lpips_vgg_weights=str(tmp_path / "nope.pth"), lpips_linear_weights="x")
    assert "no file at" in missing and "nope.pth" in missing
    assert "'wasserstein'" in error(discriminator_loss="wasserstein")
    assert "loss.kl_weight" in error(kl_weight=-1.0)
    assert "loss.discriminator_weight" in error(discriminator_weight=-0.5)
    assert "loss.discriminator_start" in error(discriminator_start=-1)
    check_loss_config(VAELossConfig(perceptual_weight=0.0))  # no LPIPS files needed without LPIPS

"""The stage-2 objective against its formulas, in float64."""

import pytest
import torch
from diffusers import AutoencoderKL

from ldm.config import ObjectiveConfig
from ldm.errors import LdmError
from ldm.objective import (
    add_noise, build_noise_scheduler, drop_captions, sample_timesteps, scale_latents, training_target,
)


def setup(prediction_type="epsilon", **kwargs):
    scheduler = build_noise_scheduler(ObjectiveConfig(prediction_type=prediction_type, **kwargs))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    return scheduler, x0, eps, t, abar


def test_schedule_is_the_configured_one():
    scheduler, *_ = setup()
    # scaled_linear: betas are linear in sqrt(beta) from beta_start to beta_end.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(scheduler.betas.double(), betas, atol=1e-9)
    assert torch.allclose(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    assert scheduler.config.clip_sample is False  # latents are not in [-1, 1]


def test_add_noise_is_the_forward_process():
    scheduler, x0, eps, t, abar = setup()
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(add_noise(scheduler, x0, eps, t), expected, rtol=1e-12, atol=1e-12)


def test_epsilon_target_is_the_noise():
    scheduler, x0, eps, t, _ = setup("epsilon")
    assert torch.equal(training_target(scheduler, x0, eps, t), eps)


def test_v_target():
    scheduler, x0, eps, t, abar = setup("v_prediction")
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(training_target(scheduler, x0, eps, t), expected, rtol=1e-12, atol=1e-12)


def test_sample_target_is_x0():
    scheduler, x0, eps, t, _ = setup("sample")
    assert torch.equal(training_target(scheduler, x0, eps, t), x0)


def test_timesteps_cover_the_schedule():
    scheduler = build_noise_scheduler(ObjectiveConfig(num_train_timesteps=10))
    t = sample_timesteps(scheduler, 2000, generator=torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 9 and t.dtype == torch.int64


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_rate(p):
    captions = [f"a red circle {i}" for i in range(20000)]
    kept = drop_captions(captions, p, generator=torch.Generator().manual_seed(0))
    dropped = [k == "" for k in kept]
    assert sum(dropped) / len(captions) == pytest.approx(p, abs=0.01)
    assert all(k == c for k, c, d in zip(kept, captions, dropped) if not d)  # the others untouched


def test_bad_objective_names():
    with pytest.raises(LdmError, match="prediction_type"):
        build_noise_scheduler(ObjectiveConfig(prediction_type="eps"))
    with pytest.raises(LdmError, match="beta_schedule"):
        build_noise_scheduler(ObjectiveConfig(beta_schedule="cosine"))
    with pytest.raises(LdmError, match="caption_dropout"):
        build_noise_scheduler(ObjectiveConfig(caption_dropout=1.5))


PER_CHANNEL = {"latents_mean": [0.1, -0.2, 0.0, 0.5], "latents_std": [1.0, 2.0, 0.5, 1.5]}


@pytest.mark.parametrize("extra", [{}, {"shift_factor": 0.3}, PER_CHANNEL])
def test_scale_latents_inverts_the_pipelines_unscale(extra):
    from ldm.pipeline import unscale_latents

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, scaling_factor=0.6, **extra)
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    if not extra:
        torch.testing.assert_close(scale_latents(vae, z), z * 0.6)
    torch.testing.assert_close(unscale_latents(vae, scale_latents(vae, z)), z)


def _float64_scheduler(prediction_type):
    from ldm.config import ObjectiveConfig
    from ldm.objective import build_noise_scheduler

    return build_noise_scheduler(ObjectiveConfig(prediction_type=prediction_type))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_paper_in_float64(prediction_type):
    from ldm.objective import min_snr_weights

    scheduler = _float64_scheduler(prediction_type)
    t = torch.tensor([0, 10, 100, 400, 999])
    gamma = 5.0
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    abar = torch.cumprod(1 - betas, 0)[t]
    snr = abar / (1 - abar)
    expected = {
        "epsilon": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr,
        "v_prediction": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1),
        "sample": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)),
    }[prediction_type]
    got = min_snr_weights(scheduler, t, gamma).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Noisy steps (SNR < gamma) keep weight 1 for epsilon: only the easy ones are damped.
    if prediction_type == "epsilon":
        assert got[-1] == 1.0 and got[0] < 0.01


def test_min_snr_off_is_plain_mse_and_bad_gamma_is_refused():
    from ldm.objective import min_snr_weights

    scheduler = _float64_scheduler("epsilon")
    t = torch.tensor([0, 500, 999])
    assert torch.equal(min_snr_weights(scheduler, t, None), torch.ones(3))
    with pytest.raises(LdmError, match="min_snr_gamma"):
        min_snr_weights(scheduler, t, 0.0)


# ---------------------------------------------------------------- beta schedules, in float64


def _cosine_betas(n, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas from its ratios."""
    f = lambda t: torch.cos((t / n + s) / (1 + s) * torch.pi / 2) ** 2  # noqa: E731
    t = torch.arange(n, dtype=torch.float64)
    return torch.clamp(1 - f(t + 1) / f(t), max=max_beta)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_match_their_formulas(schedule):
    cfg = ObjectiveConfig(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02)
    scheduler = build_noise_scheduler(cfg)
    expected = {
        "linear": torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64),  # Ho et al. 2020
        "scaled_linear": torch.linspace(0.0001**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2,  # LDM
        "squaredcos_cap_v2": _cosine_betas(1000),
    }[schedule]
    torch.testing.assert_close(scheduler.betas.double(), expected, rtol=1e-5, atol=1e-8)
    abar = torch.cumprod(1 - expected, 0)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), abar, rtol=1e-4, atol=1e-9)


def _zero_terminal_snr_betas(betas):
    """Lin et al. 2024, Algorithm 1, written out in float64."""
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)  # shift so the last is 0, keep the first
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def test_zero_terminal_snr_rescale_matches_algorithm_1():
    plain = build_noise_scheduler(ObjectiveConfig(prediction_type="v_prediction"))
    rescaled = build_noise_scheduler(ObjectiveConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True))
    expected = _zero_terminal_snr_betas(plain.betas.double())
    # diffusers computes in float32: ratios of abar near 1 keep ~1e-7 absolute, so small betas
    # agree to ~1e-4 relative; abar itself agrees to float32 precision.
    torch.testing.assert_close(rescaled.betas.double(), expected, rtol=1e-3, atol=1e-5)
    abar = rescaled.alphas_cumprod.double()
    torch.testing.assert_close(abar, torch.cumprod(1 - expected, 0), rtol=1e-5, atol=1e-7)
    assert abar[-1] == 0.0  # SNR(T) = 0: the last training step is pure noise
    torch.testing.assert_close(abar[0], plain.alphas_cumprod.double()[0])  # the first step is kept
    # The v target at SNR 0 is -x_0: the model learns to predict the image from pure noise.
    x0, eps, t = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.tensor([999, 999])
    torch.testing.assert_close(training_target(rescaled, x0, eps, t), -x0, rtol=1e-6, atol=1e-6)


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(LdmError, match="v_prediction"):
        build_noise_scheduler(ObjectiveConfig(prediction_type="epsilon", rescale_zero_terminal_snr=True))


def test_zero_terminal_snr_samples_from_the_last_step():
    from ldm.objectives.ddpm import ddim_scheduler as sampling_scheduler

    ddim = sampling_scheduler(build_noise_scheduler(ObjectiveConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True)))
    ddim.set_timesteps(10)
    assert ddim.timesteps[0] == 999 and ddim.config.rescale_betas_zero_snr
    sd = sampling_scheduler(build_noise_scheduler(ObjectiveConfig()))
    sd.set_timesteps(10)
    assert sd.timesteps[0] == 901  # Stable Diffusion's "leading" spacing with steps_offset 1


# ---------------------------------------------------------------- offset noise


def test_offset_noise_is_eps_plus_a_per_channel_constant():
    from ldm.objective import sample_noise

    z0 = torch.zeros(3, 4, 5, 5, dtype=torch.float64)
    got = sample_noise(z0, 0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    offset = torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got, eps + 0.1 * offset, rtol=0, atol=0)
    # Off, it is plain N(0, I) drawn exactly as torch.randn_like would.
    torch.testing.assert_close(sample_noise(z0, 0.0, generator=torch.Generator().manual_seed(0)), eps, rtol=0, atol=0)


def test_offset_noise_variance():
    from ldm.objective import sample_noise

    noise = sample_noise(torch.zeros(4000, 4, 8, 8, dtype=torch.float64), 0.5, generator=torch.Generator().manual_seed(1))
    # Var = 1 + offset^2 per element; the per-channel spatial means carry the offset's variance.
    assert noise.var().item() == pytest.approx(1.25, rel=0.02)
    assert noise.mean(dim=(2, 3)).var().item() == pytest.approx(0.25 + 1 / 64, rel=0.05)


def test_negative_offset_noise_is_refused():
    with pytest.raises(LdmError, match="offset_noise"):
        build_noise_scheduler(ObjectiveConfig(offset_noise=-0.1))

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

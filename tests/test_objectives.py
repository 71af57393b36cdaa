"""The stage-2 loss objects (ldm.objectives): formulas in float64, the random stream, and
agreement with the diffusers schedulers that sample what they train."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler,
)

from ldm.config import ObjectiveConfig
from ldm.errors import LdmError
from ldm.objectives import (
    DDPMObjective, EDMObjective, FlowMatchingObjective, add_noise, build_objective, min_snr_weights, sample_noise,
    sample_timesteps_cubic, training_target,
)

F64 = torch.float64


def edm(**kwargs):
    return build_objective(ObjectiveConfig(kind="edm", **kwargs))


def flow(**kwargs):
    return build_objective(ObjectiveConfig(kind="flow", **kwargs))


def latents(seed=0, n=5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 3, 3, generator=g, dtype=dtype), torch.randn(n, 4, 3, 3, generator=g, dtype=dtype)


class Recorder:
    """A stand-in network: a fixed smooth function of its input and timestep that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, context):
        self.calls.append((x.clone(), torch.as_tensor(timestep).clone()))
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x) * (1 + 0.3 * t) - 0.1 * t


# ---------------------------------------------------------------- building and checking


def test_build_objective_by_kind_and_defaults():
    assert isinstance(build_objective(ObjectiveConfig()), DDPMObjective)  # every existing YAML keeps working
    assert isinstance(edm(), EDMObjective) and isinstance(flow(), FlowMatchingObjective)
    cfg = ObjectiveConfig()
    assert (cfg.kind, cfg.p_mean, cfg.p_std, cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.rho) == (
        "ddpm", -1.2, 1.2, 1.0, 0.002, 80.0, 7.0)
    assert (cfg.logit_mean, cfg.logit_std, cfg.timestep_sampling) == (0.0, 1.0, None)


@pytest.mark.parametrize("cfg, words", [
    (dict(kind="ddim"), "objective.kind must be one of ddpm, edm, flow"),
    (dict(kind="edm", min_snr_gamma=5.0), "objective.min_snr_gamma=null"),
    (dict(kind="flow", prediction_type="v_prediction"), "kind=ddpm only"),
    (dict(kind="edm", rescale_zero_terminal_snr=True), "rescale_zero_terminal_snr"),
    (dict(timestep_sampling="logit_normal"), "uniform, cubic"),
    (dict(kind="flow", timestep_sampling="cubic"), "logit_normal, uniform"),
    (dict(kind="edm", timestep_sampling="uniform"), "log_normal"),
    (dict(kind="edm", sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (dict(kind="edm", sigma_data=0.0), "sigma_data"),
    (dict(kind="flow", logit_std=0.0), "logit_std"),
    (dict(kind="flow", caption_dropout=2.0), "caption_dropout"),
    (dict(kind="edm", offset_noise=-1.0), "offset_noise"),
    (dict(prediction_type="eps"), "prediction_type"),
])
def test_bad_values_are_one_line_errors(cfg, words):
    with pytest.raises(LdmError, match=words) as e:
        build_objective(ObjectiveConfig(**cfg))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- DDPM


def test_ddpm_objective_keeps_the_loops_random_stream_and_numbers():
    """Bit for bit what the loop computed inline before: noise (with offset), then t, then the weighted MSE."""
    cfg = ObjectiveConfig(prediction_type="v_prediction", min_snr_gamma=5.0, offset_noise=0.1)
    objective = build_objective(cfg)
    z0, context = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 2)
    net = Recorder()
    torch.manual_seed(3)
    got = objective(net, z0, context)
    torch.manual_seed(3)
    scheduler = objective.scheduler
    noise = sample_noise(z0, 0.1)
    t = torch.randint(0, 1000, (6,))
    z_t = add_noise(scheduler, z0, noise, t)
    prediction = Recorder()(z_t, t, context)
    per_example = torch.nn.functional.mse_loss(prediction, training_target(scheduler, z0, noise, t), reduction="none")
    expected = min_snr_weights(scheduler, t, 5.0) * per_example.mean(dim=(1, 2, 3))
    assert got.shape == (6,) and torch.equal(got, expected)
    assert torch.equal(net.calls[0][0], z_t) and torch.equal(net.calls[0][1], t)
    # The same draws, given instead of drawn (as a validation loss will give them).
    assert torch.equal(objective(Recorder(), z0, context, t=t, noise=noise), expected)


def test_cubic_timesteps_are_t2i_adapters():
    objective = build_objective(ObjectiveConfig(timestep_sampling="cubic"))
    got = objective.sample_t(8, generator=torch.Generator().manual_seed(0))
    u = torch.rand(8, generator=torch.Generator().manual_seed(0))
    expected = ((1 - u**3) * 1000).long().clamp(0, 999)  # diffusers' train_t2i_adapter_sdxl.py
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    # The distribution: P(t < k) = 1 - (1 - k/T)^(1/3), in float64.
    t = sample_timesteps_cubic(objective.scheduler, 400_000, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0 and t.max() == 999
    for k in (10, 100, 500, 900):
        expected_cdf = 1 - (1 - k / 1000) ** (1 / 3)
        assert (t < k).double().mean().item() == pytest.approx(expected_cdf, abs=3e-3)


def test_ddpm_samples_with_ddim_on_its_schedule():
    scheduler = build_objective(ObjectiveConfig()).sampling_scheduler()
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.steps_offset == 1 and scheduler.config.clip_sample is False
    assert scheduler.config.beta_schedule == "scaled_linear" and not scheduler.config.set_alpha_to_one


# ---------------------------------------------------------------- EDM, in float64


def table1(sigma: float, sd: float):
    """Karras et al. 2022, Table 1, written out with Python floats."""
    return (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / math.sqrt(sigma**2 + sd**2),
        1 / math.sqrt(sigma**2 + sd**2),
        math.log(sigma) / 4,
        (sigma**2 + sd**2) / (sigma * sd) ** 2,
    )


@pytest.mark.parametrize("sd", [1.0, 0.5])
def test_edm_preconditioning_and_weight_are_table_1(sd):
    objective = edm(sigma_data=sd)
    sigmas = [0.002, 0.01, 0.3, 1.0, 2.5, 80.0]
    s = torch.tensor(sigmas, dtype=F64)
    got = [*objective.preconditioning(s), objective.loss_weight(s)]
    for i, sigma in enumerate(sigmas):
        for value, expected in zip(got, table1(sigma, sd)):
            assert value[i].item() == pytest.approx(expected, rel=1e-14)
    # lambda c_out^2 = 1: F's effective target has unit weight at every noise level.
    c_out = got[1]
    torch.testing.assert_close(got[4] * c_out**2, torch.ones_like(s), rtol=1e-14, atol=0)


def test_edm_loss_is_lambda_times_the_denoising_error():
    objective = edm(sigma_data=0.5)
    z0, n = latents()
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 70.0], dtype=F64)
    net = Recorder()
    got = objective(net, z0, None, t=sigma, noise=n)
    x = z0 + sigma.view(-1, 1, 1, 1) * n
    for i in range(5):
        c_skip, c_out, c_in, c_noise, weight = table1(sigma[i].item(), 0.5)
        x_in, timestep = net.calls[0][0][i], net.calls[0][1][i]
        torch.testing.assert_close(x_in, c_in * x[i], rtol=1e-14, atol=0)
        assert timestep.item() == pytest.approx(c_noise, rel=1e-14)
        raw = Recorder()(x_in[None], timestep[None], None)[0]
        denoised = c_skip * x[i] + c_out * raw
        assert got[i].item() == pytest.approx(weight * ((denoised - z0[i]) ** 2).mean().item(), rel=1e-12)
    # Equivalently an unweighted MSE on F's effective target (z0 - c_skip x) / c_out.


def test_edm_log_normal_sigmas():
    sigma = edm(p_mean=-1.2, p_std=1.2).sample_t(400_000, generator=torch.Generator().manual_seed(0)).double()
    log = sigma.log()
    assert (sigma > 0).all()
    assert log.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log.std().item() == pytest.approx(1.2, rel=0.01)
    # The median and the log-normal mean exp(P_mean + P_std^2 / 2).
    assert sigma.median().item() == pytest.approx(math.exp(-1.2), rel=0.01)
    assert sigma.mean().item() == pytest.approx(math.exp(-1.2 + 1.2**2 / 2), rel=0.02)


def test_edm_noise_is_the_schedulers_forward_process():
    objective = edm()
    scheduler = objective.sampling_scheduler()
    scheduler.set_timesteps(6)
    z0, n = latents(n=3, dtype=torch.float32)
    timesteps = scheduler.timesteps[[0, 2, 4]]
    sigma = scheduler.sigmas[[0, 2, 4]]
    torch.testing.assert_close(objective.noised(z0, n, sigma), scheduler.add_noise(z0, n, timesteps), rtol=0, atol=0)


@pytest.mark.parametrize("sd", [1.0, 0.5])
def test_edm_training_denoiser_is_the_schedulers(sd):
    """D at training equals EDMEulerScheduler's denoised x_0: same c_in, timesteps = c_noise, same c_skip / c_out."""
    objective = edm(sigma_data=sd)
    scheduler = objective.sampling_scheduler()
    assert isinstance(scheduler, EDMEulerScheduler)
    scheduler.set_timesteps(5)
    z0, n = latents(n=2, dtype=torch.float32)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        x = z0 + sigma * n
        ours = objective.denoise(Recorder(), x, sigma.expand(2), None)
        net = Recorder()
        x_in = scheduler.scale_model_input(x, t)
        out = net(x_in, t, None)
        theirs = scheduler.step(out, t, x).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        assert net.calls[0][1].item() == pytest.approx(math.log(sigma.item()) / 4, rel=1e-6)
    # The same preconditioning functions in float64, for sigmas anywhere.
    s = torch.tensor([0.002, 0.7, 80.0], dtype=F64).view(-1, 1, 1, 1)
    x, raw = latents(n=3)
    c_skip, c_out, c_in, c_noise = objective.preconditioning(s)
    torch.testing.assert_close(scheduler.precondition_inputs(x, s), c_in * x, rtol=1e-15, atol=0)
    torch.testing.assert_close(scheduler.precondition_noise(s), c_noise, rtol=1e-15, atol=0)
    torch.testing.assert_close(scheduler.precondition_outputs(x, raw, s), c_skip * x + c_out * raw, rtol=1e-14, atol=0)


def test_edm_sampling_scheduler_config_and_dpm_solver_swap():
    objective = edm(sigma_data=0.5, sigma_min=0.01, sigma_max=40.0, rho=5.0)
    scheduler = objective.sampling_scheduler()
    c = scheduler.config
    assert (c.sigma_min, c.sigma_max, c.sigma_data, c.rho, c.sigma_schedule, c.prediction_type) == (
        0.01, 40.0, 0.5, 5.0, "karras", "epsilon")
    scheduler.set_timesteps(4)
    ramp = torch.linspace(0, 1, 4, dtype=F64)
    karras = (40.0 ** (1 / 5) + ramp * (0.01 ** (1 / 5) - 40.0 ** (1 / 5))) ** 5  # Karras et al. eq. 5
    torch.testing.assert_close(scheduler.sigmas[:4].double(), karras, rtol=1e-6, atol=0)
    solver = EDMDPMSolverMultistepScheduler.from_config(c)
    assert (solver.config.sigma_data, solver.config.sigma_max, solver.config.prediction_type) == (0.5, 40.0, "epsilon")
    x, raw = latents(n=2)
    s = torch.tensor(3.0, dtype=F64)
    torch.testing.assert_close(solver.precondition_outputs(x, raw, s), scheduler.precondition_outputs(x, raw, s), rtol=0, atol=0)


# ---------------------------------------------------------------- flow matching, in float64


def test_flow_path_target_and_timestep():
    objective = flow()
    z0, eps = latents()
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    x_t = objective.noised(z0, eps, t)
    for i in range(5):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * z0[i] + t[i] * eps[i], rtol=1e-15, atol=1e-15)
    assert torch.equal(x_t[0], z0[0]) and torch.equal(x_t[-1], eps[-1])  # data at t = 0, noise at t = 1
    torch.testing.assert_close(objective.target(z0, eps), eps - z0, rtol=0, atol=0)
    # v is the path's derivative: a central difference of x_t in t.
    h = 1e-6
    derivative = (objective.noised(z0, eps, t + h) - objective.noised(z0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, eps - z0, rtol=1e-8, atol=1e-8)
    assert objective.timestep(torch.tensor([0.25])).item() == 250.0
    net = Recorder()
    got = objective(net, z0, None, t=t, noise=eps)
    torch.testing.assert_close(net.calls[0][0], x_t, rtol=0, atol=0)
    torch.testing.assert_close(net.calls[0][1], t * 1000, rtol=0, atol=0)
    expected = ((Recorder()(x_t, t * 1000, None) - (eps - z0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_flow_logit_normal_and_uniform_t():
    t = flow(logit_mean=0.5, logit_std=0.8).sample_t(400_000, generator=torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, rel=0.01)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.003)
    u = flow(timestep_sampling="uniform").sample_t(400_000, generator=torch.Generator().manual_seed(0)).double()
    assert u.mean().item() == pytest.approx(0.5, abs=0.003) and u.var().item() == pytest.approx(1 / 12, rel=0.01)


def test_one_flow_euler_step_with_the_exact_velocity_lands_on_the_path():
    objective = flow()
    scheduler = objective.sampling_scheduler()
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 1.0
    assert not hasattr(scheduler, "init_noise_sigma") and not hasattr(scheduler, "scale_model_input")
    scheduler.set_timesteps(10)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000, rtol=0, atol=0)
    z0, eps = latents(n=2)
    v = objective.target(z0, eps)
    for i, timestep in enumerate(scheduler.timesteps):
        t, t_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
        x_t = objective.noised(z0, eps, t.expand(2))
        # In float64: x_t + (t' - t) v = x_t' exactly (up to rounding).
        torch.testing.assert_close(x_t + (t_next - t) * v, objective.noised(z0, eps, t_next.expand(2)), rtol=0, atol=1e-14)
        # diffusers' step (it computes in float32): the same point.
        assert objective.timestep(t).item() == pytest.approx(timestep.item(), rel=1e-6)
        stepped = scheduler.step(v, timestep, x_t).prev_sample
        torch.testing.assert_close(stepped, objective.noised(z0, eps, t_next.expand(2)), rtol=1e-6, atol=1e-6)
        # And its forward process is ours.
        torch.testing.assert_close(scheduler.scale_noise(z0, timestep[None], eps), x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stepped, z0, rtol=1e-6, atol=1e-6)  # the last step ends on the data


# ---------------------------------------------------------------- the pipeline samples each objective


@pytest.fixture(scope="module")
def objective_folders(tmp_path_factory, tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet):
    """One model folder per objective: the same tiny parts, each with its objective's scheduler."""
    from ldm.config import UNetStageConfig, save_config
    from ldm.pipeline import LatentDiffusionPipeline

    folders = {}
    for kind in ("ddpm", "edm", "flow"):
        cfg = UNetStageConfig()
        cfg.objective.kind = kind
        cfg.objective.min_snr_gamma = None
        scheduler = build_objective(cfg.objective).sampling_scheduler()
        folder = tmp_path_factory.mktemp(kind)
        LatentDiffusionPipeline(tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet, scheduler).save_pretrained(str(folder))
        save_config(cfg, folder / "ldm_config.yaml")
        folders[kind] = folder
    return folders


@pytest.mark.parametrize("kind, cls", [
    ("ddpm", DDIMScheduler), ("edm", EDMEulerScheduler), ("flow", FlowMatchEulerDiscreteScheduler),
])
def test_a_saved_folder_samples_with_its_objectives_scheduler(objective_folders, kind, cls):
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(objective_folders[kind]))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is cls
    images = pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    if kind == "edm":  # a user may swap in the multistep solver
        pipe.scheduler = EDMDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        again = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert np.isfinite(again).all()


def test_flow_sampling_is_euler_on_the_velocity(objective_folders):
    """sample_cfg with FlowMatchEuler: no input scaling, unit initial noise, x += (t' - t) v."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(objective_folders["flow"]))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, latents=noise, output_type="latent").images
    embeds = pipe.encode_prompt(["a red circle"], "cpu")
    x = noise.clone()
    sigmas = [1.0, 1.0 - 0.999 / 2, 0.001, 0.0]  # linspace(1000, 1, 3) / 1000, then 0
    with torch.no_grad():
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            v = pipe.unet(x, torch.tensor(t * 1000), encoder_hidden_states=embeds).sample
            x = x + (t_next - t) * v
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_the_cli_sampler_takes_edm_and_flow_folders(objective_folders, tmp_path):
    from ldm.cli.sample import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    for kind in ("edm", "flow"):
        out = tmp_path / kind
        assert main(["--model", str(objective_folders[kind]), "--prompts", str(prompts), "--outdir", str(out),
                     "--device", "cpu", "--steps", "2"]) == 0
        assert len(list(out.glob("0*.png"))) == 2


# ---------------------------------------------------------------- through the training loop


@pytest.mark.parametrize("kind, cls", [("edm", "EDMEulerScheduler"), ("flow", "FlowMatchEulerDiscreteScheduler")])
def test_each_objective_trains_and_saves_its_scheduler(tmp_path, vae_dir, kind, cls):
    import json

    from test_train_unet import records, tiny

    from ldm.cli.train_unet import main

    run = tmp_path / kind
    assert main(tiny(run, vae_dir, "train.max_steps=2", f"objective.kind={kind}", "objective.offset_noise=0.05",
                     "validation.prompts=[a red circle]", "validation.every=2")) == 0
    assert all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in records(run))
    assert json.loads((run / "final/scheduler/scheduler_config.json").read_text())["_class_name"] == cls
    assert (run / "samples/step-000002.png").is_file()  # validation sampled with that scheduler

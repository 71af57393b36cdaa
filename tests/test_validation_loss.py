"""The held-out validation loss (ldm/eval/validation_loss.py): fixed noise levels per objective,
fixed noise, expected values against direct computations, process shares, the RNG, and the
training runs that log it (stage 2 and the control stage)."""

import json
import math
import shutil
from statistics import NormalDist

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm.config import ObjectiveConfig, ValidationConfig
from ldm.errors import LdmError
from ldm.eval.validation_loss import ValidationLoss, build_validation_loss
from ldm.objectives import build_objective

K, SEED, SHAPE = 8, 3, (4, 2, 2)


def held_out(n=5):
    """n held-out 'latents' with captions; item i is 0.1 * i + a fixed pattern."""
    pattern = torch.linspace(-1, 1, math.prod(SHAPE)).view(SHAPE)
    return [{"z": 0.1 * i + pattern, "caption": f"item {i}"} for i in range(n)]


def zeros_net(x, t, context):
    return torch.zeros_like(x)


def zero_inputs(batch):
    return zeros_net, batch["z"], None


def validation(**kw):
    return ValidationConfig(**{"seed": SEED, "loss_buckets": K, "loss_batch_size": 2, **kw})


def reference_noise(index, offset=0.0):
    """Item `index`'s K noises as the module documents them, written out: SeedSequence([seed, i]) -> torch.Generator."""
    state = int(np.random.SeedSequence([SEED, index]).generate_state(1, dtype=np.uint64)[0])
    g = torch.Generator().manual_seed(state)
    eps = torch.randn((K, *SHAPE), generator=g)
    if offset:
        eps = eps + offset * torch.randn((K, SHAPE[0], 1, 1), generator=g)
    return eps.double()


# ---------------------------------------------------------------- the fixed noise levels


def test_ddpm_levels_are_evenly_spaced_integer_steps():
    levels = build_objective(ObjectiveConfig(kind="ddpm")).validation_levels(8)
    assert levels.dtype == torch.int64 and levels.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    cubic = build_objective(ObjectiveConfig(kind="ddpm", timestep_sampling="cubic")).validation_levels(4)
    assert cubic.tolist() == [math.floor(1000 * (1 - (1 - q) ** 3)) for q in (0.125, 0.375, 0.625, 0.875)]


def test_edm_and_flow_levels_are_quantiles_of_their_training_distributions():
    """Against float64 inverse CDFs from the standard library."""
    qs = [(k + 0.5) / K for k in range(K)]
    edm = build_objective(ObjectiveConfig(kind="edm", p_mean=-1.2, p_std=1.2)).validation_levels(K)
    assert edm.tolist() == pytest.approx([math.exp(NormalDist(-1.2, 1.2).inv_cdf(q)) for q in qs], rel=1e-6)
    flow = build_objective(ObjectiveConfig(kind="flow", logit_mean=0.3, logit_std=0.8)).validation_levels(K)
    expected = [1 / (1 + math.exp(-NormalDist(0.3, 0.8).inv_cdf(q))) for q in qs]
    assert flow.tolist() == pytest.approx(expected, rel=1e-6)
    uniform = build_objective(ObjectiveConfig(kind="flow", timestep_sampling="uniform")).validation_levels(K)
    assert uniform.tolist() == pytest.approx(qs, rel=1e-6)


@pytest.mark.parametrize("cfg", [
    ObjectiveConfig(kind="ddpm"), ObjectiveConfig(kind="ddpm", timestep_sampling="cubic"), ObjectiveConfig(kind="edm"),
    ObjectiveConfig(kind="flow"), ObjectiveConfig(kind="flow", timestep_sampling="uniform"),
], ids=["ddpm", "ddpm-cubic", "edm", "flow", "flow-uniform"])
def test_levels_split_what_sample_t_draws_into_equal_shares(cfg):
    """Level k is a (k + 1/2) / K quantile of the levels training draws: P(t < level) <= q <= P(t <= level)
    (for the continuous kinds both are q; DDPM's integer steps have atoms, cubic a large one at T - 1)."""
    objective = build_objective(cfg)
    drawn = objective.sample_t(200_000, generator=torch.Generator().manual_seed(0)).double()
    for k, level in enumerate(objective.validation_levels(K).double()):
        q = (k + 0.5) / K
        assert (drawn < level).double().mean().item() <= q + 0.005 <= (drawn <= level).double().mean().item() + 0.01


# ---------------------------------------------------------------- expected values


def test_a_zero_epsilon_net_scores_the_mean_square_of_the_fixed_noise():
    """DDPM, epsilon target, plain MSE: net = 0 gives mean(eps^2) per bucket, whatever z0 and t."""
    loss = ValidationLoss(build_objective(ObjectiveConfig(kind="ddpm")), held_out(), validation(), rank=0, world=1)
    got = loss(zero_inputs)
    expected = torch.stack([reference_noise(i).pow(2).mean(dim=(1, 2, 3)) for i in range(5)]).mean(0)
    assert sorted(got) == sorted(["val_loss"] + [f"val_loss_t{k}" for k in range(K)])
    assert [got[f"val_loss_t{k}"] for k in range(K)] == pytest.approx(expected.tolist(), rel=1e-6)
    assert got["val_loss"] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert set(loss(zero_inputs, ema=True)) == {"val_loss_ema"} | {f"val_loss_ema_t{k}" for k in range(K)}


def test_offset_noise_is_part_of_the_fixed_noise():
    cfg = ObjectiveConfig(kind="ddpm", offset_noise=0.1)
    got = ValidationLoss(build_objective(cfg), held_out(), validation(), rank=0, world=1)(zero_inputs)
    expected = torch.stack([reference_noise(i, offset=0.1).pow(2).mean(dim=(1, 2, 3)) for i in range(5)]).mean(0)
    assert [got[f"val_loss_t{k}"] for k in range(K)] == pytest.approx(expected.tolist(), rel=1e-6)


def test_flow_and_edm_losses_at_their_levels_against_float64_write_outs():
    """net = 0: flow's loss is mean((eps - z0)^2); EDM's is lambda(sigma) mean((c_skip (z0 + sigma eps) - z0)^2)."""
    items = held_out()
    z = torch.stack([item["z"] for item in items]).double()
    eps = torch.stack([reference_noise(i) for i in range(5)])  # [item, bucket, ...]

    flow = ValidationLoss(build_objective(ObjectiveConfig(kind="flow")), items, validation(), rank=0, world=1)(zero_inputs)
    expected = (eps - z[:, None]).pow(2).mean(dim=(2, 3, 4)).mean(0)
    assert [flow[f"val_loss_t{k}"] for k in range(K)] == pytest.approx(expected.tolist(), rel=1e-5)

    edm_cfg = ObjectiveConfig(kind="edm", sigma_data=0.5)
    edm = ValidationLoss(build_objective(edm_cfg), items, validation(), rank=0, world=1)(zero_inputs)
    qs = [(k + 0.5) / K for k in range(K)]
    expected = []
    for k, q in enumerate(qs):
        sigma, sd = math.exp(NormalDist(edm_cfg.p_mean, edm_cfg.p_std).inv_cdf(q)), 0.5
        c_skip, weight = sd**2 / (sigma**2 + sd**2), (sigma**2 + sd**2) / (sigma * sd) ** 2
        expected.append((weight * (c_skip * (z + sigma * eps[:, k]) - z).pow(2).mean(dim=(1, 2, 3))).mean().item())
    assert [edm[f"val_loss_t{k}"] for k in range(K)] == pytest.approx(expected, rel=1e-4)


def test_the_net_sees_the_fixed_levels_and_the_real_context():
    seen = []

    def net(x, t, context):
        seen.append((t.tolist(), list(context)))
        return torch.zeros_like(x)

    loss = ValidationLoss(build_objective(ObjectiveConfig(kind="ddpm")), held_out(3), validation(loss_batch_size=3),
                          rank=0, world=1)
    loss(lambda batch: (net, batch["z"], batch["caption"]))
    levels = [62, 187, 312, 437, 562, 687, 812, 937]
    assert seen == [([level] * 3, ["item 0", "item 1", "item 2"]) for level in levels]


# ---------------------------------------------------------------- fixed, shared, and off the global RNG


def test_the_split_is_shared_between_processes_and_the_sums_add_up():
    objective, items = build_objective(ObjectiveConfig(kind="ddpm", offset_noise=0.1)), held_out(5)

    def net(x, t, context):
        return 0.5 * x + t.view(-1, 1, 1, 1) / 1000  # anything that depends on x and t

    inputs = lambda batch: (net, batch["z"], None)  # noqa: E731
    whole = ValidationLoss(objective, items, validation(), rank=0, world=1)
    shares = [ValidationLoss(objective, items, validation(loss_batch_size=1), rank=r, world=2) for r in range(2)]
    assert [s.indices for s in shares] == [[0, 2, 4], [1, 3]]
    sums, count = whole.local_sums(inputs)
    parts = [s.local_sums(inputs) for s in shares]
    assert count == 5 and parts[0][1] + parts[1][1] == 5
    torch.testing.assert_close(parts[0][0] + parts[1][0], sums, rtol=1e-12, atol=0)


def test_fixed_noise_fixed_result_and_the_global_rng_untouched():
    """No fork_rng here: the validation loss itself must not draw from the global RNG."""
    loss = ValidationLoss(build_objective(ObjectiveConfig(kind="flow", offset_noise=0.1)), held_out(), validation(),
                          rank=0, world=1)
    before = torch.get_rng_state()
    first, second = loss(zero_inputs), loss(zero_inputs)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == second
    other_seed = ValidationLoss(loss.objective, held_out(), validation(seed=SEED + 1), rank=0, world=1)(zero_inputs)
    assert other_seed["val_loss"] != first["val_loss"]


@pytest.mark.parametrize("bad, message", [
    ({"loss_buckets": 0}, "validation.loss_buckets must be at least 1"),
    ({"loss_batch_size": 0}, "validation.loss_batch_size must be at least 1"),
])
def test_bad_settings_are_one_line_errors(bad, message):
    with pytest.raises(LdmError, match=message):
        ValidationLoss(build_objective(ObjectiveConfig()), held_out(), validation(**bad), rank=0, world=1)


def test_off_or_without_a_held_out_split_there_is_none():
    from ldm.config import DataConfig

    said = []
    objective = build_objective(ObjectiveConfig())
    assert build_validation_loss(ValidationConfig(loss=False), DataConfig(), objective, said.append) is None
    assert build_validation_loss(ValidationConfig(), DataConfig(num_validation=0), objective, said.append) is None
    assert said == ["validation loss off: no held-out split (data.num_validation=0, or a webdataset source)"]


# ---------------------------------------------------------------- in training runs


def val_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_stage_2_logs_raw_and_ema_losses_per_bucket_that_a_model_folder_reproduces(tmp_path, vae_dir):
    """Every step (validation.every=1), in the step's log record; the last step's EMA values are
    recomputed in this process from the saved model folder (which holds the EMA weights)."""
    from test_train_unet import tiny

    from ldm.cli.train_unet import main
    from ldm.codec import LatentCodec
    from ldm.config import UNetStageConfig, load_config
    from ldm.data import build_dataset
    from ldm.eval.validation_loss import text_to_image_inputs
    from ldm.pipeline import LatentDiffusionPipeline

    run = tmp_path / "unet"
    assert main(tiny(run, vae_dir, "train.max_steps=3", "validation.every=1", "validation.loss_buckets=4",
                     "objective.offset_noise=0.05", "ema.decay=0.5", "ema.use_warmup=false")) == 0
    records = val_records(run)
    keys = {"val_loss", "val_loss_ema"} | {f"val_loss{e}_t{k}" for e in ("", "_ema") for k in range(4)}
    assert [r["step"] for r in records] == [1, 2, 3] and all(keys <= set(r) and "loss" in r for r in records)
    # diffusers' EMA copies the weights at its first step (decay 0), then lags behind them.
    assert records[0]["val_loss"] == records[0]["val_loss_ema"]
    assert all(r["val_loss"] != r["val_loss_ema"] for r in records[1:])
    for r in records:
        assert r["val_loss"] == pytest.approx(sum(r[f"val_loss_t{k}"] for k in range(4)) / 4, rel=1e-9)

    cfg = load_config(UNetStageConfig, str(run / "final/ldm_config.yaml"))
    pipe = LatentDiffusionPipeline.from_pretrained(str(run / "final"))
    loss = ValidationLoss(build_objective(cfg.objective), build_dataset(cfg.data, "validation"), cfg.validation,
                          rank=0, world=1)
    with torch.no_grad():
        again = loss(text_to_image_inputs(LatentCodec(pipe.vae), pipe.text_encoder, pipe.tokenizer, pipe.unet, "cpu"),
                     ema=True)
    assert {k: again[k] for k in again} == pytest.approx({k: records[-1][k] for k in again}, rel=1e-5)


def test_resume_with_validation_loss_every_step_is_bit_identical(tmp_path, vae_dir):
    """Three runs of 4 steps: without the validation loss; with it at every step; with it at every step,
    stopped at step 2 and resumed. The same weights, and the resumed steps log the same validation loss."""
    from test_train_unet import tiny

    from ldm.cli.train_unet import main

    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.checkpoints_total_limit=null",
              "objective.offset_noise=0.05", "validation.loss_buckets=2"]
    assert main(tiny(tmp_path / "off", vae_dir, *common, "validation.loss=false", "validation.every=100")) == 0
    run = tmp_path / "on"
    assert main(tiny(run, vae_dir, *common, "validation.every=1")) == 0
    straight = load_file(str(run / "final/unet/diffusion_pytorch_model.safetensors"))
    straight_raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    logged = val_records(run)
    assert not val_records(tmp_path / "off")
    off = load_file(str(tmp_path / "off/final/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(off[k], straight[k]) for k in straight)

    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    assert main(tiny(run, vae_dir, *common, "validation.every=1", "--resume", "auto")) == 0
    resumed = load_file(str(run / "final/unet/diffusion_pytorch_model.safetensors"))
    resumed_raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(torch.equal(straight_raw[k], resumed_raw[k]) for k in straight_raw)
    again = val_records(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # steps 1-2 kept from before, 3-4 redone
    assert [{k: v for k, v in r.items() if k.startswith("val_loss")} for r in again] == \
        [{k: v for k, v in r.items() if k.startswith("val_loss")} for r in logged]


def test_control_stage_logs_raw_and_ema_validation_loss(tmp_path, base_dir):
    from test_train_control import tiny

    from ldm.cli.train_control import main

    run = tmp_path / "controlnet"
    assert main(tiny(run, base_dir, "controlnet", "train.max_steps=2", "validation.every=1",
                     "validation.loss_buckets=3", "ema.decay=0.5", "ema.use_warmup=false")) == 0
    records = val_records(run)
    keys = {"val_loss", "val_loss_ema"} | {f"val_loss{e}_t{k}" for e in ("", "_ema") for k in range(3)}
    assert [r["step"] for r in records] == [1, 2] and all(keys <= set(r) for r in records)
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in records)
    # The ControlNet starts with zero convolutions: the raw weights moved at step 2, the EMA lags behind.
    assert records[1]["val_loss"] != records[1]["val_loss_ema"]


# ---------------------------------------------------------------- the loop's evaluate hook (toy stage of test_loop.py)


@pytest.mark.parametrize("log_every", [1, 3])
def test_the_loop_evaluates_raw_then_ema_in_eval_mode_and_leaves_training_alone(tmp_path, monkeypatch, log_every):
    """`evaluate(step, ema)` at steps 2 and 4 (every=2, 4 steps), raw weights then EMA weights, in eval mode;
    it draws from the global RNG, yet training ends as without it. Its records join the step's log record
    when one is due (log_every=1), else they are a record of their own (log_every=3)."""
    import test_loop

    calls, real = [], test_loop.training_loop

    def with_evaluate(*args, **kw):
        net, ema = kw["net"], kw["ema"]

        def evaluate(step, use_ema):
            ema_in = all(torch.equal(p, s) for p, s in zip(net.parameters(), ema.shadow_params))
            calls.append((step, use_ema, net.training, ema_in))
            torch.rand(3)
            return {f"probe{'_ema' if use_ema else ''}": net.weight.sum().item()}

        return real(*args, **kw, evaluate=evaluate)

    plain = test_loop.toy_stage(tmp_path / "plain", every=2, log_every=log_every)
    monkeypatch.setattr(test_loop, "training_loop", with_evaluate)
    seen = test_loop.toy_stage(tmp_path / "run", every=2, log_every=log_every)
    assert calls == [(2, False, False, False), (2, True, False, True), (4, False, False, False), (4, True, False, True)]
    assert test_loop.same(seen["raw"], plain["raw"]) and test_loop.same(seen["saved"]["ema"], plain["saved"]["ema"])
    probed = [r for r in test_loop.records(tmp_path / "run") if "probe" in r]
    assert [r["step"] for r in probed] == [2, 4] and all(r["probe"] != r["probe_ema"] for r in probed)
    assert all(("loss" in r) == (log_every == 1) for r in probed)

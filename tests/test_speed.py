"""Speed levers (ldm/speed.py, train.speed, ema.foreach): each gives the numbers it gives when off.

Tiny U-Nets on the CPU; a lever that only re-lays out or re-launches the work must match the
plain model to float32 rounding, bf16 autocast to bf16 rounding.
"""

import copy
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from ldm.config import EMAConfig, SpeedConfig, TrainConfig, UNetStageConfig, load_config
from ldm.errors import LdmError
from ldm.speed import apply_sampling_levers, apply_speed_levers, compile_module, xformers_status
from ldm.train.ema import build_ema
from ldm.train.optim import build_optimizer, check_optim_config


def unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )


def batch(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10, 500][:n]), torch.randn(n, 5, 32, generator=g)


def loss_and_grads(model, x, t, c):
    model.zero_grad(set_to_none=True)
    loss = model(x, t, c).sample.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_training_numbers(plain, fast, atol):
    x, t, c = batch()
    loss0, grads0 = loss_and_grads(plain, x, t, c)
    loss1, grads1 = loss_and_grads(fast, x, t, c)
    assert torch.allclose(loss0, loss1, rtol=0, atol=atol), (loss0, loss1)
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=atol)


def test_defaults_change_nothing():
    assert SpeedConfig() == SpeedConfig(channels_last=False, compile=False, compile_mode=None, adamw="default")
    assert EMAConfig().foreach is False and TrainConfig().speed == SpeedConfig()
    model = unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_speed_levers(model, SpeedConfig())
    assert not model._forward_pre_hooks and not hasattr(model, "_compiled_call_impl") or model._compiled_call_impl is None
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in model.state_dict().items())
    # The keys exist in the YAML schema: train.speed.* and ema.foreach overrides load.
    cfg = load_config(UNetStageConfig, None, ["train.speed.channels_last=true", "train.speed.adamw=fused", "ema.foreach=true"])
    assert cfg.train.speed.channels_last and cfg.train.speed.adamw == "fused" and cfg.ema.foreach


def test_channels_last_gives_the_same_loss_and_gradients():
    plain, fast = unet(), unet()
    apply_speed_levers(fast, SpeedConfig(channels_last=True))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_training_numbers(plain, fast, atol=1e-6)
    # A keyword `sample` is converted too (the pipeline and sampling loop pass it positionally).
    x, t, c = batch()
    with torch.no_grad():
        assert torch.allclose(plain(sample=x, timestep=t, encoder_hidden_states=c).sample,
                              fast(sample=x, timestep=t, encoder_hidden_states=c).sample, atol=1e-5)


def test_torch_compile_keeps_the_module_and_its_state_dict_names():
    model = unet()
    keys = set(model.state_dict())
    apply_speed_levers(model, SpeedConfig(compile=True))
    assert model._compiled_call_impl is not None and set(model.state_dict()) == keys  # no _orig_mod. prefix


@pytest.mark.skipif(os.environ.get("LDM_SLOW_TESTS") != "1",
                    reason="Inductor compiles the tiny U-Net's forward and backward in ~1-10 min on a 2-core CPU: LDM_SLOW_TESTS=1")
def test_torch_compile_gives_the_same_loss_and_gradients():
    """Inductor on the CPU (a C++ compiler is needed); the U-Net's forward and backward."""
    plain, fast = unet(), unet()
    apply_speed_levers(fast, SpeedConfig(compile=True))
    assert fast._compiled_call_impl is not None
    assert set(fast.state_dict()) == set(plain.state_dict())  # Module.compile: no _orig_mod. prefix
    assert_same_training_numbers(plain, fast, atol=1e-5)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_implementations_take_the_same_steps(impl):
    """Given the same gradients, every step of foreach / fused AdamW lands where the plain one does.

    (Over a real run the tiny per-step rounding differences of the fused kernel grow, as any
    reordering of float sums does in training; the update rule itself is the same.)"""
    plain, fast = unet(), unet()
    opt0 = build_optimizer(plain.parameters(), TrainConfig(learning_rate=1e-2, adam_weight_decay=1e-2))
    opt1 = build_optimizer(fast.parameters(), TrainConfig(learning_rate=1e-2, adam_weight_decay=1e-2, speed=SpeedConfig(adamw=impl)))
    assert opt1.defaults[impl] is True and not opt0.defaults["fused"]
    for seed in range(3):
        loss_and_grads(plain, *batch(seed))  # gradients at the plain model's weights, given to both
        for p0, p1 in zip(plain.parameters(), fast.parameters()):
            p1.grad = p0.grad.clone()
        opt0.step()
        opt1.step()
        for p0, p1 in zip(plain.parameters(), fast.parameters()):
            assert torch.allclose(p0, p1, rtol=0, atol=1e-6)
    moved = [not torch.equal(p, q) for p, q in zip(plain.parameters(), unet().parameters())]
    assert sum(moved) > len(moved) // 2  # the steps did move the weights


def test_unknown_adamw_implementation_is_refused():
    with pytest.raises(LdmError, match="train.speed.adamw must be one of default, foreach, fused"):
        check_optim_config(TrainConfig(speed=SpeedConfig(adamw="apex")))


def test_foreach_ema_averages_as_the_loop_does():
    model = unet()
    loop, foreach = build_ema(model, EMAConfig(decay=0.9)), build_ema(model, EMAConfig(decay=0.9, foreach=True))
    assert isinstance(foreach, EMAModel) and foreach.foreach and not loop.foreach
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        loop.step(model.parameters())
        foreach.step(model.parameters())
    assert foreach.cur_decay_value == loop.cur_decay_value < 0.9  # the warm-up ran the same
    for s0, s1 in zip(loop.shadow_params, foreach.shadow_params):
        assert torch.allclose(s0, s1, rtol=0, atol=1e-6)


def test_bf16_autocast_stays_within_bf16_tolerance():
    plain = unet()
    x, t, c = batch()
    with torch.no_grad():
        ref = plain(x, t, c).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = plain(x, t, c).sample
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa; a few layers of rounding stay within a few percent of the output's scale.
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert (low.float() - ref).abs().max() > 0  # it did run in bf16


def test_sampling_levers_fused_qkv_and_channels_last_give_the_same_prediction():
    plain = unet().eval()
    fast = apply_sampling_levers(copy.deepcopy(plain), channels_last=True, fuse_qkv=True)
    assert type(fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor).__name__ == "FusedAttnProcessor2_0"
    x, t, c = batch()
    with torch.no_grad():
        assert torch.allclose(plain(x, t, c).sample, fast(x, t, c).sample, atol=1e-5)


def test_cuda_graphs_are_refused_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU, bench/sample_speed.py measures reduce-overhead")
    with pytest.raises(LdmError, match="needs the model on a CUDA GPU"):
        compile_module(unet(), "reduce-overhead")
    with pytest.raises(LdmError, match="sampling only"):
        apply_speed_levers(unet(), SpeedConfig(compile=True, compile_mode="reduce-overhead"))
    with pytest.raises(LdmError, match="compile mode must be one of"):
        compile_module(unet(), "fastest")


def test_xformers_status_names_why_it_cannot_run():
    status = xformers_status()
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        assert status.startswith("unavailable: ") and "Error" in status
    else:
        assert status == ("available" if torch.cuda.is_available() else "unavailable: xformers is installed but needs a CUDA GPU")


def test_training_with_the_levers_logs_the_same_losses(tmp_path, vae_dir):
    """train_unet.py with channels_last, foreach AdamW and foreach EMA: the same run, to float rounding."""
    import json

    from ldm.cli.train_unet import main
    from test_train_unet import tiny

    def losses(run, *levers):
        assert main(tiny(run, vae_dir, "train.max_steps=3", "train.checkpoint_every=100", *levers)) == 0
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    plain = losses(tmp_path / "plain")
    fast = losses(tmp_path / "fast", "train.speed.channels_last=true", "train.speed.adamw=foreach", "ema.foreach=true")
    assert len(plain) == 3 and plain == pytest.approx(fast, rel=1e-4)
    saved = load_config(UNetStageConfig, str(tmp_path / "fast/final/ldm_config.yaml"))
    assert saved.train.speed.channels_last and saved.ema.foreach

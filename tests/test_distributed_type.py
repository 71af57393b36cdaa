"""The loops refuse what they cannot do, before any training starts (ldm/train/distributed.py).

Each decision is taken from the distributed type and its plugin, built here as
`accelerate launch` builds them from configs/accelerate/*.yaml, without launching
DeepSpeed (not installed) or FSDP (tests/test_fsdp.py trains under it).
"""

from types import SimpleNamespace

import pytest
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

from ldm.errors import LdmError
from ldm.train.distributed import distributed_refusal, fill_micro_batch
from ldm.train.run import check_distributed_type

FSDP, DEEPSPEED = DistributedType.FSDP, DistributedType.DEEPSPEED
STAGE1 = ("stage 1", ("autoencoder", "discriminator"))
STAGE2_TEXT = ("stage 2", ("U-Net", "text encoder"))


def accelerator(kind, fsdp_plugin=None, deepspeed_plugin=None):
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=fsdp_plugin,
                                                                       deepspeed_plugin=deepspeed_plugin))


def refused(kind, stage, trained, **kwargs) -> str:
    with pytest.raises(LdmError) as info:
        check_distributed_type(accelerator(kind, **kwargs), stage, trained)
    assert "\n" not in str(info.value)
    return str(info.value)


def fsdp2():
    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def zero(stage):
    return DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1, gradient_clipping=1.0)


def test_fsdp_is_refused_for_stage_1_with_the_way_out():
    assert "multi_gpu.yaml" in refused(FSDP, *STAGE1, fsdp_plugin=fsdp2())
    assert "multi_gpu.yaml" in refused(FSDP, "stage 1", ("autoencoder",), fsdp_plugin=fsdp2())  # no discriminator


def test_fsdp2_trains_stage_2_and_the_control_stage():
    check_distributed_type(accelerator(FSDP, fsdp_plugin=fsdp2()), "stage 2", ("U-Net",))
    check_distributed_type(accelerator(FSDP, fsdp_plugin=fsdp2()), "the control stage", ("ControlNet",))
    check_distributed_type(accelerator(FSDP, fsdp_plugin=fsdp2()), "the control stage", ("T2I-Adapter",))


def test_fsdp_refuses_a_second_trained_model_lora_fsdp1_and_full_state_dicts():
    message = refused(FSDP, *STAGE2_TEXT, fsdp_plugin=fsdp2())
    assert "text_encoder.trainable=false" in message and "multi_gpu.yaml" in message
    assert "multi_gpu.yaml" in distributed_refusal(FSDP, "stage 2", ("U-Net",), fsdp_plugin=fsdp2(), lora=True)
    fsdp1 = FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="SHARDED_STATE_DICT")
    assert "fsdp_version: 2" in refused(FSDP, "stage 2", ("U-Net",), fsdp_plugin=fsdp1)
    full = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    assert "SHARDED_STATE_DICT" in refused(FSDP, "stage 2", ("U-Net",), fsdp_plugin=full)


def test_deepspeed_refuses_two_models_naming_the_alternative():
    message = refused(DEEPSPEED, *STAGE1, deepspeed_plugin=zero(2))
    assert "autoencoder + discriminator" in message and "multi_gpu.yaml" in message and "fsdp" not in message
    message = refused(DEEPSPEED, *STAGE2_TEXT, deepspeed_plugin=zero(2))
    assert "multi_gpu.yaml" in message and "fsdp.yaml" in message


def test_deepspeed_zero2_trains_one_model_and_zero3_is_refused():
    check_distributed_type(accelerator(DEEPSPEED, deepspeed_plugin=zero(2)), "stage 2", ("U-Net",))
    check_distributed_type(accelerator(DEEPSPEED, deepspeed_plugin=zero(2)), "the control stage", ("ControlNet",))
    check_distributed_type(accelerator(DEEPSPEED, deepspeed_plugin=zero(2)), "stage 1", ("autoencoder",))
    message = refused(DEEPSPEED, "stage 2", ("U-Net",), deepspeed_plugin=zero(3))
    assert "deepspeed_zero2.yaml" in message and "fsdp.yaml" in message


def test_the_shipped_deepspeed_configs_auto_micro_batch_is_the_trainers_batch_size():
    """Accelerate reads DeepSpeed's `auto` micro-batch from a torch DataLoader; a webdataset StreamLoader
    is not one: the trainer fills it with train.batch_size, and the StreamLoader tells its batch size."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from torch.utils.data import DataLoader

    from ldm.train.loader import StreamLoader

    args = launch_command_parser().parse_args(["--config_file", "configs/accelerate/deepspeed_zero2.yaml", "x.py"])
    args, defaults, *_ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
    env = prepare_deepspeed_cmd_env(args)[1]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            if "DEEPSPEED" in key:
                patch.setenv(key, value)
        plugin = DeepSpeedPlugin()  # as each launched process builds it
    assert plugin.is_auto("train_micro_batch_size_per_gpu")
    fill_micro_batch(plugin, 3)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    fill_micro_batch(plugin, 5)  # a number set in the config is kept
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert StreamLoader(DataLoader(list(range(8)), batch_size=4)).batch_size == 4


def test_under_deepspeed_a_nonfinite_loss_never_reaches_the_engine():
    """Accelerate's DeepSpeed backward runs the engine's optimizer step itself, before the loop's
    non-finite check: a NaN loss is stopped before backward, on every process, weights untouched."""
    import torch

    from ldm.train.loop import Update, apply_update

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    engine_steps = []

    def backward(loss):  # as accelerate's DeepSpeedEngineWrapper.backward: the engine's backward, then its step
        loss.backward()
        optimizer.step()
        engine_steps.append(1)

    reduced = []
    engine = SimpleNamespace(distributed_type=DEEPSPEED, sync_gradients=True, scaler=None, backward=backward,
                             reduce=lambda t, op: reduced.append(op) or t, clip_grad_norm_=lambda p, n: None)
    # What the loop holds under DeepSpeed: accelerate's optimizer and scheduler wrappers, whose steps are no-ops.
    wrapped = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None,
                              param_groups=optimizer.param_groups)
    scheduler = SimpleNamespace(step=lambda: None)
    assert not apply_update(engine, Update((weight * float("nan")).sum(), wrapped, scheduler), 1.0)
    assert engine_steps == [] and torch.equal(weight.detach(), torch.ones(2)) and reduced == ["sum"]
    assert apply_update(engine, Update((weight * 2).sum(), wrapped, scheduler), 1.0)
    assert engine_steps == [1] and torch.allclose(weight.detach(), torch.full((2,), 0.8))


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                  DistributedType.DEEPSPEED])
def test_whole_parameter_types_pass(kind):
    check_distributed_type(SimpleNamespace(distributed_type=kind))

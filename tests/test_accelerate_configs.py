"""configs/accelerate/*.yaml read as `accelerate launch --config_file` reads them.

Accelerate's loader checks the top-level keys only, so the nested fsdp_config and
deepspeed_config keys are checked against the options `accelerate launch` knows, the
FSDP values against accelerate's own lists, and the FSDP wrapping classes against a
diffusers U-Net. (DeepSpeed needs GPUs: not run here; FSDP2 trains in tests/test_fsdp.py.)
"""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import constants
from accelerate.utils.launch import prepare_multi_gpu_env

from ldm.config import UNetStageConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "configs/accelerate"
EXPECTED = {  # file: (distributed_type, processes in all, machines)
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
    "fsdp.yaml": ("FSDP", 8, 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1),
}


def launch_args(name: str):
    """The arguments `accelerate launch --config_file FILE train_unet.py` ends up with."""
    args = launch_command_parser().parse_args(["--config_file", str(FOLDER / name), "train_unet.py"])
    return _validate_launch_command(args)[0]


def test_every_file_is_tested():
    assert sorted(p.name for p in FOLDER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_the_file(name):
    config = load_config_from_file(str(FOLDER / name))
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == EXPECTED[name]
    # The trainer passes train.mixed_precision to Accelerate, which wins over the file:
    # the files say what the SD configs they are meant for say.
    sd_base = load_config(UNetStageConfig, str(ROOT / "configs/unet/sd-base.yaml"))
    assert config.mixed_precision == sd_base.train.mixed_precision
    options = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(getattr(config, section) or {}) - options
        assert not unknown, f"{name}: {section} keys accelerate launch does not know: {unknown}"


def test_multi_node_is_the_first_of_two_machines():
    args = launch_args("multi_node.yaml")
    assert (args.multi_gpu, args.num_machines, args.num_processes, args.machine_rank) == (True, 2, 16, 0)
    assert args.main_process_ip and args.main_process_port == 29500


def test_fsdp_wraps_the_unets_blocks_and_saves_shards(tiny_unet):
    from accelerate.utils.dataclasses import get_module_class_from_name

    args = launch_args("fsdp.yaml")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)  # what each launched process reads its FSDP plugin from
    # FSDP2 (fully_shard, DTensor parameters): what ldm/train/fsdp.py is written for.
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] in ("true", "false")
    assert env["FSDP_AUTO_WRAP_POLICY"] in constants.FSDP_AUTO_WRAP_POLICY
    # Sharded: save_state / load_state write and read each process's shard.
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    # The plugin looks the classes up by name in the model, as here: each must exist.
    for name in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):
        assert get_module_class_from_name(tiny_unet, name) is not None, name


def test_deepspeed_zero2_matches_the_trainer_settings():
    args = launch_args("deepspeed_zero2.yaml")
    assert args.use_deepspeed and args.zero_stage == 2
    assert (args.offload_optimizer_device, args.offload_param_device) == ("none", "none")
    # DeepSpeed does the accumulation and clipping itself: they must be the trainer's.
    sd_base = load_config(UNetStageConfig, str(ROOT / "configs/unet/sd-base.yaml"))
    assert args.gradient_accumulation_steps == sd_base.train.gradient_accumulation_steps
    assert args.gradient_clipping == sd_base.train.max_grad_norm

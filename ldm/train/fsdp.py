"""FSDP2 (PyTorch's `fully_shard`, through Accelerate) for the one model a stage trains.

What a stage gets under `accelerate launch --config_file configs/accelerate/fsdp.yaml`:

- `accelerator.prepare` shards the trained model (stage 2's U-Net, the control stage's
  ControlNet or T2I-Adapter): each parameter becomes a DTensor of which every process
  holds one shard (dim 0), and so do its gradients and optimizer states. The frozen
  models (VAE, text encoder, the control stage's base U-Net) are not prepared: they stay
  whole and frozen on every process.
- The EMA is built after `prepare`, on the sharded parameters: each shadow weight is a
  DTensor sharded as its parameter, so every process averages its own shards, locally.
  It is saved gathered (`gathered_shadow`: one parameter at a time; ema.safetensors holds
  whole tensors, as under DDP, so an FSDP checkpoint's EMA reads like any other) and
  loaded back into the shards (`like`).
- Validation grids and the final folder need whole weights on the main process: every
  process joins `FullWeights.gather` (with the EMA weights swapped in), which loads the
  full state dict into the main process's unsharded copy of the model, made before
  `prepare`; the main process samples and saves with that copy.
- Checkpoints: `accelerator.save_state` writes the model and optimizer as sharded
  torch.distributed.checkpoint folders (pytorch_model_fsdp_0/, optimizer_0/), one file per
  process; manifest.json covers them like any other file (manifest.py).

Accelerate runs FSDP on accelerators only: on the CPU it quietly falls back to DDP over
gloo (its state picks FSDP only for GPU-like distributed types). `fsdp_on_cpu` switches it
back on, so that two CPU processes run the very code path a GPU cluster runs (fully_shard
over a CPU device mesh, gloo collectives): that is how the tests run it.
"""

import copy
import os
from typing import Optional

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.dataclasses import get_module_class_from_name

from ldm.errors import LdmError


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (accelerate launch with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(accelerator) -> None:
    """Turn FSDP on where Accelerate left it off because the processes run on CPUs (see the module doc).

    Both states are set: AcceleratorState copies PartialState's distributed type each time it is built.
    """
    if not (fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def fsdp_refusal(plugin) -> Optional[str]:
    """Why this FSDP plugin cannot train here (one line), or None."""
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        return (f"FSDP version {version} is not supported (the EMA and the whole-weight gather are written for FSDP2's "
                "DTensor parameters): set fsdp_version: 2 as configs/accelerate/fsdp.yaml does")
    kind = str(getattr(plugin, "state_dict_type", "SHARDED_STATE_DICT")).split(".")[-1]
    if kind != "SHARDED_STATE_DICT":
        return (f"fsdp_state_dict_type {kind} is not supported: set SHARDED_STATE_DICT (each process saves its own shard; "
                "the final folder is gathered separately) as configs/accelerate/fsdp.yaml does")
    return None


def fit_wrapping(accelerator, model: torch.nn.Module) -> None:
    """Wrap only the block classes `model` has: the config names the U-Net's and ControlNet's
    (BasicTransformerBlock, ResnetBlock2D); a T2I-Adapter has neither and is sharded whole."""
    plugin = accelerator.state.fsdp_plugin
    names = plugin.transformer_cls_names_to_wrap
    if names:
        plugin.transformer_cls_names_to_wrap = [n for n in names if get_module_class_from_name(model, n) is not None]


def check_even_shares(items: int, processes: int, batch_size: int, what: str) -> None:
    """Under FSDP every forward pass gathers shards from every process: each must run as many batches."""
    counts = {-(-len(range(r, items, processes)) // batch_size) for r in range(processes)}
    if len(counts) > 1:
        raise LdmError(
            f"under FSDP every process runs {what} in step, but {items} items over {processes} processes in batches of "
            f"{batch_size} give {sorted(counts)} batches: use a multiple of {processes * batch_size} items"
        )


def is_dtensor(tensor) -> bool:
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def reshard(model) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state (its parameters DTensors again).

    fully_shard leaves the root unit's parameters gathered after a forward pass, for the
    backward that usually follows; a forward without backward (the validation loss) ends there.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def gathered_shadow(ema, keep: bool = True) -> Optional[list]:
    """The EMA's shadow weights as whole CPU tensors (every process must call it: DTensors are gathered,
    one at a time); `keep=False` (the processes that do not write) joins the gathers and keeps nothing."""
    if ema is None:
        return None
    shadow = []
    for tensor in ema.shadow_params:
        whole = (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach()
        if keep:
            shadow.append(whole.cpu())
    return shadow if keep else None


def like(whole: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `current`: this process's shard of it when `current` is a DTensor (no communication:
    every process read the same whole tensor)."""
    if not is_dtensor(current):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=current.device, dtype=current.dtype)
    return distribute_tensor(whole, current.device_mesh, current.placements, src_data_rank=None)


class FullWeights:
    """The main process's unsharded copy of the trained model, for validation grids and the final save.

    Made before `prepare` (a deep copy of the whole model; None on the other processes),
    kept on the CPU between uses; `gather` (every process) loads the sharded model's full
    state dict into it and moves it to the training device.
    """

    def __init__(self, accelerator, model: torch.nn.Module):
        self.accelerator = accelerator
        self.module = copy.deepcopy(model).cpu().requires_grad_(False) if accelerator.is_main_process else None

    def gather(self, sharded: torch.nn.Module) -> Optional[torch.nn.Module]:
        state = self.accelerator.get_state_dict(sharded)  # collective: full tensors on the main process only
        if self.module is None:
            return None
        self.module.load_state_dict(state)
        return self.module.to(self.accelerator.device)

    def release(self) -> None:
        if self.module is not None:
            self.module.cpu()


def fsdp_parts(accelerator, model: torch.nn.Module) -> Optional[FullWeights]:
    """Before `prepare`: under FSDP, fit the wrapping to `model` and keep the main process's whole copy of it."""
    if not is_fsdp(accelerator):
        return None
    fit_wrapping(accelerator, model)
    return FullWeights(accelerator, model)


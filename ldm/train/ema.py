"""Exponential moving average of the U-Net's weights (diffusers' `EMAModel`).

The EMA weights are what we sample with and what the final model folder holds: they
give visibly cleaner samples than the raw weights of a short run. Checkpoints carry it
(checkpoint.py: ema.safetensors + ema.json) and a resume continues it.

It averages the parameters that train (`requires_grad`): all of them for a model trained
whole, only the adapters of a LoRA fine-tune (a frozen base needs no average, and a copy
of it would cost the base's size again in memory and in every checkpoint).
"""

from contextlib import contextmanager
from typing import Optional

import torch
from diffusers.training_utils import EMAModel

from ldm.errors import LdmError
from ldm.train.fsdp import reshard


def trained_parameters(parameters):
    """The parameters among `parameters` that receive gradients."""
    return [p for p in parameters if p.requires_grad]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 (DTensor) tensor, in place; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sharded(parameters) -> bool:
    return any(hasattr(p, "to_local") for p in parameters)


class TrainedEMA(EMAModel):
    """diffusers' `EMAModel` over the trained parameters of whatever it is given.

    Under FSDP2 its shadow weights are DTensors sharded as the parameters (it is built on
    the prepared model, see fsdp.py): the average is taken shard by shard by diffusers'
    step, and the swaps below copy shard to shard, locally (diffusers' `.data` copies mix
    DTensors with plain tensors).
    """

    def step(self, parameters):
        super().step(trained_parameters(parameters))

    @torch.no_grad()
    def copy_to(self, parameters):
        parameters = trained_parameters(parameters)
        if not sharded(parameters):
            return super().copy_to(parameters)
        for shadow, param in zip(self.shadow_params, parameters):
            local(param).copy_(local(shadow))

    @torch.no_grad()
    def store(self, parameters):
        parameters = trained_parameters(parameters)
        if not sharded(parameters):
            return super().store(parameters)
        self.temp_stored_params = [local(param).detach().cpu().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters):
        parameters = trained_parameters(parameters)
        if not sharded(parameters):
            return super().restore(parameters)
        for stored, param in zip(self.temp_stored_params, parameters):
            local(param).copy_(stored)
        self.temp_stored_params = None


def build_ema(model, cfg) -> Optional[EMAModel]:
    """An EMA over `model`'s trained parameters from an `EMAConfig`, or None when disabled."""
    if not cfg.enabled:
        return None
    if not 0.0 <= cfg.decay <= 1.0:
        raise LdmError(f"ema.decay must be in [0, 1], got {cfg.decay}")
    return TrainedEMA(
        trained_parameters(model.parameters()),
        decay=cfg.decay,
        use_ema_warmup=cfg.use_warmup,
        inv_gamma=cfg.inv_gamma,
        power=cfg.power,
        model_cls=type(model),
        model_config=model.config,
        foreach=cfg.foreach,
    )


@contextmanager
def ema_weights(ema: Optional[EMAModel], model):
    """Swap the EMA weights into `model` for the duration of the block (no-op without EMA)."""
    reshard(model)  # FSDP2: a forward without backward (evaluation) leaves the root's weights gathered
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        reshard(model)
        ema.restore(model.parameters())

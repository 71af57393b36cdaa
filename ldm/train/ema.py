"""Exponential moving average of the U-Net's weights (diffusers' `EMAModel`).

The EMA weights are what we sample with and what the final model folder holds: they
give visibly cleaner samples than the raw weights of a short run. Its state is
registered with the Accelerator, so checkpoints carry it and a resume continues it.

It averages the parameters that train (`requires_grad`): all of them for a model trained
whole, only the adapters of a LoRA fine-tune (a frozen base needs no average, and a copy
of it would cost the base's size again in memory and in every checkpoint).
"""

from contextlib import contextmanager
from typing import Optional

from diffusers.training_utils import EMAModel

from ldm.errors import LdmError


def trained_parameters(parameters):
    """The parameters among `parameters` that receive gradients."""
    return [p for p in parameters if p.requires_grad]


class TrainedEMA(EMAModel):
    """diffusers' `EMAModel` over the trained parameters of whatever it is given."""

    def step(self, parameters):
        super().step(trained_parameters(parameters))

    def copy_to(self, parameters):
        super().copy_to(trained_parameters(parameters))

    def store(self, parameters):
        super().store(trained_parameters(parameters))

    def restore(self, parameters):
        super().restore(trained_parameters(parameters))


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
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())

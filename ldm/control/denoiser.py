"""The frozen U-Net steered by a control model, as the `net(x, t, context)` a loss object calls.

The loss objects (`ldm.objectives`) precondition the noisy latents and the timestep for
their objective and call `net(x, t, context) -> prediction`; here the control model reads
the same (x, t, context) plus the control image, and its outputs enter the U-Net as
diffusers' StableDiffusionControlNetPipeline / StableDiffusionAdapterPipeline feed them,
so what trains here is what those pipelines sample.
"""

import torch
from diffusers import ControlNetModel


class ControlledDenoiser:
    """`unet` (frozen) + `control` (a ControlNetModel or T2IAdapter) for one batch of control images."""

    def __init__(self, unet, control, cond: torch.Tensor, dtype: torch.dtype):
        self.unet, self.control, self.cond, self.dtype = unet, control, cond, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if isinstance(_unwrap(self.control), ControlNetModel):
            down, mid = self.control(x, t, encoder_hidden_states=context, controlnet_cond=self.cond, return_dict=False)
            return self.unet(
                x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype),
                down_block_additional_residuals=[r.to(self.dtype) for r in down],
                mid_block_additional_residual=mid.to(self.dtype), return_dict=False,
            )[0]
        # T2I-Adapter: features of the control image alone (no timestep), added inside the down blocks.
        features = self.control(self.cond)
        return self.unet(
            x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype),
            down_intrablock_additional_residuals=[f.to(self.dtype) for f in features], return_dict=False,
        )[0]


def _unwrap(model):
    """The module inside a DDP / compile wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)

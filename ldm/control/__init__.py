"""Conditional control on a frozen base model: ControlNet and T2I-Adapter.

- `models.py`: build a ControlNet (`ControlNetModel.from_unet`) or a T2I-Adapter that fits
  the base U-Net, or continue from an existing folder;
- `denoiser.py`: the frozen U-Net steered by the control model, as the plain
  `net(x, t, context)` callable the stage-2 loss objects take;
- `dropout.py`: conditioning dropout (a blank control with a configured probability).
"""

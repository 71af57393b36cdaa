"""Speed levers for the U-Net, in training (`train.speed`) and in sampling.

Each lever changes how the work is laid out or launched, not what is computed, so a
lever on gives the same numbers as off (to float rounding; bf16 autocast, a separate
switch, `train.mixed_precision`, is the one that changes precision). bench/train_speed.py
and bench/sample_speed.py measure each one on and off; tests/test_speed.py checks the
numbers. The levers, after PyTorch's performance tuning guide and diffusers' "Accelerate
inference of text-to-image diffusion models":

- channels_last: NHWC weights and activations, the layout oneDNN's and cuDNN's fastest
  convolutions use (the U-Net is mostly 3x3 convolutions);
- torch.compile: Inductor fuses the pointwise work (GroupNorm + SiLU, residual adds,
  the attention reshapes) into fewer kernels;
- compile mode "reduce-overhead": CUDA graphs replay a whole U-Net call with one launch
  (GPU only: on the CPU there is no launch cost to remove);
- fused QKV projections: one matmul for q, k, v of a self-attention (k, v of a
  cross-attention) instead of three (sampling only: it adds `to_qkv` weights next to
  `to_q`/`to_k`/`to_v`, so a model trained fused would save stale unfused weights);
- fused / foreach AdamW and foreach EMA live in ldm/train/optim.py and ldm/train/ema.py.
"""

from typing import Optional

import torch

from ldm.errors import LdmError

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def to_channels_last(unet: torch.nn.Module) -> None:
    """Store the U-Net's 4-D weights NHWC and hand its first convolution an NHWC input.

    The pre-hook converts the latents: convolutions keep the layout of their input, so an
    NCHW input would make each layer convert back and forth.
    """
    unet.to(memory_format=torch.channels_last)

    def nhwc_input(module, args, kwargs):
        if args and torch.is_tensor(args[0]) and args[0].dim() == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
        elif torch.is_tensor(kwargs.get("sample")) and kwargs["sample"].dim() == 4:
            kwargs = {**kwargs, "sample": kwargs["sample"].contiguous(memory_format=torch.channels_last)}
        return args, kwargs

    unet.register_forward_pre_hook(nhwc_input, with_kwargs=True)


def compile_module(module: torch.nn.Module, mode: Optional[str] = None, fullgraph: bool = False) -> None:
    """torch.compile in place (`Module.compile`): the state dict keeps its names, so checkpoints,
    the EMA and `save_pretrained` see the same module as without it."""
    if mode not in COMPILE_MODES:
        raise LdmError(f"compile mode must be one of {', '.join(map(str, COMPILE_MODES))}, got '{mode}'")
    if mode == "reduce-overhead" and not any(p.is_cuda for p in module.parameters()):
        raise LdmError("compile mode 'reduce-overhead' (CUDA graphs) needs the model on a CUDA GPU; use the default mode on CPU")
    module.compile(mode=mode, fullgraph=fullgraph)


def apply_speed_levers(unet: torch.nn.Module, cfg) -> torch.nn.Module:
    """The training levers of a `SpeedConfig` (`train.speed`) on the U-Net that trains.

    Called before the EMA is built (its copy then shares the weights' layout) and before
    `accelerator.prepare`. With the defaults it does nothing.
    """
    if cfg.channels_last:
        to_channels_last(unet)
    if cfg.compile:
        if cfg.compile_mode == "reduce-overhead":
            # The weights are still on the CPU here; CUDA graphs in training also need static
            # gradients, which Accelerate's zero_grad(set_to_none) breaks.
            raise LdmError("train.speed.compile_mode=reduce-overhead is for sampling only: use null or max-autotune in training")
        compile_module(unet, cfg.compile_mode)
    return unet


def apply_sampling_levers(unet: torch.nn.Module, *, channels_last: bool = False, fuse_qkv: bool = False,
                          compile: bool = False, compile_mode: Optional[str] = None) -> torch.nn.Module:
    """The sampling levers on a pipeline's U-Net (in place; call after `pipe.to(device)`)."""
    if fuse_qkv:
        unet.fuse_qkv_projections()
    if channels_last:
        to_channels_last(unet)
    if compile:
        compile_module(unet, compile_mode)
    return unet


def xformers_status() -> str:
    """'available', or why xformers' memory-efficient attention cannot run here (the error, first line).

    Importing is not enough: a wheel built for another torch or CUDA imports with a warning
    and fails on the first call, so this calls the kernel once on a tiny input.
    """
    try:
        import xformers.ops as xops
    except Exception as error:  # ImportError, or a binary built for another torch / CUDA
        return f"unavailable: {type(error).__name__}: {first_line(error)}"
    if not torch.cuda.is_available():
        return "unavailable: xformers is installed but needs a CUDA GPU"
    try:
        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as error:
        return f"unavailable: {type(error).__name__}: {first_line(error)}"
    return "available"


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""

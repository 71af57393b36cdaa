"""Non-finite values (NaN, inf) found where they would otherwise pass silently.

A diverged run (too high a learning rate, an fp16 overflow) turns its loss, then its
weights, to NaN; left alone it saves an all-NaN model, a VAE whose scaling factor is
NaN, and a sampler that decodes them writes black images. Each check here turns that
into one `LdmError` line naming what is not finite and where.
"""

import math
from typing import Iterable, Optional

import torch

from ldm.errors import LdmError


def first_nonfinite(named: Iterable) -> Optional[str]:
    """The name of the first (name, tensor) pair holding a NaN or inf, or None.

    A DTensor (an FSDP2 shard) is judged on every process's shard alike, so that all
    processes name the same tensor (every process must call this for the same tensors).
    """
    for name, tensor in named:
        if tensor is not None and tensor.is_floating_point() and not all_finite(tensor):
            return name
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    if not hasattr(tensor, "device_mesh"):
        return bool(torch.isfinite(tensor).all())
    ok = torch.isfinite(tensor.to_local()).all().to(torch.int32).reshape(1)
    torch.distributed.all_reduce(ok, torch.distributed.ReduceOp.MIN, group=tensor.device_mesh.get_group())
    return bool(ok.item())


def check_finite_module(module: torch.nn.Module, what: str, fix: str) -> None:
    """Refuse a module whose parameters hold NaN or inf (one line). Buffers are not judged: a causal
    attention mask holds -inf by design."""
    bad = first_nonfinite(module.named_parameters())
    if bad is not None:
        raise LdmError(f"{what} has non-finite (NaN or inf) weights (first: {bad}): {fix}")


def check_finite_ema(ema, what: str, fix: str) -> None:
    """Refuse an EMA (diffusers' EMAModel) whose shadow weights hold NaN or inf."""
    if ema is None:
        return
    bad = first_nonfinite((f"shadow.{i}", t) for i, t in enumerate(ema.shadow_params))
    if bad is not None:
        raise LdmError(f"{what}: the EMA has non-finite (NaN or inf) weights (first: {bad}): {fix}")


def check_finite_number(value, what: str, fix: str) -> None:
    """Refuse a config number (a scaling factor, a list of per-channel stats) that is NaN or inf."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(v is None or not math.isfinite(float(v)) for v in values):
        raise LdmError(f"{what} is not finite ({value}): {fix}")

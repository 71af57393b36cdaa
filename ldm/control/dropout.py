"""Conditioning dropout: the control image replaced by a blank one with probability p.

A ControlNet or adapter that also sees blank controls keeps the base model's behaviour
when no useful control is given, and classifier-free guidance then has an unconditioned
branch to move away from, as caption dropout gives one for text (Ho & Salimans 2022).
A blank control is all zeros: black, the "no edges" image of an edge map.
"""

from typing import Optional

import torch


def drop_conditioning(cond: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero each example's control image with probability p (one coin per example, drawn on the CPU)."""
    if p <= 0:
        return cond
    keep = (torch.rand(len(cond), generator=generator) >= p).to(cond.device)
    return cond * keep.view(-1, 1, 1, 1).to(cond.dtype)

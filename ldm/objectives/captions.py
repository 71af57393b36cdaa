"""Caption dropout: the model also learns p(x), which classifier-free guidance needs."""

from typing import List, Optional, Sequence

import torch


def drop_captions(captions: Sequence[str], p: float, generator: Optional[torch.Generator] = None) -> List[str]:
    """Replace each caption by "" with probability p.

    The model then also learns the unconditional p(x), which classifier-free guidance
    needs at sampling time (Ho & Salimans 2022); "" is what the sampler feeds as the
    unconditional prompt.
    """
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]

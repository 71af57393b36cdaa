"""The FID network: Inception-v3 as torch-fidelity ports it from TensorFlow, from a local weights file.

torchmetrics' FID and KID wrap torch-fidelity's `FeatureExtractorInceptionV3`; given
`feature_extractor_weights_path` it loads that file instead of downloading. torch-fidelity
reads the file with `torch.load(weights_only=False)`, which would run any pickled code, so
the file is first read here with `weights_only=True`: only a plain tensor state dict
gets through (DESIGN.md: torch.load only with weights_only=True).
"""

from pathlib import Path

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.eval.weights import INCEPTION_FILE, WHERE_INCEPTION, require_file

FEATURES = 2048  # the pool3 features FID and KID compare (Heusel et al. 2017; Binkowski et al. 2018)
# torch-fidelity's earlier taps: FIDs on them are not comparable with published ones, but a
# 64-d FID costs microseconds where the 2048-d one solves a 2048x2048 eigenproblem (~8 s on one core).
FEATURE_CHOICES = (64, 192, 768, 2048)
WHAT = f"torch-fidelity's Inception-v3 state dict ({INCEPTION_FILE})"


def check_state_dict(path: Path, setting: str) -> None:
    """The file loads as tensors only; a pickle with code, or a foreign file, is an `LdmError`."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LdmError(f"{setting}: cannot read {path} as a tensor state dict ({type(e).__name__}); it should be {WHAT}") from None
    if not isinstance(state, dict) or "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise LdmError(f"{setting}: {path} is not {WHAT} (no Mixed_7c / fc keys)")


def load_inception(path, setting: str = "--inception-weights", device="cpu", features: int = FEATURES) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 (`features` outputs, uint8 images of any size in) from a local file."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if features not in FEATURE_CHOICES:
        raise LdmError(f"Inception features must be one of {', '.join(map(str, FEATURE_CHOICES))} (2048 is the standard FID), got {features}")
    path = require_file(path, setting, "FID and KID", WHERE_INCEPTION)
    check_state_dict(path, setting)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)], feature_extractor_weights_path=str(path))
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
        first = str(e).strip().splitlines()
        raise LdmError(f"{setting}: {path} is not {WHAT}: {' '.join(first[1:2] or first)[:200]}") from None
    return net.to(device)

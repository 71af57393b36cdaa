"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) of generated images against real ones.

Both compare Inception pool features; torchmetrics computes both from the features:

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))          (Gaussians fitted to each set)
    KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets

The Inception network runs once per image here, and its float64 features feed both
torchmetrics metrics (each given a pass-through "feature extractor"), instead of each
metric running its own copy of the network.
"""

import warnings
from typing import Dict, Optional

import torch
from torch import nn

from ldm.errors import LdmError

KID_SUBSETS = 100  # torchmetrics' defaults (and the KID paper's)
KID_SUBSET_SIZE = 1000


class PassThrough(nn.Module):
    """A torchmetrics "feature extractor" for features computed already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of a dummy forward

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class InceptionMetrics:
    """FID and KID over batches: `update(images, real=...)`, then `compute()`.

    `extractor` maps uint8 images (N, 3, H, W) to features (N, d): the Inception network of
    `ldm.eval.inception.load_inception`, or any module (tests pass features straight through).
    """

    def __init__(self, extractor: nn.Module, num_features: int, kid_subsets: int = KID_SUBSETS,
                 kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.extractor = extractor
        features = PassThrough(num_features)
        # reset_real_features=False: the real set's statistics are kept across resets (one real set, many sweeps).
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
        with warnings.catch_warnings():  # "will save all extracted features": that is the point, and they are small
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=kid_subset_size,
                                               reset_real_features=False)
        self.kid_subset_size, self.seed = kid_subset_size, seed

    @classmethod
    def from_file(cls, path, setting: str = "--inception-weights", device="cpu", features: int = 2048,
                  **kwargs) -> "InceptionMetrics":
        from ldm.eval.inception import load_inception

        return cls(load_inception(path, setting, device, features), features, **kwargs)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.extractor.parameters(), torch.empty(0)).device
        return self.extractor(images.to(device)).double().cpu()

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch: uint8 (N, 3, H, W) images for the Inception network (or features, for a pass-through)."""
        f = self.features(images)
        self.fid.update(f, real=real)
        self.kid.update(f, real=real)

    def counts(self):
        return int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples)

    def compute(self) -> Dict[str, float]:
        """{"fid", "kid", "kid_std"}; KID subsets are drawn from a fixed seed (the same numbers every call)."""
        n_real, n_fake = self.counts()
        if min(n_real, n_fake) < 2:
            raise LdmError(f"FID and KID need at least 2 real and 2 generated images, got {n_real} and {n_fake}")
        # The KID subset may not be larger than either set (small evaluations use all of the smaller one).
        self.kid.subset_size = min(self.kid_subset_size, n_real, n_fake)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid), "kid_std": float(kid_std)}

    def reset_generated(self) -> None:
        """Forget the generated images (the real ones stay): for the next point of a sweep."""
        self.fid.reset()
        self.kid.reset()


def to_uint8(images) -> torch.Tensor:
    """PIL images (or an HxWx3 uint8 array list) to a uint8 (N, 3, H, W) tensor."""
    import numpy as np

    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (the data sets' pixel_values) to uint8 (N, 3, H, W), rounded as an image file stores them."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def optional_inception_metrics(path: Optional[str], **kwargs) -> Optional[InceptionMetrics]:
    return None if path is None else InceptionMetrics.from_file(path, **kwargs)

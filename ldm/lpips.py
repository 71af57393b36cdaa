"""LPIPS, the learned perceptual distance (Zhang et al. 2018), VGG16 variant, from local weights.

d(x, y) = sum_l mean_{h,w} || w_l * (f_l(x) / ||f_l(x)|| - f_l(y) / ||f_l(y)||) ||^2

with f_l the VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (unit
length along channels) and w_l the learned per-channel weights ("lin" layers, 1x1
convolutions). This is the perceptual term of taming-transformers' and latent-diffusion's
autoencoder losses (their lpips.py, stripped from richzhang/PerceptualSimilarity v0.1).

Nothing is downloaded: both weight files are local paths.
  vgg_weights     torchvision's ImageNet VGG16 state dict (vgg16-397923af.pth): keys
                  features.N.weight / features.N.bias (classifier.* is ignored).
  linear_weights  the lpips package's lpips/weights/v0.1/vgg.pth: keys lin0.model.1.weight
                  .. lin4.model.1.weight (index 1: the layers sit behind a Dropout).
"""

from pathlib import Path
from typing import Dict

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from ldm.errors import LdmError

# VGG16 feature indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: slice ends.
SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)


def load_weights(path, what: str, setting: str) -> Dict[str, torch.Tensor]:
    """A state dict from a .safetensors or a weights-only torch file, with errors that say what it should be."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(f"{setting}: no file at {path} (it should be {what})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which, and what it should be
        raise LdmError(f"{setting}: cannot read {path} ({type(e).__name__}); it should be {what}") from None


def take(state: Dict[str, torch.Tensor], module: nn.Module, prefix: str, path, what: str, setting: str) -> None:
    """Load `module` from the `prefix`-ed keys of `state`; every key it needs must be there, shapes equal."""
    wanted = module.state_dict()
    found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in wanted}
    missing = [prefix + k for k in wanted if k not in found]
    wrong = [prefix + k for k, v in found.items() if v.shape != wanted[k].shape]
    if missing or wrong:
        problem = f"missing keys {missing[:3]}" if missing else f"wrong shapes for {wrong[:3]}"
        raise LdmError(f"{setting}: {path} is not {what}: {problem}")
    module.load_state_dict(found)


class ScalingLayer(nn.Module):
    """[-1, 1] images to the ImageNet normalisation VGG was trained with (LPIPS' constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def linear_layer(channels: int) -> nn.Sequential:
    """LPIPS' NetLinLayer: Dropout then a bias-free 1x1 conv to one channel (the Dropout keeps the
    file's key names, model.1.weight; LPIPS is always in eval mode, so it never drops)."""
    return nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Features scaled to unit length along the channel axis, as LPIPS' normalize_tensor."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG; forward(x, y) gives one distance per image, shape (N, 1, 1, 1), images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        # torchvision's own VGG16 feature stack (the classifier would be 120M unused parameters).
        features = make_layers(cfgs["D"])
        starts = (0,) + SLICE_ENDS[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, SLICE_ENDS))
        self.lins = nn.ModuleList(linear_layer(c) for c in CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_weights, linear_weights) -> "LPIPS":
        model = cls()
        vgg_what = "torchvision's VGG16 ImageNet state dict (vgg16-397923af.pth, keys features.N.weight)"
        state = load_weights(vgg_weights, vgg_what, "loss.lpips_vgg_weights")
        for block in model.slices:
            # The slices keep torchvision's layer indices as names: features.N -> slices[i].N.
            take(state, block, "features.", vgg_weights, vgg_what, "loss.lpips_vgg_weights")
        lin_what = "the LPIPS v0.1 VGG linear layers (lpips/weights/v0.1/vgg.pth, keys lin0.model.1.weight..lin4)"
        state = load_weights(linear_weights, lin_what, "loss.lpips_linear_weights")
        for i, lin in enumerate(model.lins):
            take(state, lin, f"lin{i}.model.", linear_weights, lin_what, "loss.lpips_linear_weights")
        return model

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: LPIPS is a fixed metric, its Dropout must never drop."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.scaling_layer(x), self.scaling_layer(y)
        distance = 0
        for block, lin in zip(self.slices, self.lins):
            fx, fy = block(fx), block(fy)
            diff = (unit_channels(fx) - unit_channels(fy)).pow(2)
            distance = distance + lin(diff).mean(dim=(2, 3), keepdim=True)  # spatial average
        return distance

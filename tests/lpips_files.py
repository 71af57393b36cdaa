"""Random-weight stand-ins for LPIPS' two weight files, in the real files' formats.

The real weights (torchvision's vgg16-397923af.pth and the lpips package's v0.1/vgg.pth)
cannot be downloaded in tests; files with the same keys and shapes exercise the same
loading code.
"""

import torch
from torchvision.models.vgg import cfgs, make_layers

from ldm.lpips import CHANNELS


def write_lpips_weights(folder, seed: int = 0):
    """(vgg_path, linear_path): VGG16 features as torchvision names them (plus a classifier key,
    which the loader must ignore) and five non-negative 1x1 linear layers as lpips names them."""
    torch.manual_seed(seed)
    vgg = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(1000)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) / c for i, c in enumerate(CHANNELS)}
    vgg_path, lin_path = folder / "vgg16-random.pth", folder / "lpips-vgg-random.pth"
    torch.save(vgg, vgg_path)
    torch.save(lins, lin_path)
    return vgg_path, lin_path

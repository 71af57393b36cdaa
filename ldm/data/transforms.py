"""The image transform for training: PIL image in, float tensor (3, res, res) in [-1, 1] out."""

import torch
from torchvision.transforms import v2


def image_transform(resolution: int, center_crop: bool = True, random_flip: bool = False) -> v2.Compose:
    """Resize the shorter side to `resolution`, crop a square, optionally flip, scale to [-1, 1].

    The recipe of diffusers' training scripts (bilinear with antialias, so downscaled
    photos do not alias). The random crop and flip draw from torch's global RNG, which
    the DataLoader seeds per worker.
    """
    crop = v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)
    flip = [v2.RandomHorizontalFlip(p=0.5)] if random_flip else []
    return v2.Compose([
        v2.RGB(),  # grayscale, palette and RGBA images all become 3 channels
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        crop,
        *flip,
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),  # [0, 1]
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # [-1, 1], the VAE's input range
        v2.ToPureTensor(),  # a plain tensor, not a tv_tensors.Image, for collate and users
    ])

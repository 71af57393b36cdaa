"""The image transform for training: PIL image in, float tensor (3, res, res) in [-1, 1] out.

`paired_transform` takes an image and its control image (ControlNet / T2I-Adapter data)
through one resize, crop and flip, so both see the same box and the same flip.
"""

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


class PairedTransform:
    """(image, control) PIL images -> (image in [-1, 1], control in [0, 1]), both float32 (3, res, res).

    torchvision's v2 transforms draw their random parameters once per call and apply
    them to every PIL image passed in the call, so the crop box and the flip decision
    are the image's and the control's alike, and the image comes out exactly as
    `image_transform` makes it from the same RNG state. The control keeps [0, 1], the
    range diffusers' ControlNet training examples feed it in.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        crop = v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)
        flip = [v2.RandomHorizontalFlip(p=0.5)] if random_flip else []
        self.geometry = v2.Compose([
            v2.RGB(),
            v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            crop,
            *flip,
        ])
        to_unit = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        self.image = v2.Compose([*to_unit, v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]), v2.ToPureTensor()])
        self.control = v2.Compose([*to_unit, v2.ToPureTensor()])

    def __call__(self, image, control):
        if image.size != control.size:  # the data sources check this first, with the file names
            raise ValueError(f"the control image is {control.size[0]}x{control.size[1]}, its image {image.size[0]}x{image.size[1]}")
        image, control = self.geometry(image, control)
        return self.image(image), self.control(control)


def paired_transform(resolution: int, center_crop: bool = True, random_flip: bool = False) -> PairedTransform:
    """`image_transform` for an image and its control image together (see `PairedTransform`)."""
    return PairedTransform(resolution, center_crop, random_flip)

"""Aspect-ratio buckets: which shapes a batch may have, which one an image goes to, and how it gets there.

NovelAI's aspect-ratio bucketing (2022), as kohya's sd-scripts and SDXL (Podell et al. 2023,
sec. 2.3) train with it: instead of cropping every image to a square, the trainer keeps a
list of buckets, (width, height) pairs of about resolution**2 pixels whose sides are
multiples of a step (so every bucket's latents fit the VAE and the U-Net), no longer than
`max_aspect` times their short side. An image goes to the bucket whose aspect ratio is
nearest its own (in log space, so 2:1 and 1:2 are alike far from 1:1), is resized to cover
the bucket and cropped to it; every batch holds images of one bucket (ldm.data.bucket_batches).

As SDXL conditions on them, an item records what was done to its image:
  original_size   (height, width) of the image before resizing
  crop_top_left   (top, left) of the crop in the resized image (SDXL's c_crop)
  target_size     (height, width) of the bucket
so the crop box is (left, top, left + width, top + height) in the image resized by
max(bucket_w / w, bucket_h / h).
"""

import math
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ldm.errors import LdmError

Bucket = Tuple[int, int]  # (width, height), as PIL gives sizes


def bucket_list(resolution: int, step: int, max_aspect: float) -> List[Bucket]:
    """Buckets of about resolution**2 pixels, sides multiples of `step`, aspect within [1/max_aspect, max_aspect].

    For each width w (a multiple of `step`) the height is the multiple of `step` nearest
    resolution**2 / w (kohya's make_buckets floors it instead, which loses up to a step of
    area), and each bucket's transpose too; sorted by aspect ratio w / h, portrait first;
    (resolution, resolution) is one of them.
    """
    if resolution % step:
        raise LdmError(f"data.resolution={resolution} is not a multiple of data.buckets.step={step}: "
                       f"use a resolution that is, so that the square bucket is resolution x resolution")
    if max_aspect < 1:
        raise LdmError(f"data.buckets.max_aspect must be at least 1 (1: square only), got {max_aspect}")
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_aspect:
        height = max(step, round(area / width / step) * step)
        if max(width / height, height / width) <= max_aspect * (1 + 1e-9):
            buckets.update({(width, height), (height, width)})  # landscape and portrait alike
        width += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(size: Tuple[int, int], buckets: Sequence[Bucket]) -> int:
    """The index of the bucket whose aspect ratio is nearest the (width, height) `size`'s, in log space."""
    width, height = size
    aspect = math.log(width / height)
    # Ties (an aspect exactly between two buckets) go to the first, so assignment is deterministic.
    return min(range(len(buckets)), key=lambda i: abs(aspect - math.log(buckets[i][0] / buckets[i][1])))


def cover_size(size: Tuple[int, int], bucket: Bucket) -> Tuple[int, int]:
    """(height, width) of `size` (width, height) resized, aspect kept, to cover `bucket` with the least scaling."""
    (width, height), (bw, bh) = size, bucket
    scale = max(bw / width, bh / height)
    # Rounded, but never below the bucket (a 1-pixel shortfall would leave nothing to crop).
    return max(bh, round(height * scale)), max(bw, round(width * scale))


def check_bucket_step(step: Optional[int], factor: int, where: str) -> int:
    """data.buckets.step, or the model's `factor` when unset; a step that is not a multiple of it is an error."""
    if step is None:
        return factor
    if step < 1 or step % factor:
        raise LdmError(f"data.buckets.step={step} is not a multiple of {where} {factor}: bucket sides must be, "
                       f"so that every bucket's latents fit the model (use {factor} or a multiple of it, or leave it unset)")
    return step


class BucketTransform:
    """PIL image (and control image) -> the item fields of its bucket (see the module doc).

    Resize (bilinear, antialiased, as `ldm.data.transforms.image_transform`) so the image
    covers its bucket, crop to the bucket (centered, or at a random place drawn from torch's
    global RNG), optionally flip; the control image goes through the same box and flip.
    """

    def __init__(self, buckets: Sequence[Bucket], center_crop: bool = True, random_flip: bool = False,
                 conditioning: bool = False):
        self.buckets, self.center_crop, self.random_flip = list(buckets), center_crop, random_flip
        self.paired = conditioning  # called with (image, control): the data sources read the control too
        self.to_unit = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.normalize = v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # [-1, 1], the VAE's input range

    def bucket_of(self, size: Tuple[int, int]) -> int:
        return nearest_bucket(size, self.buckets)

    def crop_box(self, resized: Tuple[int, int], bucket: Bucket) -> Tuple[int, int]:
        """(top, left) of the bucket-sized crop of an image resized to (height, width) `resized`."""
        (height, width), (bw, bh) = resized, bucket
        if self.center_crop:  # as torchvision's CenterCrop rounds
            return int(round((height - bh) / 2.0)), int(round((width - bw) / 2.0))
        return int(torch.randint(height - bh + 1, ()).item()), int(torch.randint(width - bw + 1, ()).item())

    def __call__(self, image, control=None, bucket: Optional[int] = None) -> dict:
        """The item fields of `image` (and `control`) in bucket number `bucket` (None: the nearest to its aspect)."""
        if control is not None and control.size != image.size:  # the data sources check this first, with the file names
            raise ValueError(f"the control image is {control.size[0]}x{control.size[1]}, its image {image.size[0]}x{image.size[1]}")
        bucket = self.buckets[self.bucket_of(image.size) if bucket is None else bucket]
        resized = cover_size(image.size, bucket)
        top, left = self.crop_box(resized, bucket)
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        views = [image] if control is None else [image, control]
        out = []
        for view in views:
            view = TF.resize(view.convert("RGB"), list(resized), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            view = TF.crop(view, top, left, bucket[1], bucket[0])
            out.append(self.to_unit(TF.horizontal_flip(view) if flip else view).as_subclass(torch.Tensor))
        item = {
            "pixel_values": self.normalize(out[0]),
            "original_size": torch.tensor([image.size[1], image.size[0]]),
            "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor([bucket[1], bucket[0]]),
        }
        if control is not None:
            item["conditioning_pixel_values"] = out[1]  # [0, 1], as PairedTransform gives it
        return item


def bucket_transform(cfg, center_crop: bool, random_flip: bool) -> BucketTransform:
    """The `BucketTransform` of a `DataConfig` whose buckets are on and whose step is resolved (`with_bucket_step`)."""
    if cfg.buckets.step is None:
        raise LdmError("data.buckets.step is not resolved: the training stage sets it from its model (with_bucket_step)")
    buckets = bucket_list(cfg.resolution, cfg.buckets.step, cfg.buckets.max_aspect)
    return BucketTransform(buckets, center_crop, random_flip, conditioning=cfg.conditioning)


def with_bucket_step(cfg, factor: int, where: str):
    """`cfg` (a DataConfig) with data.buckets.step resolved against the model's `factor` (unchanged when off)."""
    if not cfg.buckets.enabled:
        return cfg
    step = check_bucket_step(cfg.buckets.step, factor, where)
    bucket_list(cfg.resolution, step, cfg.buckets.max_aspect)  # its errors now, before any data is read
    return replace(cfg, buckets=replace(cfg.buckets, step=step))

"""Training data: `build_dataset(cfg, split)` for every source.

Items are dicts {"pixel_values": float32 (3, res, res) in [-1, 1], "caption": str}, so
torch's default collate batches them (a tensor stack and a list of strings). With
data.conditioning they also carry "conditioning_pixel_values": the control image,
float32 (3, res, res) in [0, 1], cropped and flipped as its image.

"folder" and "shapes" are map-style data sets, split into validation and train items.
"webdataset" is a stream (`ldm.data.webdataset.ShardStream`) with no validation split:
data.num_validation does not apply to it, and asking for its validation split is an error.

With data.buckets.enabled the train split of "folder" and "webdataset" is bucketed by
aspect ratio (ldm.data.buckets): items are of their bucket's size and also carry
"original_size", "crop_top_left" and "target_size"; the validation split stays square.
"""

from typing import Optional

from torch.utils.data import Dataset, Subset

from ldm.config import DataConfig
from ldm.data.folder import ImageFolderDataset
from ldm.data.transforms import image_transform, paired_transform
from ldm.errors import LdmError

SOURCES = ("folder", "shapes", "webdataset")
SPLITS = ("train", "validation")


def build_source(cfg: DataConfig, augment: bool, bucketed: bool = False) -> Dataset:
    """The whole data set of `cfg.source`, before the split; `bucketed`: with aspect-ratio buckets."""
    # With controls, one transform takes the image and its control through the same crop and flip.
    make_transform = paired_transform if cfg.conditioning else image_transform
    if bucketed:
        if cfg.source == "shapes":
            raise LdmError("data.buckets.enabled applies to folder and webdataset data; shapes images are square "
                           "(set data.buckets.enabled=false)")
        from ldm.data.buckets import bucket_transform

        def make_transform(resolution, center_crop, random_flip):  # noqa: F811 - the bucketed one replaces it
            return bucket_transform(cfg, center_crop, random_flip)
    if cfg.source == "folder":
        if cfg.path is None:
            raise LdmError("data.source is 'folder' but data.path is not set (set data.path to a folder of images with captions)")
        transform = make_transform(
            cfg.resolution,
            center_crop=cfg.center_crop or not augment,
            random_flip=cfg.random_flip and augment,
        )
        return ImageFolderDataset(cfg.path, transform, conditioning=cfg.conditioning, bad_captions=cfg.bad_captions)
    if cfg.source == "webdataset":
        from ldm.data.webdataset import build_webdataset

        transform = make_transform(cfg.resolution, center_crop=cfg.center_crop or not augment, random_flip=cfg.random_flip and augment)
        return build_webdataset(cfg, transform)
    if cfg.source == "shapes":
        from ldm.data.shapes import ShapesDataset  # lazy: only runs that use it pay for it

        shapes = cfg.shapes
        return ShapesDataset(shapes.num_images, cfg.resolution, seed=shapes.seed, exclude=tuple(shapes.exclude),
                             conditioning=cfg.conditioning)
    raise LdmError(f"unknown data.source '{cfg.source}' (valid sources: {', '.join(SOURCES)})")


def build_dataset(cfg: DataConfig, split: str = "train", augment: Optional[bool] = None) -> Dataset:
    """The `split` of the data: "validation" is the first `cfg.num_validation` items, "train" the rest.

    Validation items are not augmented (center crop, no flip), so that a validation
    loss measured at different steps compares like with like; `augment` overrides that
    (ldm-cache reads the train split unaugmented and stores the flips itself).
    A webdataset source is all "train" (see the module doc).
    """
    if split not in SPLITS:
        raise LdmError(f"unknown split '{split}' (valid splits: {', '.join(SPLITS)})")
    if cfg.bad_captions not in ("skip", "error"):
        raise LdmError(f"data.bad_captions must be skip or error, got '{cfg.bad_captions}'")
    if cfg.num_validation < 0:
        raise LdmError(f"data.num_validation is {cfg.num_validation} (set it to 0 or more)")
    if cfg.source == "webdataset" and split == "validation":
        raise LdmError(
            "data.source=webdataset has no validation split (its shards are one stream): set data.num_validation=0, "
            "or hold validation images out in a separate folder"
        )
    bucketed = cfg.buckets.enabled and split == "train"
    dataset = build_source(cfg, augment=split == "train" if augment is None else augment, bucketed=bucketed)
    if cfg.source == "webdataset":
        return dataset
    n, n_val = len(dataset), cfg.num_validation
    if n_val >= n:
        raise LdmError(
            f"the data set has {n} images and data.num_validation={n_val} holds out all of them, "
            f"leaving none to train on (lower data.num_validation or add images)"
        )
    indices = range(n_val) if split == "validation" else range(n_val, n)
    return Subset(dataset, indices)

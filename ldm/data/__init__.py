"""Training data: `build_dataset(cfg, split)` for every source.

Items are dicts {"pixel_values": float32 (3, res, res) in [-1, 1], "caption": str}, so
torch's default collate batches them (a tensor stack and a list of strings).
"""

from torch.utils.data import Dataset, Subset

from ldm.config import DataConfig
from ldm.data.folder import ImageFolderDataset
from ldm.data.transforms import image_transform
from ldm.errors import LdmError

SOURCES = ("folder", "shapes")
SPLITS = ("train", "validation")


def build_source(cfg: DataConfig, augment: bool) -> Dataset:
    """The whole data set of `cfg.source`, before the split."""
    if cfg.source == "folder":
        if cfg.path is None:
            raise LdmError("data.source is 'folder' but data.path is not set (set data.path to a folder of images with captions)")
        transform = image_transform(
            cfg.resolution,
            center_crop=cfg.center_crop or not augment,
            random_flip=cfg.random_flip and augment,
        )
        return ImageFolderDataset(cfg.path, transform)
    if cfg.source == "shapes":
        from ldm.data.shapes import ShapesDataset  # lazy: only runs that use it pay for it

        shapes = cfg.shapes
        return ShapesDataset(shapes.num_images, cfg.resolution, seed=shapes.seed, exclude=tuple(shapes.exclude))
    raise LdmError(f"unknown data.source '{cfg.source}' (valid sources: {', '.join(SOURCES)})")


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The `split` of the data: "validation" is the first `cfg.num_validation` items, "train" the rest.

    Validation items are not augmented (center crop, no flip), so that a validation
    loss measured at different steps compares like with like.
    """
    if split not in SPLITS:
        raise LdmError(f"unknown split '{split}' (valid splits: {', '.join(SPLITS)})")
    if cfg.num_validation < 0:
        raise LdmError(f"data.num_validation is {cfg.num_validation} (set it to 0 or more)")
    dataset = build_source(cfg, augment=split == "train")
    n, n_val = len(dataset), cfg.num_validation
    if n_val >= n:
        raise LdmError(
            f"the data set has {n} images and data.num_validation={n_val} holds out all of them, "
            f"leaving none to train on (lower data.num_validation or add images)"
        )
    indices = range(n_val) if split == "validation" else range(n_val, n)
    return Subset(dataset, indices)

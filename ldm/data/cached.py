"""Training from an `ldm-cache` folder: the data set over its shards, and z0 / context from a batch.

`CachedLatents` is map-style, so the EpochShuffle order and exact resume of
`ldm.train.loader` apply unchanged. Items are
{"mean", "std"[, "mean_flip", "std_flip"][, "context"][, "conditioning_pixel_values"], "caption"},
and from a cache with aspect-ratio buckets also "original_size", "crop_top_left" and
"target_size" (as the bucketed data sets give them), with `item_buckets` for the loader's
one-bucket batches (ldm.data.bucket_batches);
read lazily from the memory-mapped safetensors shards (a cache much larger than RAM is
fine); the control image comes as float32 [0, 1], as the uncached data sets give it.

`Encoded` and `Cached` turn a batch into what the U-Net trains on, one from the images
and captions through the encoders, the other from the cache; the loop calls either the
same way. Both draw from the global RNG in the same order (posterior sample, then the
caption-dropout coins), so a cached run follows the uncached run's random stream.
With flips, `pick_flips` draws one coin per example that picks the mirror image's
posterior and control together (a control trainer calls it before `posterior_sample`).
"""

import bisect
import json
from pathlib import Path
from typing import List

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ldm.cache import INDEX
from ldm.codec import LatentCodec, posterior_sample
from ldm.readable import reading
from ldm.text_encoder import encode_text, tokenize


class CachedLatents(Dataset):
    """The entries of a finished cache, in shard order; `flips` / `context` / `conditioning`: which keys to read."""

    def __init__(self, folder, index: dict, flips: bool, context: bool, conditioning: bool = False):
        self.folder = Path(folder)
        self.shards = [s for s in index["shards"] if s["num_samples"] > 0]
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["num_samples"])
        self.keys = ["mean", "std"] + (["mean_flip", "std_flip"] if flips else []) + (["context"] if context else [])
        self.keys += ["conditioning"] if conditioning else []
        self._open = {}  # shard -> (safe_open handle, captions, rows, records); opened per process/worker, on first use
        self.item_buckets = None  # a cache without buckets: the EpochShuffle loader
        if index["config"]["data"].get("buckets"):  # every item's bucket, from the shards' metadata
            names = [row[0] for s in range(len(self.shards)) for row in self.shard(s)[2]]
            ids = {name: i for i, name in enumerate(sorted(set(names)))}
            self.item_buckets = [ids[name] for name in names]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}

    def shard(self, s: int):
        if s not in self._open:
            path = self.folder / self.shards[s]["file"]
            with reading(path, "an ldm-cache shard (safetensors with captions)", "run ldm-cache again"):
                handle = safe_open(str(path), "pt")
                metadata = handle.metadata()
                rows = json.loads(metadata.get("rows", "[]")) or None  # None: one tensor per key, in sample order
                self._open[s] = handle, json.loads(metadata["captions"]), rows, json.loads(metadata.get("records", "[]"))
        return self._open[s]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = bisect.bisect_right(self.starts, index) - 1
        handle, captions, rows, records = self.shard(s)
        i = index - self.starts[s]
        if rows is None:
            item = {key: handle.get_slice(key)[i:i + 1][0] for key in self.keys}
        else:  # the entry sits in row `row` of its bucket's tensors (ldm.cache)
            name, row = rows[i]
            item = {key: handle.get_slice(f"{key}.{name}")[row:row + 1][0] for key in self.keys}
            item["original_size"], item["crop_top_left"] = (torch.tensor(records[i][k]) for k in ("original_size", "crop_top_left"))
            item["target_size"] = torch.tensor([int(side) for side in name.split("x")])
        if "conditioning" in item:  # uint8 on disk; [0, 1] as torchvision scales 8-bit images, like the data sets
            item["conditioning_pixel_values"] = TF.to_dtype(item.pop("conditioning"), torch.float32, scale=True)
        item["caption"] = captions[i]
        return item


def cached_dataset(cfg, index: dict) -> CachedLatents:
    """The data set of `cfg.data.cache` (checked against `cfg` by `ldm.cache.check_cache`)."""
    frozen_text = not cfg.text_encoder.trainable and index["empty_context"] is not None
    return CachedLatents(cfg.data.cache, index, flips=cfg.data.random_flip, context=frozen_text,
                         conditioning=cfg.data.conditioning)


class Encoded:
    """z0 and context by running the frozen VAE encoder and the text encoder on the batch."""

    def __init__(self, vae, text_encoder, tokenizer, dtype, device):
        self.vae, self.text_encoder, self.tokenizer, self.dtype, self.device = vae, text_encoder, tokenizer, dtype, device

    def pick_flips(self, batch) -> dict:
        """The batch as it is: the transform already flipped each image and its control alike."""
        return batch

    @torch.no_grad()
    def posterior_sample(self, batch) -> torch.Tensor:
        codec = LatentCodec(self.vae)
        return codec.sample(*codec.encode(batch["pixel_values"].to(self.dtype)))

    def context(self, batch, captions: List[str]) -> torch.Tensor:
        return encode_text(self.text_encoder, tokenize(self.tokenizer, captions, self.device))


class Cached:
    """z0 and context from cache entries: z = mean + std * eps is still drawn at every step.

    With flips, a coin per example picks the mirror image's posterior (the cached
    counterpart of RandomHorizontalFlip). With cached hidden states, a dropped caption
    ("" after `drop_captions`) takes the cached hidden states of "", the rest their own;
    without them (a trained text encoder) the captions go through `encoded.context`.
    """

    def __init__(self, folder, index: dict, flips: bool, encoded: Encoded, device):
        self.flips, self.encoded, self.dtype = flips, encoded, encoded.dtype
        empty = index["empty_context"]
        self.empty_context = None
        if empty:
            with reading(Path(folder) / empty, "an ldm-cache file (safetensors)", "run ldm-cache again"):
                self.empty_context = load_file(str(Path(folder) / empty))["context"].to(device, self.dtype)

    def pick_flips(self, batch) -> dict:
        """The batch with one coin per example choosing its mirror image: the posterior and the control alike.

        The picked batch has no "_flip" keys, so `posterior_sample` draws no second coin for it.
        """
        if not self.flips or "mean_flip" not in batch:
            return batch
        mean = batch["mean"]
        flip = (torch.rand(len(mean)) < 0.5).view(-1, 1, 1, 1).to(mean.device)
        picked = {key: value for key, value in batch.items() if not key.endswith("_flip")}
        picked["mean"], picked["std"] = torch.where(flip, batch["mean_flip"], mean), torch.where(flip, batch["std_flip"], batch["std"])
        if "conditioning_pixel_values" in batch:  # a flipped control is exact: the mirror image of the stored one
            control = batch["conditioning_pixel_values"]
            picked["conditioning_pixel_values"] = torch.where(flip.to(control.device), control.flip(-1), control)
        return picked

    def posterior_sample(self, batch) -> torch.Tensor:
        batch = self.pick_flips(batch)
        mean, std = batch["mean"], batch["std"]
        # As DiagonalGaussianDistribution.sample does, so the random stream matches the uncached loop's.
        return posterior_sample(mean, std).to(self.dtype)

    def context(self, batch, captions: List[str]) -> torch.Tensor:
        if "context" not in batch:
            return self.encoded.context(batch, captions)
        dropped = torch.tensor([c == "" for c in captions], device=batch["context"].device).view(-1, 1, 1)
        return torch.where(dropped, self.empty_context, batch["context"].to(self.dtype))

"""Training from an `ldm-cache` folder: the data set over its shards, and z0 / context from a batch.

`CachedLatents` is map-style, so the EpochShuffle order and exact resume of
`ldm.train.loader` apply unchanged. Items are
{"mean", "std"[, "mean_flip", "std_flip"][, "context"], "caption"}, read lazily from the
memory-mapped safetensors shards (a cache much larger than RAM is fine).

`Encoded` and `Cached` turn a batch into what the U-Net trains on, one from the images
and captions through the encoders, the other from the cache; the loop calls either the
same way. Both draw from the global RNG in the same order (posterior sample, then the
caption-dropout coins), so a cached run follows the uncached run's random stream.
"""

import bisect
import json
from pathlib import Path
from typing import List

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from ldm.cache import INDEX
from ldm.codec import LatentCodec, posterior_sample
from ldm.text_encoder import encode_text, tokenize


class CachedLatents(Dataset):
    """The entries of a finished cache, in shard order; `flips` / `context`: which keys to read."""

    def __init__(self, folder, index: dict, flips: bool, context: bool):
        self.folder = Path(folder)
        self.shards = [s for s in index["shards"] if s["num_samples"] > 0]
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["num_samples"])
        self.keys = ["mean", "std"] + (["mean_flip", "std_flip"] if flips else []) + (["context"] if context else [])
        self._open = {}  # shard -> (safe_open handle, captions); opened per process/worker, on first use

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}

    def shard(self, s: int):
        if s not in self._open:
            handle = safe_open(str(self.folder / self.shards[s]["file"]), "pt")
            self._open[s] = handle, json.loads(handle.metadata()["captions"])
        return self._open[s]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = bisect.bisect_right(self.starts, index) - 1
        handle, captions = self.shard(s)
        i = index - self.starts[s]
        item = {key: handle.get_slice(key)[i:i + 1][0] for key in self.keys}
        item["caption"] = captions[i]
        return item


def cached_dataset(cfg, index: dict) -> CachedLatents:
    """The data set of `cfg.data.cache` (checked against `cfg` by `ldm.cache.check_cache`)."""
    frozen_text = not cfg.text_encoder.trainable and index["empty_context"] is not None
    return CachedLatents(cfg.data.cache, index, flips=cfg.data.random_flip, context=frozen_text)


class Encoded:
    """z0 and context by running the frozen VAE encoder and the text encoder on the batch."""

    def __init__(self, vae, text_encoder, tokenizer, dtype, device):
        self.vae, self.text_encoder, self.tokenizer, self.dtype, self.device = vae, text_encoder, tokenizer, dtype, device

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
        self.empty_context = load_file(str(Path(folder) / empty))["context"].to(device, self.dtype) if empty else None

    def posterior_sample(self, batch) -> torch.Tensor:
        mean, std = batch["mean"], batch["std"]
        if self.flips:
            flip = (torch.rand(len(mean)) < 0.5).view(-1, 1, 1, 1).to(mean.device)
            mean, std = torch.where(flip, batch["mean_flip"], mean), torch.where(flip, batch["std_flip"], std)
        # As DiagonalGaussianDistribution.sample does, so the random stream matches the uncached loop's.
        return posterior_sample(mean, std).to(self.dtype)

    def context(self, batch, captions: List[str]) -> torch.Tensor:
        if "context" not in batch:
            return self.encoded.context(batch, captions)
        dropped = torch.tensor([c == "" for c in captions], device=batch["context"].device).view(-1, 1, 1)
        return torch.where(dropped, self.empty_context, batch["context"].to(self.dtype))

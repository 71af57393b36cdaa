"""The latent/text cache: encode the training set once, so stage 2 runs neither encoder per step.

`ldm-cache` writes, into `data.cache` (or `--out`):

  cache.json                 what the cache was made from (checked at training time)
  shard-00000.safetensors    per sample: the VAE posterior's `mean` and `std` (float32), the
  shard-00001.safetensors    same for the horizontally flipped image (`mean_flip`, `std_flip`)
  ...                        when data.random_flip is on, and for a frozen text encoder its
                             hidden states (`context`); with data.conditioning the control
                             image (`conditioning`, uint8 [3, H, W]; its mirror image is
                             flipped at training time, exactly); captions in the shard's metadata
  empty_context.safetensors  the hidden states of "" (caption dropout feeds them)
  index.json                 written last: the shards and their sizes; no index, no cache

With data.buckets.enabled (aspect-ratio buckets, ldm.data.buckets) a shard stores each
bucket's entries under their own names (`mean.HxW`, `std.HxW`, ... for the bucket's H x W
pixels), and its metadata says where each sample is ("rows": [bucket, row] in sample order)
and what its crop was ("records": original_size and crop_top_left, as the data sets give
them); training batches them by bucket, as it does the images.

The posterior is stored, not a latent, so that training still samples
z = mean + std * eps at every step (Rombach et al. 2022 train on samples of q(z|x),
not on its mean). Images are center-cropped: random crops cannot be cached.

Work is cut into units (2048 items of a map-style source, or one tar shard of a
webdataset source), one output shard each; under `accelerate launch` process r encodes
units r, r + world, ... Every shard is written to a temporary name and renamed when
complete, so a killed job leaves no half shard; re-running it encodes only the missing
units (and refuses a folder made from a different config).
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ldm.codec import LatentCodec
from ldm.errors import LdmError
from ldm.readable import reading

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG = "cache.json"
INDEX = "index.json"
EMPTY_CONTEXT = "empty_context.safetensors"
UNIT_SIZE = 2048  # items of a map-style source per shard


# ---------------------------------------------------------------- what must match


def vae_fingerprint(path) -> str:
    """sha256 over the VAE folder's config and weights: a retrained VAE at the same path differs."""
    digest = hashlib.sha256()
    folder = Path(path)
    files = [folder / "config.json"] + sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_description(data) -> dict:
    """The items a `DataConfig` yields (augmentations aside)."""
    described = {"source": data.source, "path": data.path, "resolution": data.resolution}
    if data.source != "webdataset":
        described["num_validation"] = data.num_validation  # the cache holds the train split
    if data.source == "shapes":
        described["shapes"] = asdict(data.shapes)
    if data.buckets.enabled:  # only when on, so that caches without buckets keep the config they always had
        described["buckets"] = {"max_aspect": data.buckets.max_aspect, "step": data.buckets.step}
    return described


def with_unet_buckets(cfg, vae):
    """`cfg` with data.buckets.step resolved as train_unet resolves it (the VAE's times the U-Net's factor)."""
    if not cfg.data.buckets.enabled:
        return cfg
    from dataclasses import replace

    from ldm.autoencoder import vae_scale_factor
    from ldm.data.buckets import with_bucket_step
    from ldm.train.init_from import folder_unet_config

    channels = folder_unet_config(cfg.init_from)["block_out_channels"] if cfg.init_from else cfg.model.block_out_channels
    factor = vae_scale_factor(vae) * 2 ** (len(channels) - 1)
    return replace(cfg, data=with_bucket_step(cfg.data, factor, "the VAE's times the U-Net's downsampling factor"))


def cache_config(cfg, vae) -> dict:
    """Everything in a `UNetStageConfig` the cached values depend on."""
    text = None if cfg.text_encoder.trainable else {k: v for k, v in asdict(cfg.text_encoder).items() if k != "trainable"}
    return {
        "format_version": FORMAT_VERSION,
        "vae": {"fingerprint": vae_fingerprint(cfg.vae_path), "path": str(cfg.vae_path),
                "scaling_factor": vae.config.scaling_factor},
        "data": source_description(cfg.data),
        "random_flip": cfg.data.random_flip,
        "text_encoder": text,  # None: no hidden states cached
        # Only when on, so that caches without controls keep the config they always had.
        **({"conditioning": True} if cfg.data.conditioning else {}),
    }


def first_difference(cached, wanted, key="") -> Optional[Tuple[str, object, object]]:
    """(dotted key, cached value, wanted value) of the first difference, or None."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        for k in sorted(set(cached) | set(wanted)):
            found = first_difference(cached.get(k), wanted.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if cached == wanted else (key, cached, wanted)


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_cache(cfg, vae) -> dict:
    """The index of `cfg.data.cache` if it was made for this config; a one-line LdmError if not.

    A cache without hidden states serves any text encoder (they are computed in the loop);
    one with flips serves a run without them. Everything else must be equal.
    """
    folder = Path(cfg.data.cache)
    rerun = f"re-run ldm-cache with this config (ldm-cache --config ... --out {folder})"
    if not (folder / INDEX).is_file():
        raise LdmError(f"data.cache={folder} holds no finished cache (no {INDEX}): {rerun}")
    with reading(folder / INDEX, "an ldm-cache index (JSON)", rerun):
        index = json.loads((folder / INDEX).read_text())
        cached = dict(index["config"])
    wanted = cache_config(cfg, vae)
    if cached.get("format_version") != FORMAT_VERSION:
        raise LdmError(f"data.cache={folder} is format {cached.get('format_version')}, this ldm reads {FORMAT_VERSION}: {rerun}")
    if wanted["random_flip"] and not cached["random_flip"]:
        raise LdmError(f"data.cache={folder} has no flipped latents but data.random_flip is on: {rerun} (or data.random_flip=false)")
    cached["random_flip"] = wanted["random_flip"]
    if wanted.get("conditioning") and not cached.get("conditioning"):
        raise LdmError(f"data.cache={folder} has no control images but data.conditioning is on: {rerun}")
    # A cache with controls serves a run without them.
    cached.pop("conditioning", None)
    wanted.pop("conditioning", None)
    if cached["text_encoder"] is None or wanted["text_encoder"] is None:
        cached["text_encoder"] = wanted["text_encoder"]
    if cached["vae"]["fingerprint"] == wanted["vae"]["fingerprint"]:
        cached["vae"]["path"] = wanted["vae"]["path"]  # the same VAE, moved
    found = first_difference(cached, wanted)
    if found:
        key, was, now = found
        raise LdmError(f"data.cache={folder} does not match this config: {key} is {short(was)} in the cache, {short(now)} now: {rerun}")
    for shard in index["shards"]:  # each shard's header and captions, before training starts (not mid-epoch)
        path = folder / shard["file"]
        with reading(path, "an ldm-cache shard (safetensors with captions)", rerun):
            with safe_open(str(path), "pt") as f:
                json.loads(f.metadata()["captions"])
    return index


# ---------------------------------------------------------------- writing


def atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    """Write a safetensors file under a temporary name, then rename it: never a half file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_name(unit: int) -> str:
    return f"shard-{unit:05d}.safetensors"


class Encoders:
    """The frozen models a cache entry comes from, on one device, in float32."""

    def __init__(self, vae, tokenizer, text_encoder, flips: bool, device):
        self.vae, self.tokenizer, self.text_encoder, self.flips, self.device = vae, tokenizer, text_encoder, flips, device

    @torch.no_grad()
    def text(self, captions: List[str]) -> torch.Tensor:
        from ldm.text_encoder import encode_text, tokenize

        return encode_text(self.text_encoder, tokenize(self.tokenizer, captions, self.device)).float().cpu()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, captions: List[str]) -> dict:
        """Posterior mean/std of the images (and of their mirror images), hidden states of the captions.

        The posterior comes from `ldm.codec.LatentCodec.encode`, as in the uncached training loop.
        """
        pixels = pixels.to(self.device)
        views = {"": pixels, "_flip": pixels.flip(-1)} if self.flips else {"": pixels}
        out = {}
        codec = LatentCodec(self.vae)
        for suffix, x in views.items():
            mean, std = codec.encode(x)
            out["mean" + suffix], out["std" + suffix] = mean.float().cpu(), std.float().cpu()
        if self.text_encoder is not None:
            out["context"] = self.text(captions)
        return out


def bucket_name(item: dict) -> str:
    """"HxW" of a bucketed item's bucket; "" for an item of a data set without buckets."""
    if "target_size" not in item:
        return ""
    height, width = item["target_size"].tolist()
    return f"{height}x{width}"


def encode_unit(encoders: Encoders, items: Iterator[dict], batch_size: int, progress) -> Tuple[dict, List[str], dict]:
    """All entries of one unit: stacked tensors, the captions in item order, and the shard's bucket metadata.

    Items are encoded in batches of one bucket; without buckets (one nameless bucket) the
    tensors are stacked in item order under their plain names and the metadata is empty.
    """
    parts, captions, buffers, rows, records, counts = {}, [], {}, [], [], {}

    def flush(name):
        batch = buffers.pop(name)
        pixels = torch.stack([item["pixel_values"] for item in batch])
        part = encoders.encode(pixels, [item["caption"] for item in batch])
        if "conditioning_pixel_values" in batch[0]:  # [0, 1] floats of 8-bit images: uint8 holds them exactly
            control = torch.stack([item["conditioning_pixel_values"] for item in batch])
            part["conditioning"] = (control * 255).round().to(torch.uint8)
        parts.setdefault(name, []).append(part)
        progress.update(len(batch))

    for item in items:
        name = bucket_name(item)
        rows.append([name, counts.get(name, 0)])  # its row among its bucket's entries
        counts[name] = counts.get(name, 0) + 1
        if name:
            records.append({"original_size": item["original_size"].tolist(), "crop_top_left": item["crop_top_left"].tolist()})
        captions.append(item["caption"])
        buffers.setdefault(name, []).append(item)
        if len(buffers[name]) == batch_size:
            flush(name)
    for name in list(buffers):
        flush(name)
    if not parts:
        return {}, [], {}
    suffix = lambda name: f".{name}" if name else ""  # noqa: E731
    tensors = {key + suffix(name): torch.cat([p[key] for p in group]) for name, group in parts.items() for key in group[0]}
    metadata = {"rows": json.dumps(rows), "records": json.dumps(records)} if "" not in parts else {}
    return tensors, captions, metadata


def units_of(data_cfg) -> Tuple[int, callable, int]:
    """(number of units, unit -> its decoded items, total items or None) for a `DataConfig`."""
    from ldm.data import build_dataset

    if data_cfg.source == "webdataset":
        from ldm.data.transforms import image_transform, paired_transform
        from ldm.data.webdataset import decode, expand_shards, read_samples, sample_name

        shards = expand_shards(data_cfg.path)
        transform = (paired_transform if data_cfg.conditioning else image_transform)(data_cfg.resolution, center_crop=True)
        if data_cfg.buckets.enabled:
            from ldm.data.buckets import bucket_transform

            transform = bucket_transform(data_cfg, center_crop=True, random_flip=False)

        def tar_items(unit):
            for sample in read_samples([shards[unit]]):
                try:
                    yield decode(sample, transform)
                except LdmError:  # a sample without its control: the data, not a bad file
                    raise
                except Exception as e:  # noqa: BLE001 - a bad sample is skipped, as in training
                    logger.warning("skipping undecodable sample %s (%s: %s)", sample_name(sample), type(e).__name__, e)

        return len(shards), tar_items, None
    dataset = build_dataset(data_cfg, "train", augment=False)
    n = len(dataset)

    def map_items(unit):
        return (dataset[i] for i in range(unit * UNIT_SIZE, min(n, (unit + 1) * UNIT_SIZE)))

    return (n + UNIT_SIZE - 1) // UNIT_SIZE, map_items, n


def write_cache(cfg, out, accelerator) -> Path:
    """Encode `cfg`'s training data into `out` (see the module doc); returns the folder."""
    from ldm.autoencoder import load_vae
    from ldm.text_encoder import build_text_encoder

    out = Path(out)
    vae = load_vae(cfg.vae_path)
    cfg = with_unet_buckets(cfg, vae)  # data.buckets: the step train_unet will check the cache against
    config = cache_config(cfg, vae)
    num_units, unit_items, total = units_of(cfg.data)
    made_for = out / CONFIG
    if made_for.is_file():  # every process checks, so that none is left waiting for a failed one
        found = first_difference(json.loads(made_for.read_text()), config)
        if found:
            raise LdmError(
                f"{out} holds a cache made for another config ({found[0]} differs): "
                "pick another --out, or delete the folder to rebuild it"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(made_for, json.dumps(config, indent=2))
    accelerator.wait_for_everyone()

    device = accelerator.device
    vae.requires_grad_(False).eval().to(device)
    text_encoder = tokenizer = None
    with accelerator.main_process_first():
        tokenizer, model = build_text_encoder(cfg.text_encoder, out / "tokenizer")
    if not cfg.text_encoder.trainable:
        text_encoder = model.requires_grad_(False).eval().to(device)
    encoders = Encoders(vae, tokenizer, text_encoder, cfg.data.random_flip, device)
    if not cfg.data.center_crop:
        accelerator.print("note: data.center_crop=false, but the cache holds center crops (random crops cannot be cached)")

    mine = [u for u in range(accelerator.process_index, num_units, accelerator.num_processes) if not (out / shard_name(u)).is_file()]
    todo = None if total is None else sum(min(UNIT_SIZE, total - u * UNIT_SIZE) for u in mine)
    progress = tqdm(total=todo, unit="img", desc="ldm-cache", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for unit in mine:
        tensors, captions, buckets = encode_unit(encoders, unit_items(unit), cfg.train.batch_size, progress)
        if not captions:
            logger.warning("unit %d has no decodable samples: its shard is empty", unit)
            tensors = {}
        atomic_save(tensors, out / shard_name(unit), {"captions": json.dumps(captions), **buckets})
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if text_encoder is not None:
            atomic_save({"context": encoders.text([""])}, out / EMPTY_CONTEXT, {})
        shards = []
        for unit in range(num_units):
            with safe_open(str(out / shard_name(unit)), "pt") as f:
                shards.append({"file": shard_name(unit), "num_samples": len(json.loads(f.metadata()["captions"]))})
        index = {
            "config": config,
            "num_samples": sum(s["num_samples"] for s in shards),
            "shards": shards,
            "empty_context": EMPTY_CONTEXT if text_encoder is not None else None,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(out / INDEX, json.dumps(index, indent=2))
        accelerator.print(f"cache: {index['num_samples']} samples in {len(shards)} shards in {out}")
    accelerator.wait_for_everyone()
    return out

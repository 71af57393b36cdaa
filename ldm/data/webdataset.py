"""WebDataset tar shards: data at scale, each process reading its own shards.

A shard is a tar file of samples; a sample is the files that share a key
(`000123.jpg` + `000123.txt`, or `000123.png` + `000123.json` with a "caption" or "text"
entry). With data.conditioning, a sample also carries its control image of the image's
size, `000123.cond.png`; a sample without one, or with one of another size, stops the
run with a one-line error naming the shard and the key (a data error, not a bad file).
`data.path` names the shards with brace patterns, several joined by "::"
(webdataset's convention): `/data/laion-{000000..000999}.tar::/data/extra-{00..09}.tar`.

Exact resume and no DDP hang both ask that every process know, from (seed, epoch, rank)
alone, which samples it yields and how many:
- process `rank` of `world` reads shards[rank::world];
- each epoch it reads them in a shuffled order (and through a seeded shuffle buffer),
  both drawn from a generator seeded with (seed, epoch, rank);
- every process yields data.num_samples // world samples per epoch, going round its
  shards again if they hold fewer (so all processes take the same number of steps);
- a resume skips the samples already consumed in the epoch by reading past their
  bytes, never decoding them.
A sample that does not decode is replaced by the next one that does (and counted, its
key logged), as `ldm.data.folder` does: positions in the stream never shift, so the
skip on resume stays exact.

DataLoader workers split the stream by whole batches (worker w yields the samples of
batches w, w + W, ...), so the batches are the same with any number of workers.

With aspect-ratio buckets (a `BucketTransform`, data.buckets), the stream yields whole
batches of one bucket each, grouped by `ldm.data.bucket_batches.stream_batches` from the
image headers of the epoch's samples (read, not decoded): a fixed number of batches per
epoch and process, every sample of the epoch exactly once. A resume re-reads the headers
of the epoch's consumed samples to rebuild its grouping, and decodes from the first
unused batch. An undecodable sample is replaced by another of its batch (or the last good
one of its bucket), so that a batch keeps its size and shape.
"""

import io
import itertools
import json
import logging
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ldm.data.bucket_batches import stream_batches, stream_batches_per_epoch
from ldm.data.buckets import BucketTransform
from ldm.data.skips import note_skip
from ldm.data.transforms import PairedTransform
from ldm.errors import LdmError

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "json")
CONTROL_KEY = "cond.png"
SHUFFLE_BUFFER = 1000  # samples; webdataset's usual size, a few MB of undecoded JPEGs


def expand_shards(path: Optional[str]) -> List[str]:
    """The shard files named by `path` ("::"-joined brace patterns); every one must exist."""
    if not path:
        raise LdmError("data.source is 'webdataset' but data.path is not set (set it to shard files, e.g. data/shard-{000000..000099}.tar)")
    shards = []
    for pattern in path.split("::"):
        if "://" in pattern or pattern.startswith("pipe:"):
            raise LdmError(f"webdataset shard '{pattern}' is not a local file: only local shards are supported (copy them to local disk)")
        names = list(braceexpand(pattern))
        missing = [name for name in names if not Path(name).is_file()]
        if missing:
            raise LdmError(
                f"data.path pattern '{pattern}' names {len(names)} shards, {len(missing)} of which do not exist "
                f"(the first is {missing[0]}): fix data.path"
            )
        shards.extend(names)
    return shards


def log_and_continue(exn: Exception) -> bool:
    """A broken tar member: log it and read on (webdataset's handler protocol)."""
    logger.warning("skipping unreadable tar data (%s: %s)", type(exn).__name__, exn)
    return True


def read_samples(shards: List[str]) -> Iterator[Dict]:
    """Undecoded samples ({"__key__", "__url__", "jpg": bytes, ...}) of `shards`, in order."""
    return wds.tarfile_samples([{"url": shard} for shard in shards], handler=log_and_continue)


def decode(sample: Dict, transform: Callable) -> dict:
    """{"pixel_values": transform(image), "caption": str}; raises on a broken sample.

    A `PairedTransform` also decodes the sample's control image into
    "conditioning_pixel_values"; a missing or mis-sized one raises an `LdmError`.
    """
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) in the sample")
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8")
    elif "json" in sample:
        meta = json.loads(sample["json"])
        caption = meta.get("caption", meta.get("text"))
        if not isinstance(caption, str):
            raise ValueError('its json has no string "caption" or "text"')
    else:
        raise ValueError(f"no caption ({', '.join(CAPTION_KEYS)}) in the sample")
    bucketed = isinstance(transform, BucketTransform)  # items carry their bucket's record (ldm.data.buckets)
    paired = isinstance(transform, PairedTransform) or (bucketed and transform.paired)
    if paired and CONTROL_KEY not in sample:
        raise LdmError(
            f"webdataset sample {sample_name(sample)} has no {CONTROL_KEY} but data.conditioning is on "
            f"(every sample needs its control image as KEY.{CONTROL_KEY}, or set data.conditioning=false)"
        )
    with Image.open(io.BytesIO(sample[image_key])) as image:
        image.load()
        if not paired:
            if bucketed:
                return {**transform(image), "caption": caption.strip()}
            return {"pixel_values": transform(image), "caption": caption.strip()}
        with Image.open(io.BytesIO(sample[CONTROL_KEY])) as control:
            if control.size != image.size:
                raise LdmError(
                    f"webdataset sample {sample_name(sample)}: its {CONTROL_KEY} is {control.size[0]}x{control.size[1]} "
                    f"but its {image_key} is {image.size[0]}x{image.size[1]} (a control image must have its image's size)"
                )
            control.load()
            if bucketed:
                return {**transform(image, control), "caption": caption.strip()}
            pixels, control_pixels = transform(image, control)
        return {"pixel_values": pixels, "caption": caption.strip(), "conditioning_pixel_values": control_pixels}


def image_size(sample: Dict):
    """(width, height) of a sample's image, from its header (no pixel decoding)."""
    image_key = next(k for k in IMAGE_KEYS if k in sample)
    with Image.open(io.BytesIO(sample[image_key])) as image:
        return image.size


def sample_name(sample: Dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def shuffled(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer (webdataset's, with our generator so the order is reproducible)."""
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """The samples of one process's shards, `len(self)` of them per epoch (see the module doc).

    Built for all shards with rank 0 of 1; `for_process` gives a process its part.
    `num_skipped` counts the undecodable samples met so far in this process.
    """

    def __init__(self, shards: List[str], num_samples: int, transform: Callable, seed: int = 0,
                 rank: int = 0, world: int = 1, batch_size: int = 1, shuffle_buffer: int = SHUFFLE_BUFFER):
        if len(shards) < world:
            raise LdmError(
                f"{len(shards)} webdataset shards for {world} processes: each process needs at least one shard "
                f"(split the data into more shards, or use at most {len(shards)} processes)"
            )
        self.shards, self.num_samples, self.transform, self.seed = shards, num_samples, transform, seed
        self.rank, self.world, self.batch_size, self.shuffle_buffer = rank, world, batch_size, shuffle_buffer
        self.epoch, self.skip = 0, 0
        self.skipped_keys: List[str] = []
        self.skip_log = None  # the run's skipped.jsonl (set by the training loop; workers inherit it)

    def for_process(self, rank: int, world: int, batch_size: int, seed: int) -> "ShardStream":
        """Process `rank` of `world`'s part, read with train.seed and train.batch_size."""
        return ShardStream(self.shards, self.num_samples, self.transform, seed, rank, world, batch_size, self.shuffle_buffer)

    @property
    def my_shards(self) -> List[str]:
        return self.shards[self.rank::self.world]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_keys)

    def __len__(self) -> int:
        return self.num_samples // self.world

    @property
    def bucketed(self) -> bool:
        return isinstance(self.transform, BucketTransform)

    @property
    def batches_per_epoch(self) -> int:
        """Batches of this process per epoch: full ones, or with buckets `stream_batches_per_epoch`."""
        if self.bucketed:
            return stream_batches_per_epoch(len(self), self.batch_size, len(self.transform.buckets))
        return len(self) // self.batch_size

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch` at sample `skip` (samples already consumed in it are read past, not decoded)."""
        self.epoch, self.skip = epoch, skip

    def raw_stream(self) -> Iterator[Dict]:
        """This epoch's undecoded samples, going round the shards for as long as asked."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        order = [self.my_shards[i] for i in rng.permutation(len(self.my_shards))]

        def rounds():
            while True:  # each round shuffles only within itself, so the first one yields every sample once
                empty = True
                samples = read_samples(order)
                for sample in shuffled(samples, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else samples:
                    empty = False
                    yield sample
                if empty:
                    raise LdmError(f"the webdataset shards of process {self.rank} hold no samples: {order[0]} ...")

        return rounds()

    def mine(self, position: int) -> bool:
        """Whether this DataLoader worker yields the sample at `position` (whole batches per worker)."""
        info = get_worker_info()
        # Counted from where this pass starts: the DataLoader asks worker 0 for its first batch.
        return info is None or ((position - self.skip) // self.batch_size) % info.num_workers == info.id

    def __iter__(self) -> Iterator[dict]:
        if self.bucketed:
            yield from self.bucket_batches()
            return
        end = len(self)
        pending = 0  # positions of ours whose sample did not decode: the next good one fills them
        failures = 0
        for position, sample in enumerate(itertools.islice(self.raw_stream(), self.skip, None), start=self.skip):
            ours = position < end and self.mine(position)
            if position >= end and not pending:
                return
            if not (ours or pending):
                continue
            try:
                item = decode(sample, self.transform)
            except LdmError:  # a sample the data set's config does not fit: no skip mends that
                raise
            except Exception as e:  # PIL and json raise many kinds on bad bytes
                self.undecodable(sample, e)
                failures += 1
                if failures > max(len(self), 10_000):
                    raise LdmError(f"{failures} webdataset samples in a row did not decode (check the shards: {self.my_shards[0]} ...)")
                pending += ours
                continue
            failures = 0
            for _ in range(pending + ours):
                yield item
            pending = 0

    def undecodable(self, sample: Dict, error: Exception) -> None:
        """`sample` did not decode: counted, warned about and named in the run's skipped.jsonl (bucketed or not)."""
        self.skipped_keys.append(sample_name(sample))
        note_skip(self.skip_log, sample_name(sample), f"undecodable sample ({type(error).__name__}: {error})", logger)

    def bucket_of(self, sample: Dict) -> int:
        try:
            return self.transform.bucket_of(image_size(sample))
        except Exception:  # noqa: BLE001 - no readable header: it will not decode, and its batch replaces it
            return self.transform.bucket_of((1, 1))

    def bucket_batches(self) -> Iterator[dict]:
        """This epoch's batches of one bucket each, from batch `self.skip` on (see the module doc); collated."""
        info = get_worker_info()
        samples = ((self.bucket_of(sample), sample) for sample in self.raw_stream())
        last_good: Dict[int, dict] = {}  # per bucket: the stand-in for a batch that does not decode at all
        grouped = stream_batches(samples, self.batch_size, len(self.transform.buckets), len(self))
        for index, batch in enumerate(grouped):
            if index < self.skip or (info is not None and (index - self.skip) % info.num_workers != info.id):
                continue
            yield default_collate(self.decode_batch(batch, last_good))

    def decode_batch(self, batch: List[Dict], last_good: Dict[int, dict]) -> List[dict]:
        """The decoded items of one bucket's batch; an undecodable sample is replaced by a good one of the batch."""
        items = []
        for sample in batch:
            try:
                items.append(decode(sample, self.transform))
            except LdmError:  # a sample the data set's config does not fit: no skip mends that
                raise
            except Exception as e:  # PIL and json raise many kinds on bad bytes
                self.undecodable(sample, e)
                items.append(None)
        good = [item for item in items if item is not None]
        bucket = self.bucket_of(batch[0])
        if good:
            last_good[bucket] = good[-1]
        elif bucket in last_good:
            good = [last_good[bucket]]
        else:
            raise LdmError(f"no sample of a batch decoded and none of its bucket did before (check the shards: "
                           f"{sample_name(batch[0])} ...)")
        return [item if item is not None else good[i % len(good)] for i, item in enumerate(items)]


def build_webdataset(cfg, transform: Callable) -> ShardStream:
    """The shards of a `DataConfig` with source 'webdataset', checked before training."""
    shards = expand_shards(cfg.path)
    if cfg.num_samples is None or cfg.num_samples < 1:
        raise LdmError(
            "data.num_samples must be set for data.source=webdataset (tar shards do not store their length): "
            "count the samples, e.g. with ldm-cache, which prints them, or `tar tf SHARD | grep -c '\\.txt$'` per shard"
        )
    return ShardStream(shards, cfg.num_samples, transform)

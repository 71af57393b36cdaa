"""The order of training batches, as a function of (seed, epoch) only.

A resumed run must see exactly the batches the uninterrupted run would have seen. So
each epoch's order is drawn from its own generator seeded with (seed, epoch), and a
resume rebuilds the order of the epoch it stopped in and skips the batches it already
used (accelerate's `skip_first_batches` skips indices without loading images). Every
process draws the same order, which accelerate then shards across processes.

A webdataset stream (`ShardStream`) is split across processes by shards instead, and
orders itself from (seed, epoch, rank); its loader is a `StreamLoader`, which
`accelerator.prepare` passes through untouched (accelerate would otherwise split the
stream a second time) and which moves batches to the device itself.

With aspect-ratio buckets (data.buckets), a map-style data set is read through a
`BucketLoader`: a `BucketBatchSampler` (ldm.data.bucket_batches) makes each batch of one
bucket and gives each process its own batches, so accelerate must not shard it again.
"""

from typing import Iterator

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Sampler, Subset

from ldm.data.bucket_batches import BucketBatchSampler
from ldm.data.webdataset import ShardStream
from ldm.errors import LdmError


class EpochShuffle(Sampler):
    """A random permutation of range(n) per epoch, drawn from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


class StreamLoader:
    """Batches of this process's part of a `ShardStream`, on `device`.

    Not a DataLoader, so that `accelerator.prepare` leaves it alone.
    """

    def __init__(self, loader: DataLoader, device=None):
        self.loader, self.device = loader, device

    @property
    def dataset(self) -> ShardStream:
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        """Per process, as a DataLoader's (what DeepSpeed's `auto` micro-batch is; distributed.fill_micro_batch)."""
        return self.loader.batch_size

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch  # full batches only (with buckets: see ShardStream)

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        # A bucketed stream yields whole batches and skips them; a plain one skips samples.
        self.dataset.set_position(epoch, skip_batches * (1 if self.dataset.bucketed else self.loader.batch_size))

    def __iter__(self):
        for batch in self.loader:
            yield batch if self.device is None else send_to_device(batch, self.device)


class BucketLoader(StreamLoader):
    """Batches of one aspect-ratio bucket each, this process's share, on `device` (see the module doc)."""

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.loader.batch_sampler.set_position(epoch, skip_batches)


def item_buckets(dataset):
    """The bucket of each item of a bucketed map-style data set (through Subsets), or None when it has none."""
    indices = None
    while isinstance(dataset, Subset):
        indices = dataset.indices if indices is None else [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    buckets = getattr(dataset, "item_buckets", None)
    if buckets is None:
        return None
    return list(buckets) if indices is None else [buckets[i] for i in indices]


def bucket_loader(dataset, buckets, batch_size: int, num_workers: int, seed: int) -> BucketLoader:
    """This process's batches of a bucketed data set, in (seed, epoch) order."""
    state = PartialState()
    sampler = BucketBatchSampler(buckets, batch_size, seed, state.process_index, state.num_processes)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
    return BucketLoader(loader, state.device)


def stream_loader(dataset: ShardStream, batch_size: int, num_workers: int, seed: int) -> StreamLoader:
    """This process's part of a webdataset stream, in (seed, epoch, rank) order."""
    state = PartialState()  # the Accelerator's process index and count
    part = dataset.for_process(state.process_index, state.num_processes, batch_size, seed)
    if len(part) < batch_size:
        raise LdmError(
            f"data.num_samples={dataset.num_samples} over {state.num_processes} processes is fewer than one batch "
            f"each (train.batch_size={batch_size}): lower train.batch_size or check data.num_samples"
        )
    # No persistent workers: each epoch's position is set on the data set before its workers start.
    # generator: as in train_loader, so that starting an iterator never draws from the training RNG.
    # A bucketed stream yields whole batches (of one bucket each): the DataLoader does not batch them again.
    batching = dict(batch_size=None) if part.bucketed else dict(batch_size=batch_size, drop_last=True)
    loader = DataLoader(part, **batching, num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    return StreamLoader(loader, state.device)


def train_loader(dataset, batch_size: int, num_workers: int, seed: int, num_processes: int = 1):
    """A DataLoader over `dataset` in EpochShuffle order; full batches only (a `StreamLoader` for shards)."""
    if isinstance(dataset, ShardStream):
        return stream_loader(dataset, batch_size, num_workers, seed)
    if len(dataset) == 0:
        raise LdmError("the training data set is empty: check data.path / data.source")
    if len(dataset) < batch_size * num_processes:
        raise LdmError(
            f"the training set has {len(dataset)} images, fewer than one batch "
            f"(train.batch_size={batch_size} x {num_processes} processes): lower train.batch_size or add images"
        )
    buckets = item_buckets(dataset)
    if buckets is not None:
        return bucket_loader(dataset, buckets, batch_size, num_workers, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(len(dataset), seed),
        num_workers=num_workers,
        drop_last=True,  # equal batches: steady images/s and no tiny last step
        # Workers' seeds come from this generator, not from the global RNG, so creating an
        # iterator (each epoch, or on resume) leaves the training noise stream untouched.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def batches_from(accelerator, loader, batches_done: int) -> Iterator:
    """Batches forever from a prepared `loader`, starting `batches_done` batches in."""
    epoch, skip = divmod(batches_done, len(loader))
    while True:
        if isinstance(loader, StreamLoader):
            loader.set_position(epoch, skip)  # the stream reads past the consumed samples itself
            yield from loader
            epoch, skip = epoch + 1, 0
            continue
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0

"""Batches of one aspect-ratio bucket each, every image exactly once an epoch, in (seed, epoch) order.

Map-style data (a folder, an ldm-cache folder): `epoch_batches` draws the epoch's order as
`ldm.train.loader.EpochShuffle` does (a permutation of the items from (seed, epoch)), then
walks it, putting each item into the open batch of its bucket; a batch takes its place in
the epoch where its first item stands, and closes when full. So a bucket's items are cut
into batches in shuffled order, buckets interleave as they come in the permutation, and a
data set of one bucket (square images) gets exactly EpochShuffle's batches.
Remainders: a bucket's last batch keeps its few items (a smaller batch) rather than drop
them: no image is missed. With several processes the number of batches must be a multiple
of their number (each takes the same number of steps, or DDP hangs): the largest batch, the
first of them on ties, is split in two halves until it is. Process r takes batches
r, r + world, ... (as accelerate shards a batch sampler); a resume skips the batches it has
already used without loading them. (Only when every batch is a single image, train.batch_size=1,
can no batch be split: then the epoch's last few single images, fewer than the number of
processes, wait for the next epoch, which draws another order.)

Streams (webdataset shards) cannot be planned ahead: `stream_batches` groups the samples as
they come, a buffer per bucket emitting a batch when full; at the end of the epoch the
partly filled buffers are emitted too. So that every process takes the same number of
steps, known in advance, an epoch of n samples makes exactly `stream_batches_per_epoch`
batches: it holds the last few full batches back and splits them (and the remainders) at
the end when the data filled too few buckets; every sample still comes exactly once.
"""

import math
from typing import Dict, Hashable, Iterable, Iterator, List, Sequence, Tuple, TypeVar

import numpy as np
from torch.utils.data import Sampler

T = TypeVar("T")


def split_largest(batches: List[list]) -> bool:
    """Split the largest batch (the first on ties) in halves, in place; False when every batch is a single item."""
    i = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
    batch = batches[i]
    if len(batch) < 2:
        return False
    half = (len(batch) + 1) // 2
    batches[i:i + 1] = [batch[:half], batch[half:]]
    return True


def split_to_multiple(batches: List[list], multiple: int) -> List[list]:
    """`batches` with the largest one (the first on ties) split in halves until their number is a multiple of `multiple`."""
    batches = list(batches)
    while len(batches) % multiple:
        if not split_largest(batches):
            return batches[:len(batches) - len(batches) % multiple]  # single images only (see the module doc)
    return batches


def epoch_batches(buckets: Sequence[int], batch_size: int, seed: int, epoch: int, world: int = 1) -> List[List[int]]:
    """Every process's batches of item indices for `epoch` (item i is in bucket `buckets[i]`); see the module doc."""
    order = np.random.default_rng([seed, epoch]).permutation(len(buckets)).tolist()  # EpochShuffle's order
    batches, open_batch = [], {}
    for i in order:
        batch = open_batch.get(buckets[i])
        if batch is None:
            batch = open_batch[buckets[i]] = []
            batches.append(batch)  # placed where its first item stands
        batch.append(i)
        if len(batch) == batch_size:
            del open_batch[buckets[i]]
    return split_to_multiple(batches, world)


class BucketBatchSampler(Sampler):
    """Process `rank` of `world`'s batches of an epoch (`epoch_batches`), from `skip` on; a DataLoader batch_sampler."""

    def __init__(self, buckets: Sequence[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.buckets, self.batch_size, self.seed, self.rank, self.world = list(buckets), batch_size, seed, rank, world
        self.epoch, self.skip = 0, 0
        # The same in every epoch: the batches per bucket do not depend on the order.
        self.num_batches = len(epoch_batches(self.buckets, batch_size, seed, 0, world)) // world

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch` at this process's batch `skip` (the batches before it are not loaded)."""
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        batches = epoch_batches(self.buckets, self.batch_size, self.seed, self.epoch, self.world)[self.rank::self.world]
        return iter(batches[self.skip:])


def stream_batches_per_epoch(num_samples: int, batch_size: int, num_buckets: int) -> int:
    """How many batches `stream_batches` makes of `num_samples` samples: enough for any spread over the buckets."""
    # A bucket of k samples needs ceil(k / batch_size) batches: at most n // batch_size + num_buckets in all.
    return min(num_samples, num_samples // batch_size + num_buckets)


def stream_batches(items: Iterable[Tuple[Hashable, T]], batch_size: int, num_buckets: int, num_samples: int) -> Iterator[List[T]]:
    """The first `num_samples` (bucket, item) pairs of `items` grouped into exactly
    `stream_batches_per_epoch` batches of one bucket each, every item once, in an order fixed by the items' order.

    Full batches go out as they fill, except the last `held` of them: splitting those (and
    the remainders) in halves at the end always reaches the fixed number, since
    held * (batch_size - 1) >= num_buckets extra batches can be cut from them.
    """
    target = stream_batches_per_epoch(num_samples, batch_size, num_buckets)
    held_back = 0 if batch_size == 1 else math.ceil(num_buckets / (batch_size - 1))
    buffers: Dict[Hashable, List[T]] = {}
    held: List[List[T]] = []
    emitted = 0
    for count, (bucket, item) in enumerate(items):
        if count == num_samples:
            break
        buffer = buffers.setdefault(bucket, [])
        buffer.append(item)
        if len(buffer) == batch_size:
            held.append(buffers.pop(bucket))
            if len(held) > held_back:
                emitted += 1
                yield held.pop(0)
    rest = held + list(buffers.values())  # dicts keep insertion order: the remainders by their first item
    while emitted + len(rest) < target:  # cannot run out of batches to split: see the docstring
        split_largest(rest)
    yield from rest

"""The order of training batches, as a function of (seed, epoch) only.

A resumed run must see exactly the batches the uninterrupted run would have seen. So
each epoch's order is drawn from its own generator seeded with (seed, epoch), and a
resume rebuilds the order of the epoch it stopped in and skips the batches it already
used (accelerate's `skip_first_batches` skips indices without loading images). Every
process draws the same order, which accelerate then shards across processes.
"""

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

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


def train_loader(dataset, batch_size: int, num_workers: int, seed: int, num_processes: int = 1) -> DataLoader:
    """A DataLoader over `dataset` in EpochShuffle order; full batches only."""
    if len(dataset) == 0:
        raise LdmError("the training data set is empty: check data.path / data.source")
    if len(dataset) < batch_size * num_processes:
        raise LdmError(
            f"the training set has {len(dataset)} images, fewer than one batch "
            f"(train.batch_size={batch_size} x {num_processes} processes): lower train.batch_size or add images"
        )
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
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0

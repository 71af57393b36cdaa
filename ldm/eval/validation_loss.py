"""Held-out validation loss: the stage-2 objective on the held-out split at fixed noise levels and fixed noise.

A training loss mostly tells which noise levels a batch happened to draw. Measured on
the same held-out images, at the same noise levels, with the same noise every time, the
loss becomes comparable from one step to the next: Esser et al. 2024 (arXiv:2403.03206)
track it and find that it follows human preference. Here:

- the images: the held-out split (the first `data.num_validation` items, never trained on),
  encoded to the *mean* of the VAE posterior (no sample: nothing random), unaugmented;
- the noise levels: `validation.loss_buckets` = K levels from the objective,
  `objective.validation_levels(K)`: the midpoint quantiles (k + 1/2) / K of its own
  training distribution, in its own units (DDPM: integer t evenly spaced over [0, T), or
  the cubic quantiles; EDM: sigma of the log-normal; flow: t of the logit-normal or
  uniform); bucket k = 0 is the least noise;
- the noise: for held-out item i, K draws of the objective's noise (offset noise
  included) from a `torch.Generator` seeded with numpy's SeedSequence([validation.seed, i]):
  fixed, independent of how the split is shared between processes, and never drawn from
  the global RNG (training stays bit-identical);
- the loss: the objective's own per-example loss (its target and weighting), with the
  real captions (no caption dropout).

Under several processes each takes items rank, rank + P, ...; the per-bucket sums and
the item count are summed across processes (`accelerate.utils.reduce`), so every process
gets the means of the whole split. Keys (metrics.jsonl and TensorBoard):

    val_loss          mean over the K buckets (the raw weights)
    val_loss_t{k}     bucket k = 0 .. K-1 (the raw weights)
    val_loss_ema      the same with the EMA weights (when the stage keeps an EMA)
    val_loss_ema_t{k}
"""

from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate.state import PartialState
from accelerate.utils import reduce
from torch.utils.data import default_collate

from ldm.errors import LdmError
from ldm.text_encoder import encode_text, tokenize

KEY = "val_loss"
# A held-out batch -> (net(x, timestep, context), z0 [B, C, H, W], context): what the objective is called on.
Inputs = Callable[[dict], Tuple[Callable, torch.Tensor, torch.Tensor]]


def check_validation_loss_config(cfg) -> None:
    """Reject bad `validation.loss_*` values of a `ValidationConfig` before anything slow."""
    if cfg.loss_buckets < 1:
        raise LdmError(f"validation.loss_buckets must be at least 1 (8 is usual), got {cfg.loss_buckets}")
    if cfg.loss_batch_size < 1:
        raise LdmError(f"validation.loss_batch_size must be at least 1, got {cfg.loss_batch_size}")


def held_out_split(data_cfg):
    """The held-out split, or None where the data has none (data.num_validation=0, or a webdataset stream)."""
    from ldm.data import build_dataset

    if data_cfg.num_validation == 0 or data_cfg.source == "webdataset":
        return None
    return build_dataset(data_cfg, "validation")


def key(ema: bool, bucket: Optional[int] = None) -> str:
    """The metrics key: val_loss, val_loss_t{k}, val_loss_ema, val_loss_ema_t{k}."""
    return KEY + ("_ema" if ema else "") + ("" if bucket is None else f"_t{bucket}")


def item_generator(seed: int, index: int) -> torch.Generator:
    """The generator of held-out item `index`'s noise: its own stream, whatever the process sharing."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def item_noise(objective, seed: int, index: int, buckets: int, shape: Sequence[int]) -> torch.Tensor:
    """[buckets, *shape] float32 CPU noise of item `index`, row k for bucket k (the objective's noise, offset included)."""
    return objective.sample_noise(torch.zeros((buckets, *shape)), generator=item_generator(seed, index))


@contextmanager
def eval_mode(*modules):
    """The modules in eval mode for the block, then back in the mode they were in."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class ValidationLoss:
    """The validation loss of one objective on one held-out split; call it with a stage's `Inputs`.

    `rank`, `world`: this process's share of the split (default: the Accelerate state's).
    """

    def __init__(self, objective, dataset, cfg, rank: Optional[int] = None, world: Optional[int] = None):
        check_validation_loss_config(cfg)
        state = PartialState() if rank is None or world is None else None
        self.rank = state.process_index if rank is None else rank
        self.world = state.num_processes if world is None else world
        self.objective, self.dataset = objective, dataset
        self.buckets, self.batch_size, self.seed = cfg.loss_buckets, cfg.loss_batch_size, cfg.seed
        self.levels = objective.validation_levels(self.buckets)
        self.indices = list(range(self.rank, len(dataset), self.world))

    def batches(self):
        """(global indices, collated items) of this process's share, in batches of validation.loss_batch_size."""
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            yield chunk, default_collate([self.dataset[i] for i in chunk])

    @torch.no_grad()
    def local_sums(self, inputs: Inputs) -> Tuple[torch.Tensor, int]:
        """(per-bucket sums of the per-example losses [K] float64, item count) over this process's share."""
        sums, count = torch.zeros(self.buckets, dtype=torch.float64), 0
        for chunk, batch in self.batches():
            net, z0, context = inputs(batch)
            noise = torch.stack([item_noise(self.objective, self.seed, i, self.buckets, z0.shape[1:]) for i in chunk])
            noise = noise.to(z0.device, z0.dtype)
            for k, level in enumerate(self.levels):
                t = level.expand(len(z0)).to(z0.device)
                sums[k] += self.objective(net, z0, context, t=t, noise=noise[:, k]).double().sum().cpu()
            count += len(chunk)
        return sums, count

    def __call__(self, inputs: Inputs, ema: bool = False) -> Dict[str, float]:
        """The means over the whole split (every process must call it): {val_loss[_ema]: ..., val_loss[_ema]_t{k}: ...}."""
        sums, count = self.local_sums(inputs)
        totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
        if self.world > 1:
            totals = reduce(totals.to(PartialState().device), "sum").cpu()
        means = (totals[:-1] / totals[-1]).tolist()
        return {key(ema): sum(means) / len(means), **{key(ema, k): m for k, m in enumerate(means)}}


def text_to_image_inputs(codec, text_encoder, tokenizer, unet, device) -> Inputs:
    """`Inputs` of a text-to-image U-Net (a stage-2 run, or a model folder's parts).

    z0: the scaled mean of the VAE posterior (`codec`: a `LatentCodec`); context: the text
    encoder's hidden states of the real captions; net: `unet` as net(x, timestep, context).
    """

    def inputs(batch):
        z0 = codec.scale(codec.encode(batch["pixel_values"])[0]).float()
        context = encode_text(text_encoder, tokenize(tokenizer, batch["caption"], device))
        return (lambda x, t, c: unet(x, t, c).sample), z0, context

    return inputs


def build_validation_loss(cfg, data_cfg, objective, print_fn=print) -> Optional[ValidationLoss]:
    """The `ValidationLoss` of a stage (`cfg`: its `validation`), or None when it is off or there is no held-out split."""
    if not cfg.loss:
        return None
    check_validation_loss_config(cfg)
    dataset = held_out_split(data_cfg)
    if dataset is None:
        print_fn("validation loss off: no held-out split (data.num_validation=0, or a webdataset source)")
        return None
    loss = ValidationLoss(objective, dataset, cfg)
    levels = ", ".join(f"{v:.4g}" for v in loss.levels.tolist())
    print_fn(f"validation loss on {len(dataset)} held-out images at {objective.kind} noise levels [{levels}] (val_loss_t0..)")
    return loss

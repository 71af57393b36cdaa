"""Stage 1: train the KL autoencoder, then measure its latent scaling factor.

Reads top to bottom: check the config, build data and model, resume, the loop, then
the final VAE folder (a diffusers AutoencoderKL whose config carries the scaling
factor measured on the training images) and a reconstruction grid.
"""

from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from ldm.autoencoder import build_vae, downsampling_factor, measure_latent_stats
from ldm.data import build_dataset
from ldm.errors import LdmError
from ldm.train.checkpoint import Checkpointer, TrainState, find_checkpoint, load_checkpoint
from ldm.train.loader import EpochShuffle, batches_from, train_loader
from ldm.train.optim import build_lr_scheduler, build_optimizer
from ldm.train.run import (
    Reporter, Run, TimeBudget, check_train_config, make_accelerator, replace_folder, rng_untouched, staging_folder,
)
from ldm.vae_loss import check_loss_config, psnr, vae_loss

GRID_IMAGES = 8  # columns of the reconstruction grid


class AutoencoderWithPosterior(torch.nn.Module):
    """AutoencoderKL whose forward returns (reconstruction, posterior q(z|x)).

    `AutoencoderKL.forward` returns only the reconstruction, and the KL term needs the
    posterior; one forward call through the wrapper keeps DDP/FSDP's hooks in play.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.vae.decode(z).sample, posterior


def train_vae(cfg, resume: Optional[str] = None) -> Path:
    """Train stage 1 from a `VAEStageConfig`; returns the final VAE folder (run/final).

    `resume`: None (start fresh), "auto" (the newest complete checkpoint, if any) or a
    checkpoint folder.
    """
    # ---- 1. Check what can be checked before anything slow.
    check_train_config(cfg.train)
    check_loss_config(cfg.loss)
    factor = downsampling_factor(cfg.model.block_out_channels)  # checked before the VAE is built
    if cfg.data.resolution % factor:
        raise LdmError(
            f"data.resolution={cfg.data.resolution} is not divisible by the VAE's downsampling factor {factor} "
            f"(2 ** (len(model.block_out_channels) - 1)): use a multiple of {factor}"
        )
    if cfg.scale_samples < 1:
        raise LdmError(f"scale_samples must be at least 1, got {cfg.scale_samples}")
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, resume)
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "validation") if cfg.data.num_validation > 0 else None
    accelerator = make_accelerator(cfg.train, run)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator.num_processes)

    # ---- 2. Model and optimizer; Accelerate wraps them for the devices and precision at hand.
    set_seed(cfg.train.seed)
    model = AutoencoderWithPosterior(build_vae(cfg.model, cfg.data.resolution))
    optimizer = build_optimizer(model.parameters(), cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    vae = accelerator.unwrap_model(model).vae
    # Weights were drawn alike on every process; the training noise must differ between them.
    set_seed(cfg.train.seed, device_specific=True)
    run.start(accelerator, cfg, "vae")
    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, len(loader))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume is not None:
        accelerator.print(f"no checkpoint in {run.checkpoints} yet: starting afresh")
    checkpoints = Checkpointer(
        accelerator, run.checkpoints, len(loader), cfg.train.checkpoints_total_limit,
        saved_step=state.step if checkpoint is not None else None,
    )

    def validate(step: int) -> None:
        """PSNR of the validation split's reconstructions, into metrics.jsonl."""
        if val_set is not None:
            report.write(step, val_psnr=validation_psnr(accelerator, vae, val_set, cfg.train.batch_size))

    # ---- 3. The loop: one optimizer step per `gradient_accumulation_steps` batches.
    report = Reporter(accelerator, run, cfg.train.max_steps, state.step, unit="images")
    budget = TimeBudget(cfg.train.max_minutes)
    data = batches_from(accelerator, loader, state.batches)
    step, batches = state.step, state.batches
    validated_step = None
    model.train()
    try:
        while step < cfg.train.max_steps:
            batch = next(data)
            batches += 1
            with accelerator.accumulate(model):
                x = batch["pixel_values"]
                x_hat, posterior = model(x)
                loss, parts = vae_loss(x, x_hat, posterior, cfg.loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            report.add(len(x), loss=loss, **parts)
            if not accelerator.sync_gradients:
                continue
            step += 1
            state = TrainState(step, batches)  # a consistent point to checkpoint at
            report.step()
            if step % cfg.train.log_every == 0:
                report.log(step, epoch=batches / len(loader), lr=lr_scheduler.get_last_lr()[0])
            if step % cfg.train.checkpoint_every == 0:
                with report.paused():
                    checkpoints.save(state)
                    validate(step)
                    validated_step = step
            if budget.spent(accelerator):
                accelerator.print(f"train.max_minutes={cfg.train.max_minutes} spent: stopping at step {step}")
                break
    except KeyboardInterrupt:
        path = checkpoints.save_if_new(state)
        if path is not None:
            accelerator.print(f"\ninterrupted: saved {path}; continue with --resume auto")
        report.close()
        raise
    checkpoints.save_if_new(state)
    if state.step != validated_step:
        validate(state.step)
    report.close()

    # ---- 4. The final VAE: measured scaling factor, a diffusers folder, a reconstruction grid.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae.eval()
        with rng_untouched(accelerator.device):
            torch.manual_seed(cfg.train.seed)  # the same factor if the end is run again
            stats = measure_latent_stats(vae, scale_batches(train_set, cfg.train.batch_size, cfg.train.seed), cfg.scale_samples)
        vae.register_to_config(**stats)
        tmp = staging_folder(run.final)
        vae.save_pretrained(str(tmp))
        replace_folder(tmp, run.final)
        report.write(state.step, **stats)
        save_reconstructions(vae, val_set if val_set is not None else train_set, run.samples / f"step-{state.step:06d}.png")
        accelerator.print(f"latent scaling_factor {stats['scaling_factor']:.5g}; final VAE in {run.final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.final


def scale_batches(dataset, batch_size: int, seed: int):
    """Image batches in a seeded random order, for measuring latent statistics."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed))
    return (batch["pixel_values"] for batch in loader)


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean: the deterministic reconstruction."""
    return vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()).sample


def validation_psnr(accelerator, vae, val_set, batch_size: int) -> Optional[float]:
    """Mean PSNR (dB) of deterministic reconstructions of the validation split (main process)."""
    value = None
    if accelerator.is_main_process:
        vae.eval()
        with rng_untouched(accelerator.device):
            scores = [psnr(b["pixel_values"].to(vae.device), reconstruct(vae, b["pixel_values"]))
                      for b in DataLoader(val_set, batch_size)]
        vae.train()
        value = torch.cat(scores).mean().item()
    accelerator.wait_for_everyone()
    return value


def save_reconstructions(vae, dataset, path: Path) -> None:
    """A grid: the first images of `dataset` on top, their reconstructions below."""
    x = torch.stack([dataset[i]["pixel_values"] for i in range(min(GRID_IMAGES, len(dataset)))])
    x_hat = reconstruct(vae, x).float().cpu().clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.cat([x, x_hat]) + 1) / 2, str(path), nrow=len(x), padding=1)

"""Stage 1: train the KL autoencoder, then measure its latent scaling factor.

Reads top to bottom: check the config, build data, model, discriminator and their
optimizers, resume, the loop, then the final VAE folder (a diffusers AutoencoderKL,
the EMA weights when enabled, whose config carries the scaling factor measured on the
training images).

Each optimizer step updates the autoencoder on reconstruction + LPIPS + KL (+ the
adversarial term once loss.discriminator_start is reached), then the PatchGAN
discriminator on the same images and their (detached) reconstructions, as Lightning
runs LDM's two optimizers.
"""

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from ldm.autoencoder import build_vae, downsampling_factor, measure_latent_stats
from ldm.data import build_dataset
from ldm.discriminator import NLayerDiscriminator, logit_map_size
from ldm.errors import LdmError
from ldm.image_metrics import SSIM_WINDOW, mean_absolute_error, psnr, ssim
from ldm.lpips import LPIPS
from ldm.train.cadence import Cadence
from ldm.train.checkpoint import TrainState, find_checkpoint, start_or_resume
from ldm.train.ema import build_ema, ema_weights
from ldm.train.loader import EpochShuffle, batches_from, train_loader
from ldm.train.optim import build_lr_scheduler, build_optimizer
from ldm.train.run import (
    Reporter, Run, check_train_config, make_accelerator, replace_folder, rng_untouched, staging_folder,
)
from ldm.vae_loss import check_loss_config, discriminator_loss, vae_loss

# LDM trains both of its Adam optimizers with betas (0.5, 0.9), the usual GAN setting;
# the discriminator keeps them whatever train.adam_beta1/2 say for the autoencoder.
DISCRIMINATOR_BETAS = (0.5, 0.9)


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
    check_stage_config(cfg)
    # LPIPS' weight files are read now, so a wrong file fails before any data or model is built.
    lpips = None
    if cfg.loss.perceptual_weight > 0:
        lpips = LPIPS.from_files(cfg.loss.lpips_vgg_weights, cfg.loss.lpips_linear_weights)
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, resume)
    if checkpoint is not None:
        check_checkpoint_parts(checkpoint, cfg.loss.discriminator_start is not None, cfg.ema.enabled)
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "validation") if cfg.data.num_validation > 0 else None
    accelerator = make_accelerator(cfg.train, run)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator.num_processes)

    # ---- 2. Models and optimizers; Accelerate wraps them for the devices and precision at hand.
    set_seed(cfg.train.seed)
    vae = build_vae(cfg.model, cfg.data.resolution)
    if cfg.train.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    model = AutoencoderWithPosterior(vae)
    ema = build_ema(vae, cfg.ema)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    disc = None
    if cfg.loss.discriminator_start is not None:  # drawn after the VAE, whose weights so stay the same without it
        disc = NLayerDiscriminator(cfg.model.out_channels, cfg.loss.discriminator_channels, cfg.loss.discriminator_layers)
        disc_train = discriminator_train_config(cfg)
        disc_optimizer = build_optimizer(disc.parameters(), disc_train)
        disc_lr_scheduler = build_lr_scheduler(disc_optimizer, disc_train, accelerator.num_processes)
        model, disc, optimizer, disc_optimizer, loader, lr_scheduler, disc_lr_scheduler = accelerator.prepare(
            model, disc, optimizer, disc_optimizer, loader, lr_scheduler, disc_lr_scheduler
        )
    else:
        model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    vae = accelerator.unwrap_model(model).vae
    trained = (model,) if disc is None else (model, disc)
    if lpips is not None:
        lpips.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    # Weights were drawn alike on every process; the training noise must differ between them.
    set_seed(cfg.train.seed, device_specific=True)
    run.start(accelerator, cfg, "vae")
    state, checkpoints = start_or_resume(
        accelerator, checkpoint, resume, run.checkpoints, len(loader), cfg.train.checkpoints_total_limit, ema
    )

    def validate(step: int) -> None:
        """PSNR, SSIM and MAE of the validation split into metrics.jsonl, and a reconstruction
        grid, with the EMA weights (main process; the training RNG is left where it was)."""
        if accelerator.is_main_process:
            with ema_weights(ema, vae), rng_untouched(accelerator.device):
                vae.eval()
                if val_set is not None:
                    report.write(step, **validation_metrics(vae, val_set, cfg.train.batch_size))
                grid_set = val_set if val_set is not None else train_set
                save_reconstructions(vae, grid_set, cfg.validation.grid_images, run.samples / f"step-{step:06d}.png")
                vae.train()
        accelerator.wait_for_everyone()

    # ---- 3. The loop: one optimizer step (of each optimizer) per `gradient_accumulation_steps` batches.
    report = Reporter(accelerator, run, cfg.train.max_steps, state.step, unit="images")
    cadence = Cadence(accelerator, cfg.train, cfg.validation.every, report, checkpoints, validate, lr_scheduler, len(loader))
    data = batches_from(accelerator, loader, state.batches)
    step, batches = state.step, state.batches
    last_layer = vae.decoder.conv_out.weight  # where the adaptive weight compares gradients
    model.train()
    if disc is not None:
        disc.train()
    try:
        while step < cfg.train.max_steps:
            batch = next(data)
            batches += 1
            gan = disc is not None and step >= cfg.loss.discriminator_start
            with accelerator.accumulate(*trained):
                # The autoencoder's step.
                x = batch["pixel_values"]
                x_hat, posterior = model(x)
                logits_fake = critic_logits(accelerator.unwrap_model(disc), x_hat) if gan else None
                with accelerator.autocast():
                    loss, parts = vae_loss(
                        x, x_hat, posterior, cfg.loss, lpips, logits_fake, last_layer, grad_scale(accelerator),
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # The discriminator's step, on the reconstructions the autoencoder made before its update.
                if gan:
                    d_loss, d_parts = discriminator_loss(disc(x), disc(x_hat.detach()), cfg.loss)
                    accelerator.backward(d_loss)
                    disc_optimizer.step()
                    disc_lr_scheduler.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    parts.update(d_parts)
            report.add(len(x), loss=loss, **parts)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(vae.parameters())
            step += 1
            state = TrainState(step, batches)  # a consistent point to checkpoint at
            if cadence.after_step(state):
                break
    except KeyboardInterrupt:
        cadence.interrupted(state)
        raise
    cadence.finish(state)

    # ---- 4. The final VAE (EMA weights when enabled): measured latent statistics, a diffusers folder.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with ema_weights(ema, vae):
            vae.eval()
            with rng_untouched(accelerator.device):
                torch.manual_seed(cfg.train.seed)  # the same factor if the end is run again
                batches_ = scale_batches(train_set, cfg.train.batch_size, cfg.train.seed)
                stats = measure_latent_stats(vae, batches_, cfg.scale_samples, per_channel=cfg.per_channel_stats)
            vae.register_to_config(**stats)
            tmp = staging_folder(run.final)
            vae.save_pretrained(str(tmp))
        replace_folder(tmp, run.final)
        report.write(state.step, **stats)
        accelerator.print(f"latent scaling_factor {stats['scaling_factor']:.5g}; final VAE in {run.final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.final


def check_stage_config(cfg) -> None:
    """Everything about a `VAEStageConfig` that can be wrong before data or models exist."""
    check_train_config(cfg.train)
    check_loss_config(cfg.loss)
    resolution = cfg.data.resolution
    factor = downsampling_factor(cfg.model.block_out_channels)  # checked before the VAE is built
    if resolution % factor:
        raise LdmError(
            f"data.resolution={resolution} is not divisible by the VAE's downsampling factor {factor} "
            f"(2 ** (len(model.block_out_channels) - 1)): use a multiple of {factor}"
        )
    if cfg.scale_samples < 1:
        raise LdmError(f"scale_samples must be at least 1, got {cfg.scale_samples}")
    if cfg.validation.every < 1:
        raise LdmError(f"validation.every must be at least 1, got {cfg.validation.every}")
    if cfg.validation.grid_images < 1:
        raise LdmError(f"validation.grid_images must be at least 1, got {cfg.validation.grid_images}")
    if cfg.data.num_validation > 0 and resolution < SSIM_WINDOW:
        raise LdmError(
            f"data.resolution={resolution} is smaller than SSIM's {SSIM_WINDOW}-pixel window: "
            f"use at least {SSIM_WINDOW}, or data.num_validation=0"
        )
    layers = cfg.loss.discriminator_layers
    if cfg.loss.discriminator_start is not None and logit_map_size(resolution, layers) < 1:
        raise LdmError(
            f"loss.discriminator_layers={layers} halve {resolution}-pixel images to nothing: "
            f"use fewer layers or data.resolution of at least {3 * 2 ** layers}"
        )


def discriminator_train_config(cfg):
    """The discriminator's optimizer settings: its own learning rate, LDM's betas, and a
    learning-rate schedule over its own steps (from loss.discriminator_start to the end)."""
    return replace(
        cfg.train,
        learning_rate=cfg.loss.discriminator_learning_rate or cfg.train.learning_rate,
        adam_beta1=DISCRIMINATOR_BETAS[0], adam_beta2=DISCRIMINATOR_BETAS[1],
        max_steps=max(cfg.train.max_steps - cfg.loss.discriminator_start, 1),
    )


def check_checkpoint_parts(checkpoint: Path, discriminator: bool, ema: bool) -> None:
    """A checkpoint holds a discriminator and an EMA exactly when this run has them."""
    for has, what, file, setting in (
        (discriminator, "a discriminator", "optimizer_1.bin", "loss.discriminator_start"),
        (ema, "an EMA", "custom_checkpoint_0.pkl", "ema.enabled"),
    ):
        saved = (Path(checkpoint) / file).is_file()
        if saved != has:
            raise LdmError(
                f"{checkpoint} was saved {'with' if saved else 'without'} {what} and this run has "
                f"{'one' if has else 'none'}: set {setting} as in that run (see its config.yaml)"
            )


def critic_logits(disc, x_hat: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits on reconstructions, for the autoencoder's loss: gradients reach
    x_hat but not the discriminator's weights (frozen during this forward only, as Lightning
    toggles optimizers; called unwrapped, so DDP expects no gradients from it)."""
    disc.requires_grad_(False)
    try:
        return disc(x_hat)
    finally:
        disc.requires_grad_(True)


def grad_scale(accelerator) -> float:
    """fp16's current loss scale (1 otherwise), for the adaptive weight's gradients."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0


def scale_batches(dataset, batch_size: int, seed: int):
    """Image batches in a seeded random order, for measuring latent statistics."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed))
    return (batch["pixel_values"] for batch in loader)


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean: the deterministic reconstruction."""
    return vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()).sample


def validation_metrics(vae, val_set, batch_size: int) -> dict:
    """Mean PSNR (dB), SSIM and mean absolute error (on [0, 1]) of deterministic reconstructions."""
    metrics = {"val_psnr": psnr, "val_ssim": ssim, "val_mae": mean_absolute_error}
    scores = {key: [] for key in metrics}
    for batch in DataLoader(val_set, batch_size):
        x = batch["pixel_values"].to(vae.device)
        x_hat = reconstruct(vae, x)
        for key, metric in metrics.items():
            scores[key].append(metric(x, x_hat))
    return {key: torch.cat(values).mean().item() for key, values in scores.items()}


def save_reconstructions(vae, dataset, images: int, path: Path) -> None:
    """A grid: the first `images` images of `dataset` on top, their reconstructions below."""
    x = torch.stack([dataset[i]["pixel_values"] for i in range(min(images, len(dataset)))])
    x_hat = reconstruct(vae, x).float().cpu().clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.cat([x, x_hat]) + 1) / 2, str(path), nrow=len(x), padding=1)

"""Stage 1: train the KL autoencoder, then measure its latent scaling factor.

Reads top to bottom: check the config, build data, model, discriminator and their
optimizers, then what this stage hands the shared loop (loop.py): its step, its
validation, and its final VAE folder (a diffusers AutoencoderKL, the EMA weights when
enabled, whose config carries the scaling factor measured on the training images).

Each optimizer step updates the autoencoder on reconstruction + LPIPS + KL (+ the
adversarial term once loss.discriminator_start is reached), then the PatchGAN
discriminator on the same images and their (detached) reconstructions, as Lightning
runs LDM's two optimizers.
"""

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, IterableDataset
from torchvision.utils import save_image

from ldm.autoencoder import build_vae, downsampling_factor, measure_latent_stats
from ldm.config import BucketConfig
from ldm.data import build_dataset
from ldm.data.bucket_batches import BucketBatchSampler
from ldm.data.buckets import with_bucket_step
from ldm.discriminator import NLayerDiscriminator, logit_map_size
from ldm.errors import LdmError
from ldm.finite import check_finite_number
from ldm.image_metrics import SSIM_WINDOW, mean_absolute_error, psnr, ssim
from ldm.lpips import LPIPS
from ldm.train.checkpoint import find_checkpoint
from ldm.train.ema import build_ema
from ldm.train.loader import EpochShuffle, item_buckets, train_loader
from ldm.train.loop import Step, Update, training_loop
from ldm.train.changes import DISCRIMINATOR, both_values
from ldm.train.optim import build_lr_scheduler, build_optimizer
from ldm.train.run import Run, check_train_config, make_accelerator, replace_folder, staging_folder
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
        check_checkpoint_parts(checkpoint, cfg.loss.discriminator_start is not None, cfg.ema.enabled, cfg)
    # data.buckets: bucket sides are multiples of the VAE's factor (or of the step set, checked against it).
    data = with_bucket_step(cfg.data, downsampling_factor(cfg.model.block_out_channels), "the VAE's downsampling factor")
    train_set = build_dataset(data, "train")
    val_set = build_dataset(cfg.data, "validation") if cfg.data.num_validation > 0 else None
    # The reconstruction grid: the held-out images, else square training images (bucketed ones differ in shape).
    grid_set = val_set if val_set is not None else train_set
    if grid_set is train_set and cfg.data.buckets.enabled:
        grid_set = build_dataset(replace(cfg.data, buckets=BucketConfig()), "train")
    trained = ("autoencoder", "discriminator") if cfg.loss.discriminator_start is not None else ("autoencoder",)
    accelerator = make_accelerator(cfg.train, run, "stage 1", trained)
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
        # Named, so that a resume with loss.discriminator_learning_rate changed finds its rate (changes.py).
        disc_optimizer = build_optimizer([{"params": list(disc.parameters()), "name": DISCRIMINATOR}], disc_train)
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
    model.train()
    if disc is not None:
        disc.train()
    last_layer = vae.decoder.conv_out.weight  # where the adaptive weight compares gradients

    # ---- 3. One step: the autoencoder's update, then (once the discriminator starts) the discriminator's.
    def train_step(batch, step: int) -> Step:
        gan = disc is not None and step >= cfg.loss.discriminator_start
        x = batch["pixel_values"]
        x_hat, posterior = model(x)
        logits_fake = critic_logits(accelerator.unwrap_model(disc), x_hat) if gan else None
        with accelerator.autocast():
            loss, parts = vae_loss(x, x_hat, posterior, cfg.loss, lpips, logits_fake, last_layer, grad_scale(accelerator))
        updates = [Update(loss, optimizer, lr_scheduler, clip=model.parameters())]
        if gan:  # on the reconstructions the autoencoder made before its update
            d_loss, d_parts = discriminator_loss(disc(x), disc(x_hat.detach()), cfg.loss)
            updates.append(Update(d_loss, disc_optimizer, disc_lr_scheduler))
            parts.update(d_parts)
        return Step(updates, len(x), dict(loss=loss, **parts))

    def validate(step: int) -> dict:
        """PSNR, SSIM and MAE of the validation split, and a reconstruction grid."""
        metrics = validation_metrics(vae, val_set, cfg.train.batch_size) if val_set is not None else {}
        save_reconstructions(vae, grid_set, cfg.validation.grid_images, run.samples / f"step-{step:06d}.png")
        return metrics

    def save(step: int) -> dict:
        """The final VAE: latent statistics measured on the training images, a diffusers folder."""
        torch.manual_seed(cfg.train.seed)  # the same factor if the end is run again (the loop restores the RNG)
        batches = scale_batches(train_set, cfg.train.batch_size, cfg.train.seed)
        stats = measure_latent_stats(vae, batches, cfg.scale_samples, per_channel=cfg.per_channel_stats)
        for key, value in stats.items():  # a NaN scaling factor would be accepted by stage 2 and sample black
            check_finite_number(value, f"the measured latent {key}", "the VAE's latents are not finite (training "
                                "diverged); nothing was saved: lower train.learning_rate and train again")
        vae.register_to_config(**stats)
        tmp = staging_folder(run.final)
        vae.save_pretrained(str(tmp))
        replace_folder(tmp, run.final)
        accelerator.print(f"latent scaling_factor {stats['scaling_factor']:.5g}; final VAE in {run.final}")
        return stats

    # ---- 4. The loop (loop.py): one optimizer step of each optimizer per `gradient_accumulation_steps`
    # batches, validation and the final VAE with the EMA weights when enabled.
    training_loop(
        accelerator, run, cfg, loader, checkpoint, resume, name="vae", unit="images", trained=trained, net=vae,
        ema=ema, lr_scheduler=lr_scheduler, step=train_step, validate=validate, save=save,
    )
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


def check_checkpoint_parts(checkpoint: Path, discriminator: bool, ema: bool, cfg=None) -> None:
    """A checkpoint holds a discriminator and an EMA exactly when this run has them."""
    for has, what, file, setting in (
        (discriminator, "a discriminator", "optimizer_1.bin", "loss.discriminator_start"),
        (ema, "an EMA", "ema.safetensors", "ema.enabled"),
    ):
        saved = (Path(checkpoint) / file).is_file()
        if saved != has:
            raise LdmError(
                f"{checkpoint} was saved {'with' if saved else 'without'} {what} and this run has "
                f"{'one' if has else 'none'}: set {setting} as in that run (see its config.yaml"
                f"{both_values(checkpoint, cfg, setting)})"
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
    """Image batches in a seeded random order, for measuring latent statistics (of one bucket each, with buckets)."""
    buckets = item_buckets(dataset)
    if isinstance(dataset, IterableDataset):  # webdataset shards: the stream's first batches, of one bucket each with buckets
        stream = dataset.for_process(0, 1, batch_size, seed)
        loader = stream if stream.bucketed else DataLoader(stream, batch_size=batch_size)
    elif buckets is not None:
        loader = DataLoader(dataset, batch_sampler=BucketBatchSampler(buckets, batch_size, seed))
    else:
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
    """A grid: the first `images` images of `dataset` (a map-style data set or a stream) on top, their reconstructions below."""
    if isinstance(dataset, IterableDataset):
        x = torch.stack([item["pixel_values"] for item in itertools.islice(iter(dataset), images)])
    else:
        x = torch.stack([dataset[i]["pixel_values"] for i in range(min(images, len(dataset)))])
    x_hat = reconstruct(vae, x).float().cpu().clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((torch.cat([x, x_hat]) + 1) / 2, str(path), nrow=len(x), padding=1)

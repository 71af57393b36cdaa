"""Stage 2: train the text-conditioned U-Net on the latents of the frozen stage-1 VAE.

Reads top to bottom: check the config, load the VAE, build text encoder, U-Net, EMA and
data (images, or the posteriors and hidden states of an ldm-cache folder), then what this
stage hands the shared loop (loop.py): its step (Rombach et al. 2022, eq. 2: the objective
of `ldm.objectives` on z = scaling_factor * E(x) and tau(y)), its validation grid, sampled
with the objective's scheduler, and its final model folder.
"""

from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from torchvision.utils import save_image

from ldm.autoencoder import load_vae, vae_scale_factor
from ldm.codec import LatentCodec
from ldm.config import save_config
from ldm.cache import check_cache
from ldm.data import build_dataset
from ldm.data.cached import Cached, Encoded, cached_dataset
from ldm.errors import LdmError
from ldm.objectives import build_objective, drop_captions
from ldm.speed import apply_speed_levers
from ldm.text_encoder import build_text_encoder, enable_gradient_checkpointing, hidden_size
from ldm.train.checkpoint import find_checkpoint
from ldm.train.ema import build_ema
from ldm.train.loader import train_loader
from ldm.train.loop import Step, Update, training_loop
from ldm.train.optim import build_lr_scheduler, build_optimizer
from ldm.train.run import Run, check_train_config, make_accelerator, replace_folder, staging_folder
from ldm.unet import build_unet

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train_unet(cfg, resume: Optional[str] = None) -> Path:
    """Train stage 2 from a `UNetStageConfig`; returns the final model folder (run/final).

    `resume`: None (start fresh), "auto" (the newest complete checkpoint, if any) or a
    checkpoint folder.
    """
    # ---- 1. Check what can be checked before anything slow.
    check_train_config(cfg.train)
    objective = build_objective(cfg.objective)  # the loss object; it also names the sampler
    vae = load_vae(cfg.vae_path)  # refuses a VAE without a measured scaling_factor
    factor = vae_scale_factor(vae)
    if cfg.data.resolution % factor:
        raise LdmError(
            f"data.resolution={cfg.data.resolution} is not divisible by the VAE's downsampling factor {factor} "
            f"({cfg.vae_path}): use a multiple of {factor}"
        )
    if cfg.validation.every < 1:
        raise LdmError(f"validation.every must be at least 1, got {cfg.validation.every}")
    latent_size = cfg.data.resolution // factor
    unet_factor = 2 ** (len(cfg.model.block_out_channels) - 1)
    if latent_size % unet_factor:
        raise LdmError(
            f"latents are {latent_size}x{latent_size} but the U-Net halves them {len(cfg.model.block_out_channels) - 1} "
            f"times: data.resolution must be a multiple of {factor * unet_factor}, or use fewer model.block_out_channels"
        )
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, resume)
    # data.cache: the latent distributions and text hidden states from ldm-cache, checked to fit this config.
    cache = check_cache(cfg, vae) if cfg.data.cache else None
    train_set = build_dataset(cfg.data, "train") if cache is None else cached_dataset(cfg, cache)
    accelerator = make_accelerator(cfg.train, run)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator.num_processes)

    # ---- 2. Models. The VAE (and by default the text encoder) are frozen; only the U-Net trains.
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():  # the main process writes the tokenizer files first
        tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, run.dir / "tokenizer")
    unet = build_unet(cfg.model, latent_size, vae.config.latent_channels, hidden_size(text_encoder))
    apply_speed_levers(unet, cfg.train.speed)  # train.speed: channels_last, torch.compile (off by default)
    ema = build_ema(unet, cfg.ema)
    train_text = cfg.text_encoder.trainable
    vae.requires_grad_(False).eval()
    codec = LatentCodec(vae)
    text_encoder.requires_grad_(train_text).train(train_text)
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            enable_gradient_checkpointing(text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    optimizer = build_optimizer(params, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]  # frozen models run in it; trained ones stay fp32
    if train_text:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
        place(text_encoder, accelerator.device, weight_dtype)
    place(vae, accelerator.device, weight_dtype)
    trained = (unet, text_encoder) if train_text else (unet,)
    # What a batch turns into: z0 and the text context, from the encoders or from the cache.
    inputs = Encoded(vae, text_encoder, tokenizer, weight_dtype, accelerator.device)
    if cache is not None:
        inputs = Cached(cfg.data.cache, cache, cfg.data.random_flip, inputs, accelerator.device)
    net = accelerator.unwrap_model(unet)  # what the EMA averages

    def pipeline():
        """The model as a sampling pipeline (shares the training modules' weights)."""
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline(
            vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer,
            unet=accelerator.unwrap_model(unet), scheduler=objective.sampling_scheduler(),
        )

    def denoiser(x, timestep, context):
        """The U-Net as the objective's net(x, timestep, context)."""
        return unet(x, timestep, context).sample

    # ---- 3. One step: the denoising loss of one batch, one update of the U-Net (and text encoder).
    def train_step(batch, step: int) -> Step:
        z0 = codec.scale(inputs.posterior_sample(batch))
        captions = drop_captions(batch["caption"], cfg.objective.caption_dropout)
        with torch.set_grad_enabled(train_text):
            context = inputs.context(batch, captions)
        loss = objective(denoiser, z0, context).mean()
        return Step([Update(loss, optimizer, lr_scheduler, clip=params)], len(z0), {"loss": loss})

    def validate(step: int) -> None:
        """A grid of the validation prompts, sampled with the EMA weights."""
        if cfg.validation.prompts:
            # autocast: under mixed precision the frozen VAE and text encoder hold fp16/bf16 weights.
            with accelerator.autocast():
                save_samples(pipeline(), cfg.validation, run.samples / f"step-{step:06d}.png")

    def save(step: int) -> None:
        """The final model folder: the pipeline with the EMA weights, in float32."""
        place(vae, accelerator.device, torch.float32)
        place(accelerator.unwrap_model(text_encoder), accelerator.device, torch.float32)
        tmp = staging_folder(run.final)
        pipeline().save_pretrained(str(tmp))
        save_config(cfg, tmp / "ldm_config.yaml")
        replace_folder(tmp, run.final)
        accelerator.print(f"final model in {run.final}")

    # ---- 4. The loop (loop.py): one optimizer step per `gradient_accumulation_steps` batches.
    training_loop(
        accelerator, run, cfg, loader, checkpoint, resume, name="unet", unit="samples", trained=trained, net=net,
        ema=ema, lr_scheduler=lr_scheduler, step=train_step, validate=validate, save=save,
    )
    return run.final


def place(model, device, dtype) -> None:
    """Move a model; cast only when the dtype changes (diffusers warns on every cast)."""
    model.to(device)
    if model.dtype != dtype:
        model.to(dtype=dtype)


@torch.no_grad()
def save_samples(pipe, cfg, path: Path) -> None:
    """Sample `cfg.prompts` (a `ValidationConfig`) into one grid image, one column per prompt."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        list(cfg.prompts), num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        generator=torch.Generator().manual_seed(cfg.seed), output_type="np",
    ).images
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.from_numpy(images).permute(0, 3, 1, 2), str(path), nrow=min(len(images), 8), padding=1)

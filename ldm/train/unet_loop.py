"""Stage 2: train the text-conditioned U-Net on the latents of the frozen stage-1 VAE.

Reads top to bottom: check the config, load the VAE, build text encoder, U-Net, EMA and
data (images, or the posteriors and hidden states of an ldm-cache folder), then what this
stage hands the shared loop (loop.py): its step (Rombach et al. 2022, eq. 2: the objective
of `ldm.objectives` on z = scaling_factor * E(x) and tau(y)), its held-out validation loss
(ldm/eval/validation_loss.py), its validation grid, sampled with the objective's
scheduler, and its final model folder.

Fine-tuning (`init_from`, see init_from.py): the U-Net (and by default the VAE and text
encoder) come from an existing model folder instead; the whole U-Net trains, or with
`lora.enabled` only low-rank adapters on the frozen U-Net (and optionally the text
encoder), saved as final/lora/ in diffusers' LoRA format (see ldm.lora).
"""

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from torchvision.utils import save_image

from ldm.autoencoder import load_vae, vae_scale_factor
from ldm.codec import LatentCodec
from ldm.config import save_config
from ldm.cache import check_cache
from ldm.data import build_dataset
from ldm.data.buckets import with_bucket_step
from ldm.data.cached import Cached, Encoded, cached_dataset
from ldm.errors import LdmError
from ldm.eval.during_training import build_training_eval
from ldm.eval.validation_loss import build_validation_loss, check_validation_loss_config, eval_mode, text_to_image_inputs
from ldm.lora import add_lora, check_lora_config, save_lora
from ldm.model_parts import check_components
from ldm.objectives import build_objective, drop_captions
from ldm.speed import apply_speed_levers
from ldm.text_encoder import build_text_encoder, enable_gradient_checkpointing, hidden_size
from ldm.train.checkpoint import find_checkpoint
from ldm.train.fsdp import check_even_shares, fsdp_parts, is_fsdp
from ldm.train.ema import build_ema, trained_parameters
from ldm.train.init_from import check_init_folder, folder_objective, folder_unet_config, load_init_pipeline, reconcile_objective
from ldm.train.loader import train_loader
from ldm.train.loop import Step, Update, training_loop
from ldm.train.optim import build_lr_scheduler, build_optimizer
from ldm.train.run import Run, check_train_config, make_accelerator, replace_folder, staging_folder
from ldm.unet import build_unet, set_attention_backend

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train_unet(cfg, resume: Optional[str] = None) -> Path:
    """Train stage 2 from a `UNetStageConfig`; returns the final model folder (run/final).

    `resume`: None (start fresh), "auto" (the newest complete checkpoint, if any) or a
    checkpoint folder.
    """
    # ---- 1. Check what can be checked before anything slow.
    check_train_config(cfg.train)
    finetune, lora = cfg.init_from is not None, cfg.lora.enabled
    if lora:
        check_lora_config(cfg.lora)
        if not finetune:
            raise LdmError("lora.enabled=true adapts an existing model: set init_from=MODEL_FOLDER (ours or a Stable Diffusion folder)")
        if cfg.text_encoder.trainable:
            raise LdmError("text_encoder.trainable=true trains the whole text encoder but lora.enabled=true trains adapters only: "
                           "use lora.text_encoder=true for text-encoder adapters, or lora.enabled=false for a full fine-tune")
    if finetune:
        check_init_folder(cfg)
        # The objective the folder's U-Net was trained with; config.yaml then records the one trained here.
        cfg = replace(cfg, objective=reconcile_objective(cfg.objective, folder_objective(cfg.init_from), cfg.init_from))
    objective = build_objective(cfg.objective)  # the loss object; it also names the sampler
    vae_path = Path(cfg.init_from) / "vae" if finetune and cfg.init_vae else cfg.vae_path
    vae = load_vae(vae_path)  # refuses a VAE without a scaling_factor (a Stable Diffusion VAE has 0.18215)
    factor = vae_scale_factor(vae)
    if cfg.data.resolution % factor:
        raise LdmError(
            f"data.resolution={cfg.data.resolution} is not divisible by the VAE's downsampling factor {factor} "
            f"({vae_path}): use a multiple of {factor}"
        )
    if cfg.validation.every < 1:
        raise LdmError(f"validation.every must be at least 1, got {cfg.validation.every}")
    check_validation_loss_config(cfg.validation)
    latent_size = cfg.data.resolution // factor
    levels = len(folder_unet_config(cfg.init_from)["block_out_channels"] if finetune else cfg.model.block_out_channels)
    unet_factor = 2 ** (levels - 1)
    if latent_size % unet_factor:
        raise LdmError(
            f"latents are {latent_size}x{latent_size} but the U-Net halves them {levels - 1} "
            f"times: data.resolution must be a multiple of {factor * unet_factor}"
            + ("" if finetune else ", or use fewer model.block_out_channels")
        )
    # data.buckets: bucket sides are multiples of the VAE's factor times the U-Net's (or of the step set).
    cfg = replace(cfg, data=with_bucket_step(cfg.data, factor * unet_factor, "the VAE's times the U-Net's downsampling factor"))
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, resume)
    # data.cache: the latent distributions and text hidden states from ldm-cache, checked to fit this config.
    cache = check_cache(cfg, vae) if cfg.data.cache else None
    train_set = build_dataset(cfg.data, "train") if cache is None else cached_dataset(cfg, cache)
    train_text = cfg.text_encoder.trainable or (lora and cfg.lora.text_encoder)
    accelerator = make_accelerator(cfg.train, run, "stage 2", ("U-Net", "text encoder") if train_text else ("U-Net",), lora)
    # validation.eval_every: its weight files are loaded (and checked) now, before training.
    training_eval = build_training_eval(cfg.validation, cfg.data, accelerator.device)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator.num_processes)

    # ---- 2. Models. The VAE (and by default the text encoder) are frozen; only the U-Net trains.
    set_seed(cfg.train.seed)
    scheduler = None  # the sampler saved with the model: the objective's, or the init folder's
    if finetune and cfg.init_text_encoder:
        tokenizer = text_encoder = None
    else:
        with accelerator.main_process_first():  # the main process writes the tokenizer files first
            tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, run.dir / "tokenizer")
    if finetune:
        given = {"vae": vae} if text_encoder is None else {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        base = load_init_pipeline(cfg.init_from, **given)  # checks that the parts fit each other
        tokenizer, text_encoder, unet, scheduler = base.tokenizer, base.text_encoder, base.unet, base.scheduler
        set_attention_backend(unet, cfg.model.attention_backend)
        check_components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    else:
        unet = build_unet(cfg.model, latent_size, vae.config.latent_channels, hidden_size(text_encoder))
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]  # frozen models run in it; trained ones stay fp32
    vae.requires_grad_(False).eval()
    codec = LatentCodec(vae)
    text_encoder.requires_grad_(cfg.text_encoder.trainable)
    if lora:
        # As diffusers' LoRA example: the frozen base in the mixed-precision dtype, the adapters in float32.
        check_lora_config(cfg.lora, text_encoder)
        place(unet, accelerator.device, weight_dtype)
        add_lora(unet, cfg.lora, cfg.lora.target_modules, "U-Net")
        if cfg.lora.text_encoder:
            place(text_encoder, accelerator.device, weight_dtype)
            add_lora(text_encoder, cfg.lora, cfg.lora.text_encoder_target_modules, "text encoder")
        cast_training_params([unet, text_encoder], torch.float32)
    apply_speed_levers(unet, cfg.train.speed)  # train.speed: channels_last, torch.compile (off by default)
    text_encoder.train(train_text)
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            enable_gradient_checkpointing(text_encoder)
    params = trained_parameters(unet.parameters()) + (trained_parameters(text_encoder.parameters()) if train_text else [])
    optimizer = build_optimizer(params, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    full = fsdp_parts(accelerator, unet)  # FSDP: the main process's whole copy, for validation and the final save
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
    # Built after prepare: under FSDP it averages each process's shards (fsdp.py); elsewhere the same weights.
    ema = build_ema(net, cfg.ema)  # over what trains: the whole U-Net, or its adapters
    # The prepared parameters (FSDP2 replaces them with sharded ones): what clipping sees.
    params = trained_parameters(net.parameters()) + (
        trained_parameters(accelerator.unwrap_model(text_encoder).parameters()) if train_text else [])

    def pipeline():
        """The model as a sampling pipeline (shares the training modules' weights)."""
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline(
            vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer,
            unet=full.module if full is not None else net, scheduler=scheduler or objective.sampling_scheduler(),
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

    # ---- 4. Validation: the held-out loss on every process (raw and EMA weights), a grid on the main one.
    val_loss = build_validation_loss(cfg.validation, cfg.data, objective, accelerator.print)
    if val_loss is not None and is_fsdp(accelerator):
        check_even_shares(len(val_loss.dataset), accelerator.num_processes, val_loss.batch_size,
                          "the held-out validation loss (data.num_validation)")
    held_out = text_to_image_inputs(codec, accelerator.unwrap_model(text_encoder), tokenizer, net, accelerator.device)

    def evaluate(step: int, ema: bool) -> dict:
        """The validation loss with the weights `net` holds (the loop swaps the EMA weights in for ema=True)."""
        with accelerator.autocast(), eval_mode(text_encoder):
            return val_loss(held_out, ema=ema)

    def validate(step: int) -> Optional[dict]:
        """A grid of the validation prompts, and when due the eval_* scores, sampled with the EMA weights."""
        # autocast: under mixed precision the frozen VAE and text encoder hold fp16/bf16 weights.
        if cfg.validation.prompts:
            with accelerator.autocast():
                save_samples(pipeline(), cfg.validation, run.samples / f"step-{step:06d}.png")
        if training_eval is not None and training_eval.due(step, step >= cfg.train.max_steps):
            with accelerator.autocast(), eval_mode(text_encoder):
                return training_eval.evaluate(pipeline())
        return None

    def save(step: int) -> None:
        """The final model folder: the pipeline with the EMA weights, in float32; with LoRA, final/lora/ only."""
        tmp = staging_folder(run.final)
        if lora:
            text = accelerator.unwrap_model(text_encoder) if cfg.lora.text_encoder else None
            save_lora(tmp / "lora", net, text)
        else:
            place(vae, accelerator.device, torch.float32)
            place(accelerator.unwrap_model(text_encoder), accelerator.device, torch.float32)
            pipeline().save_pretrained(str(tmp))
        save_config(cfg, tmp / "ldm_config.yaml")
        replace_folder(tmp, run.final)
        accelerator.print(f"final model in {run.final}")

    # ---- 5. The loop (loop.py): one optimizer step per `gradient_accumulation_steps` batches.
    training_loop(
        accelerator, run, cfg, loader, checkpoint, resume, name="unet", unit="samples", trained=trained, net=net,
        ema=ema, lr_scheduler=lr_scheduler, step=train_step, validate=validate, save=save,
        evaluate=evaluate if val_loss is not None else None, full=full,
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

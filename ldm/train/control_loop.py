"""The control stage: train a ControlNet or a T2I-Adapter on top of a frozen base model.

Reads top to bottom: check the config, load the base model folder (ours or a diffusers
Stable Diffusion folder) and its objective, build data with control images, the control
model (a ControlNet copied from the base U-Net, or a T2I-Adapter), its EMA and optimizer,
then the shared training loop (ldm.train.loop) with this stage's step: the base objective's
loss through the frozen U-Net steered by the control model; the same loss on the held-out
split at fixed noise levels is its validation loss (ldm/eval/validation_loss.py). The final folder
(runs/NAME/final) is what `ControlNetModel.from_pretrained` / `T2IAdapter.from_pretrained`
load as it is.

The base U-Net, VAE and text encoder are frozen and run in the mixed-precision dtype; the
control model trains in float32 under autocast (an fp16 ControlNet overflows: the known
NaN trap of diffusers' ControlNet example).
"""

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from torchvision.utils import save_image

from ldm.autoencoder import vae_scale_factor
from ldm.codec import LatentCodec
from ldm.config import BucketConfig, ObjectiveConfig, save_config
from ldm.control.denoiser import ControlledDenoiser
from ldm.control.dropout import drop_conditioning
from ldm.control.models import build_control_model, check_control_config
from ldm.data import build_dataset
from ldm.data.buckets import with_bucket_step
from ldm.errors import LdmError
from ldm.eval.validation_loss import build_validation_loss, check_validation_loss_config
from ldm.objectives import build_objective, drop_captions
from ldm.text_encoder import encode_text, tokenize
from ldm.train.checkpoint import find_checkpoint
from ldm.train.ema import build_ema
from ldm.train.fsdp import check_even_shares, fsdp_parts, is_fsdp
from ldm.train.loader import train_loader
from ldm.train.loop import Step, Update, training_loop
from ldm.train.optim import build_lr_scheduler, build_optimizer
from ldm.train.run import Run, check_train_config, make_accelerator, replace_folder, staging_folder

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The scheduler-config keys a DDPM-family objective is read back from (a plain Stable Diffusion folder).
SCHEDULER_KEYS = {
    "num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule", "beta_start": "beta_start",
    "beta_end": "beta_end", "prediction_type": "prediction_type", "rescale_betas_zero_snr": "rescale_zero_terminal_snr",
}


def train_control(cfg, resume: Optional[str] = None) -> Path:
    """Train a control model from a `ControlStageConfig`; returns its final folder (run/final)."""
    # ---- 1. Check what can be checked before anything slow.
    check_train_config(cfg.train)
    check_control_config(cfg.control)
    if not cfg.data.conditioning:
        raise LdmError("the control stage trains on control images: set data.conditioning=true")
    if cfg.validation.every < 1:
        raise LdmError(f"validation.every must be at least 1, got {cfg.validation.every}")
    check_validation_loss_config(cfg.validation)
    if cfg.data.cache:
        # An ldm-cache folder is made for a stage-2 config (VAE path, text encoder settings), not a base model folder.
        raise LdmError("data.cache is not read by the control stage yet: set data.cache=null (it encodes images as it trains)")
    base = load_base(cfg.base_model)
    objective_cfg = base_objective(cfg.base_model, base.scheduler, cfg.control)
    objective = build_objective(objective_cfg)
    factor = vae_scale_factor(base.vae)
    size = base.default_size[0]
    if cfg.data.resolution != size:
        raise LdmError(
            f"data.resolution={cfg.data.resolution} but the base model {cfg.base_model} makes {size}x{size} images: "
            f"set data.resolution={size}"
        )
    # data.buckets: bucket sides are multiples of the base's VAE factor times its U-Net's (or of the step set).
    unet_factor = 2 ** (len(base.unet.config.block_out_channels) - 1)
    cfg = replace(cfg, data=with_bucket_step(cfg.data, factor * unet_factor, "the base model's VAE times U-Net factor"))
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, resume)
    train_set = build_dataset(cfg.data, "train")
    # The grids stack their examples: held-out ones, else square training ones (bucketed ones differ in shape).
    val_set = build_dataset(cfg.data, "validation") if cfg.data.num_validation > 0 else train_set
    if val_set is train_set and cfg.data.buckets.enabled:
        val_set = build_dataset(replace(cfg.data, buckets=BucketConfig()), "train")
    kind = "ControlNet" if cfg.control.kind == "controlnet" else "T2I-Adapter"
    accelerator = make_accelerator(cfg.train, run, "the control stage", (kind,))
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, accelerator.num_processes)

    # ---- 2. Models: the base frozen in the mixed-precision dtype, the control model trained in float32.
    set_seed(cfg.train.seed)
    vae, text_encoder, tokenizer, unet = base.vae, base.text_encoder, base.tokenizer, base.unet
    control = build_control_model(cfg.control, unet, factor)
    check_fits_base(control, unet, factor, cfg)
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    control.train()
    optimizer = build_optimizer(control.parameters(), cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    full = fsdp_parts(accelerator, control)  # FSDP: the main process's whole copy, for validation and the final save
    control, optimizer, loader, lr_scheduler = accelerator.prepare(control, optimizer, loader, lr_scheduler)
    net = accelerator.unwrap_model(control)
    ema = build_ema(net, cfg.ema)  # after prepare: under FSDP over each process's shards (fsdp.py)
    codec = LatentCodec(vae)

    def step(batch, step_: int) -> Step:
        """The base objective's loss with the control model steering the frozen U-Net."""
        z0 = codec.encode_latents(batch["pixel_values"])
        captions = drop_captions(batch["caption"], objective_cfg.caption_dropout)
        cond = drop_conditioning(batch["conditioning_pixel_values"], cfg.control.conditioning_dropout)
        with torch.no_grad():
            context = encode_text(text_encoder, tokenize(tokenizer, captions, accelerator.device))
        denoiser = ControlledDenoiser(unet, control, cond, weight_dtype)
        loss = objective(denoiser, z0.float(), context.float()).mean()
        return Step([Update(loss, optimizer, lr_scheduler, clip=control.parameters())], len(z0), {"loss": loss})

    val_loss = build_validation_loss(cfg.validation, cfg.data, objective, accelerator.print)
    if val_loss is not None and is_fsdp(accelerator):
        check_even_shares(len(val_loss.dataset), accelerator.num_processes, val_loss.batch_size,
                          "the held-out validation loss (data.num_validation)")

    def held_out(batch):
        """A held-out batch as the objective's (net, z0, context): posterior mean, real captions, real controls."""
        z0 = codec.scale(codec.encode(batch["pixel_values"])[0]).float()
        with torch.no_grad():
            context = encode_text(text_encoder, tokenize(tokenizer, batch["caption"], accelerator.device))
        cond = batch["conditioning_pixel_values"].to(accelerator.device)
        return ControlledDenoiser(unet, net, cond, weight_dtype), z0, context.float()

    def evaluate(step_: int, ema: bool) -> dict:
        """The validation loss with the weights the control model holds (EMA ones for ema=True)."""
        with accelerator.autocast():
            return val_loss(held_out, ema=ema)

    def whole():
        """The control model with whole weights: under FSDP the main process's gathered copy."""
        return full.module if full is not None else net

    def pipeline():
        """The base pipeline steered by the control model being trained."""
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=objective.sampling_scheduler(), **{control_argument(net): whole()},
        )

    def validate(step_: int):
        """A grid of held-out (control | sample) pairs, with the EMA weights."""
        with accelerator.autocast():
            save_control_grid(pipeline(), val_set, cfg, run.samples / f"step-{step_:06d}.png")

    def save(step_: int):
        """The control model folder (EMA weights when enabled), loadable by diffusers as it is."""
        tmp = staging_folder(run.final)
        whole().save_pretrained(str(tmp))
        save_config(cfg, tmp / "ldm_control.yaml")
        replace_folder(tmp, run.final)
        accelerator.print(f"final {cfg.control.kind} in {run.final}")

    training_loop(
        accelerator, run, cfg, loader, checkpoint, resume, name="control", unit="samples",
        trained=[control], net=net, ema=ema, lr_scheduler=lr_scheduler, step=step, validate=validate, save=save,
        evaluate=evaluate if val_loss is not None else None, full=full,
    )
    return run.final


def load_base(folder):
    """The frozen base model folder as a pipeline (parts checked to fit, nothing downloaded)."""
    from ldm.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained(str(folder))


def base_objective(folder, scheduler, control_cfg) -> ObjectiveConfig:
    """The objective the base was trained with, with the control stage's timestep sampling and caption dropout.

    Our model folders record it in ldm_config.yaml; a diffusers Stable Diffusion folder
    is DDPM-family, read back from its scheduler's config.
    """
    recorded = Path(folder) / "ldm_config.yaml"
    if recorded.is_file() and "objective" in (saved := OmegaConf.load(recorded)):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ObjectiveConfig), saved.objective))
    else:
        known = {ours: scheduler.config[theirs] for theirs, ours in SCHEDULER_KEYS.items() if theirs in scheduler.config}
        cfg = ObjectiveConfig(kind="ddpm", **known)
    sampling = control_cfg.timestep_sampling
    if sampling is None and control_cfg.kind == "t2i_adapter" and cfg.kind == "ddpm":
        sampling = "cubic"  # Mou et al. 2023, sec. 3.4: more steps early in sampling, where structure forms
    return replace(cfg, timestep_sampling=sampling or cfg.timestep_sampling, caption_dropout=control_cfg.caption_dropout)


def control_argument(model) -> str:
    """The pipeline argument a control model goes in: "controlnet" or "adapter"."""
    from diffusers import ControlNetModel

    return "controlnet" if isinstance(model, ControlNetModel) else "adapter"


def check_fits_base(control, unet, vae_factor: int, cfg) -> None:
    """A control model continued from a folder must have been made for this base (one line, before training)."""
    from ldm.pipeline_control import check_control_fits

    check_control_fits(unet, vae_factor, **{control_argument(control): control})


@torch.no_grad()
def save_control_grid(pipe, dataset, cfg, path: Path) -> None:
    """Rows of (control | sample) for the first `validation.num_controls` examples of `dataset`."""
    n = min(cfg.validation.num_controls, len(dataset))
    items = [dataset[i] for i in range(n)]
    controls = torch.stack([item["conditioning_pixel_values"] for item in items])
    scale_key = "controlnet_conditioning_scale" if "controlnet" in pipe.components and pipe.controlnet is not None \
        else "adapter_conditioning_scale"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [item["caption"] for item in items], image=controls, num_inference_steps=cfg.validation.num_inference_steps,
        guidance_scale=cfg.validation.guidance_scale, generator=torch.Generator().manual_seed(cfg.validation.seed),
        output_type="pt", **{scale_key: cfg.control.conditioning_scale},
    ).images
    pairs = torch.stack([controls.cpu().float(), images.cpu().float()], dim=1).flatten(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(pairs, str(path), nrow=2 * min(n, 4), padding=1)

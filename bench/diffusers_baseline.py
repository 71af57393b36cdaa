"""The yardstick: the training loop of diffusers' examples/text_to_image/train_text_to_image.py.

Bench only. It re-implements, statement for statement, what that script does per step,
on the same components as our trainer (the same U-Net, VAE, text encoder, data and batch):

- the VAE encoder and the text encoder run on every step (no latent cache);
  `latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * scaling_factor`,
  `encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]`;
- tokenization happens in the data pipeline (the script tokenizes in its dataset transform);
- noise, `timesteps = torch.randint(0, num_train_timesteps, (bsz,))`, `noise_scheduler.add_noise`;
- `F.mse_loss(model_pred.float(), target.float())`, or its Min-SNR weighting (`compute_snr`)
  when `snr_gamma` is set;
- `avg_loss = accelerator.gather(loss.repeat(batch)).mean(); train_loss += avg_loss.item()`
  (a host sync every step, as there);
- `accelerator.backward`, `clip_grad_norm_(unet.parameters(), max_grad_norm)` when gradients
  sync, `optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()`;
- `torch.optim.AdamW` with torch's default implementation (`--use_8bit_adam` off);
- EMA as it does it: `EMAModel(unet.parameters(), model_cls=UNet2DConditionModel,
  model_config=unet.config)` (default foreach=False, no warm-up, decay 0.9999) and
  `ema_unet.step(unet.parameters())` after each optimizer step;
- frozen VAE and text encoder cast to the mixed-precision dtype, U-Net kept in float32 under
  Accelerate's autocast.
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DiffusersTextToImageLoop:
    """One instance per run: `step(batch)` is one iteration of the script's inner loop.

    `batch`: {"pixel_values": (B, 3, H, W) in [-1, 1], "input_ids": (B, L)}.
    `cfg`: our `UNetStageConfig` (its train.* learning-rate, AdamW and clipping settings and
    objective.* schedule are the script's arguments of the same meaning).
    """

    def __init__(self, accelerator, vae, text_encoder, unet, cfg, use_ema: bool = True, ema_decay: float = 0.9999):
        self.accelerator = accelerator
        objective = cfg.objective
        # noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=objective.num_train_timesteps, beta_schedule=objective.beta_schedule,
            beta_start=objective.beta_start, beta_end=objective.beta_end, prediction_type=objective.prediction_type,
        )
        self.snr_gamma = objective.min_snr_gamma
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        unet.train()
        self.ema_unet = None
        if use_ema:
            self.ema_unet = EMAModel(unet.parameters(), decay=ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
        train = cfg.train
        if train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            train.lr_scheduler, optimizer=optimizer, num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=train.max_steps * accelerator.num_processes,
        )
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        self.weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
        text_encoder.to(accelerator.device, dtype=self.weight_dtype)
        vae.to(accelerator.device, dtype=self.weight_dtype)
        if self.ema_unet is not None:
            self.ema_unet.to(accelerator.device)
        self.vae, self.text_encoder = vae, text_encoder
        self.batch_size = train.batch_size
        self.max_grad_norm = train.max_grad_norm
        self.train_loss = 0.0

    def step(self, batch) -> float:
        accelerator, unet = self.accelerator, self.unet
        with accelerator.accumulate(unet):
            # Convert images to latent space
            latents = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            # Sample noise that we'll add to the latents
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            # Sample a random timestep for each image
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            timesteps = timesteps.long()
            # Add noise to the latents according to the noise magnitude at each timestep (forward diffusion)
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            # Get the text embedding for conditioning
            encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
            if self.noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            # Predict the noise residual and compute loss
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            if self.snr_gamma is None:
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            else:
                snr = compute_snr(self.noise_scheduler, timesteps)
                mse_loss_weights = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
                if self.noise_scheduler.config.prediction_type == "epsilon":
                    mse_loss_weights = mse_loss_weights / snr
                elif self.noise_scheduler.config.prediction_type == "v_prediction":
                    mse_loss_weights = mse_loss_weights / (snr + 1)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                loss = loss.mean()
            # Gather the losses across all processes for logging (if we use distributed training).
            avg_loss = accelerator.gather(loss.repeat(self.batch_size)).mean()
            self.train_loss += avg_loss.item() / accelerator.gradient_accumulation_steps
            # Backpropagate
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        # Checks if the accelerator has performed an optimization step behind the scenes
        if accelerator.sync_gradients:
            if self.ema_unet is not None:
                self.ema_unet.step(unet.parameters())
            loss_value, self.train_loss = self.train_loss, 0.0
            return loss_value
        return float("nan")

"""Fine-tuning: stage 2 started from an existing model folder (ours, or a diffusers Stable Diffusion folder).

The folder fixes what its U-Net was trained for: the U-Net's layout (so `model.*` is not
read), the latent space (its VAE's scaling factor, unless `init_vae=false` swaps in the VAE
of `vae_path`) and the objective's model-defining settings: kind, prediction target and
noise schedule. A network trained to predict epsilon and then trained on v-targets
unlearns everything it knew, so those settings follow the folder: a setting left at its
default takes the folder's value, and one set to something else is refused in one line.
Settings that only shape training (caption dropout, Min-SNR, timestep sampling, offset
noise) stay the config's.

Our folders record their objective in ldm_config.yaml; a Stable Diffusion folder is
DDPM-family, read back from its scheduler's config.
"""

import json
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from ldm.config import ObjectiveConfig
from ldm.errors import LdmError
from ldm.model_parts import check_folder_parts_agree, check_model_folder

# The scheduler-config keys a DDPM-family objective is read back from (as the control stage reads its base).
SCHEDULER_KEYS = {
    "num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule", "beta_start": "beta_start",
    "beta_end": "beta_end", "prediction_type": "prediction_type", "rescale_betas_zero_snr": "rescale_zero_terminal_snr",
}
# What defines the model an objective trains (the rest only shapes training), by kind.
MODEL_KEYS = {
    "ddpm": ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "rescale_zero_terminal_snr"),
    "edm": ("sigma_data", "sigma_min", "sigma_max", "rho"),
    "flow": ("num_train_timesteps",),
}


def check_init_folder(cfg) -> None:
    """The folder has its parts and they fit (configs only, before any weights load); what it cannot serve is refused."""
    given = () if cfg.init_vae else ("vae",)
    given += () if cfg.init_text_encoder else ("text_encoder", "tokenizer")
    check_model_folder(cfg.init_from, given)
    check_folder_parts_agree(cfg.init_from, given)
    if cfg.data.cache:
        # An ldm-cache folder holds latents and text states of vae_path and text_encoder.*, not of the folder's parts.
        raise LdmError("data.cache is not read when fine-tuning from init_from yet: set data.cache=null "
                       "(the run encodes images with the folder's VAE as it trains)")


def folder_unet_config(folder) -> dict:
    return json.loads((Path(folder) / "unet" / "config.json").read_text())


def folder_objective(folder) -> ObjectiveConfig:
    """The objective the folder's U-Net was trained with."""
    folder = Path(folder)
    recorded = folder / "ldm_config.yaml"
    saved = OmegaConf.load(recorded) if recorded.is_file() else None
    if OmegaConf.is_dict(saved) and "objective" in saved:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ObjectiveConfig), saved.objective))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    name = scheduler.get("_class_name", "?")
    if "FlowMatch" in name or name.startswith("EDM"):
        raise LdmError(f"{folder} has a {name} but no ldm_config.yaml to read its objective from: "
                       "fine-tuning reads a DDPM-family folder's objective from its scheduler only")
    return ObjectiveConfig(kind="ddpm", **{ours: scheduler[theirs] for theirs, ours in SCHEDULER_KEYS.items() if theirs in scheduler})


def reconcile_objective(mine: ObjectiveConfig, theirs: ObjectiveConfig, folder) -> ObjectiveConfig:
    """`mine` with the folder's model-defining settings; a setting of mine that contradicts them is an error."""
    defaults = ObjectiveConfig()
    updates = {}
    for key in ("kind",) + MODEL_KEYS[theirs.kind]:
        want, have = getattr(mine, key), getattr(theirs, key)
        if want == have:
            continue
        if want != getattr(defaults, key):
            raise LdmError(
                f"objective.{key}={want} contradicts init_from={folder}, whose U-Net was trained with {key}={have}: "
                f"drop the override (or set objective.{key}={have})"
            )
        updates[key] = have
    return replace(mine, **updates)


def load_init_pipeline(folder, **given):
    """The folder as a pipeline (parts checked to fit each other and `given`'s); nothing downloaded."""
    import diffusers
    import transformers

    from ldm.pipeline import LatentDiffusionPipeline

    # No loading bars: a one-line error after loading (a LoRA target that matches nothing) stays one line.
    bars = diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        return LatentDiffusionPipeline.from_pretrained(str(folder), **given)
    finally:
        if bars[0]:
            diffusers.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()

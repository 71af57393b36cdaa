"""Old home of the stage-2 objective's functions, kept importable: see `ldm.objectives`."""

from ldm.codec import scale_latents  # noqa: F401
from ldm.objectives import (  # noqa: F401
    add_noise, build_noise_scheduler, build_objective, drop_captions, min_snr_weights, sample_noise, sample_timesteps,
    snr, training_target,
)
from ldm.objectives.ddpm import BETA_SCHEDULES, PREDICTION_TYPES  # noqa: F401

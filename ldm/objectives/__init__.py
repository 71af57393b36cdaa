"""The stage-2 training objectives, each a small loss object built from `ObjectiveConfig`.

    objective = build_objective(cfg.objective)
    loss = objective(net, z0, context).mean()   # net(x, timestep, context) -> tensor
    scheduler = objective.sampling_scheduler()  # saved with the model folder

kind "ddpm" (`DDPMObjective`: epsilon / v / x_0, Min-SNR, zero terminal SNR, uniform or
cubic timesteps), "edm" (`EDMObjective`, Karras et al. 2022) and "flow"
(`FlowMatchingObjective`, rectified flow). edm2's `EDM2Loss` is the model.
"""

from ldm.errors import LdmError
from ldm.objectives.base import Objective
from ldm.objectives.captions import drop_captions
from ldm.objectives.ddpm import (
    DDPMObjective, add_noise, build_noise_scheduler, ddim_scheduler, min_snr_weights, sample_timesteps,
    sample_timesteps_cubic, snr, training_target,
)
from ldm.objectives.edm import EDMObjective
from ldm.objectives.flow import FlowMatchingObjective
from ldm.objectives.noise import sample_noise

OBJECTIVES = {"ddpm": DDPMObjective, "edm": EDMObjective, "flow": FlowMatchingObjective}
KINDS = tuple(OBJECTIVES)


def check_common(cfg) -> None:
    """What every kind reads, and the DDPM-only options a non-DDPM kind must leave at their defaults."""
    if cfg.kind not in OBJECTIVES:
        raise LdmError(f"objective.kind must be one of {', '.join(KINDS)}, got '{cfg.kind}'")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        raise LdmError(f"objective.caption_dropout is a probability, got {cfg.caption_dropout}")
    if cfg.num_train_timesteps < 1:
        raise LdmError(f"objective.num_train_timesteps must be at least 1, got {cfg.num_train_timesteps}")
    if cfg.offset_noise < 0:
        raise LdmError(f"objective.offset_noise must be 0 (off) or more (0.1 is usual), got {cfg.offset_noise}")
    if cfg.kind == "ddpm":
        return
    ddpm_only = {
        "prediction_type": (cfg.prediction_type, "epsilon"),
        "min_snr_gamma": (cfg.min_snr_gamma, None),
        "rescale_zero_terminal_snr": (cfg.rescale_zero_terminal_snr, False),
    }
    for key, (value, default) in ddpm_only.items():
        if value != default:
            raise LdmError(
                f"objective.{key}={value} applies to objective.kind=ddpm only, not '{cfg.kind}' "
                f"(which sets its own target and weighting): set objective.{key}={'null' if default is None else default}"
            )


def build_objective(cfg) -> Objective:
    """The loss object of an `ObjectiveConfig` (`kind`: ddpm | edm | flow); checks every value first."""
    check_common(cfg)
    return OBJECTIVES[cfg.kind](cfg)


__all__ = [
    "KINDS", "OBJECTIVES", "DDPMObjective", "EDMObjective", "FlowMatchingObjective", "Objective", "add_noise",
    "build_noise_scheduler", "build_objective", "ddim_scheduler", "drop_captions", "min_snr_weights",
    "sample_noise", "sample_timesteps", "sample_timesteps_cubic", "snr", "training_target",
]

"""AdamW and its learning-rate schedule, from a `TrainConfig`."""

import torch
from diffusers.optimization import SchedulerType, get_scheduler

from ldm.errors import LdmError

# piecewise_constant needs step rules that TrainConfig does not carry.
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
# train.speed.adamw -> torch.optim.AdamW's implementation flags ("default": torch picks).
ADAMW_IMPLS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def check_optim_config(cfg) -> None:
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise LdmError(f"train.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{cfg.lr_scheduler}'")
    if cfg.learning_rate <= 0:
        raise LdmError(f"train.learning_rate must be positive, got {cfg.learning_rate}")
    if cfg.lr_warmup_steps < 0:
        raise LdmError(f"train.lr_warmup_steps must be 0 or more, got {cfg.lr_warmup_steps}")
    if cfg.speed.adamw not in ADAMW_IMPLS:
        raise LdmError(f"train.speed.adamw must be one of {', '.join(ADAMW_IMPLS)}, got '{cfg.speed.adamw}'")


def build_optimizer(params, cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        **ADAMW_IMPLS[cfg.speed.adamw],
    )


def build_lr_scheduler(optimizer, cfg, num_processes: int = 1):
    """diffusers' named schedule over `cfg.max_steps` optimizer steps.

    Accelerate's wrapped scheduler steps once per process at every optimizer step
    (so that a schedule written for one process stays right on N), hence the counts
    are scaled by `num_processes`, as diffusers' training scripts do.
    """
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=cfg.max_steps * num_processes,
    )

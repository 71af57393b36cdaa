"""Resuming with changed settings: the resumed config against the checkpoint's copy of its run's.

Each checkpoint holds the config that wrote it (config.yaml). On resume the two are compared
key by key (dotted keys), and each changed key is one of:

- harmless: it changes when or how long the run goes on, where it writes, what it
  validates, never what a step computes (max_steps, cadence, validation, workers, paths);
- deliberate: it changes the optimisation from here on and is allowed only when named with
  `--allow-changed KEY` (train.allow_changed); the change is applied for real (a new
  learning rate reaches the optimizer and its schedule) and recorded in changes.jsonl;
- breaking: anything else (model shape, data.resolution, objective.*, the text encoder,
  vae_path, seed, ...): refused in one line listing the keys and both values, since the
  checkpoint's weights, optimizer state or data order do not fit the new settings.
"""

import json
from dataclasses import is_dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from omegaconf import OmegaConf

from ldm.errors import LdmError

CONFIG = "config.yaml"
DISCRIMINATOR = "discriminator"  # the name of the discriminator's param group (vae_loop.py)
CHANGES = "changes.jsonl"
HARMLESS = (
    "train.max_steps", "train.max_minutes", "train.log_every", "train.checkpoint_every",
    "train.checkpoints_total_limit", "train.output_dir", "train.process_group_timeout_minutes",
    "train.collective_timeout_minutes",
    "train.max_nonfinite_steps", "train.allow_changed", "data.num_workers", "validation.", "scale_samples",
    "per_channel_stats",
    "train.speed.", "ema.foreach",  # speed levers: the same results (tests/test_speed.py), only faster
)
DELIBERATE = (
    "train.learning_rate", "train.batch_size", "train.gradient_accumulation_steps", "train.max_grad_norm",
    "train.lr_warmup_steps", "train.adam_weight_decay", "loss.discriminator_learning_rate",
)


def flat(cfg) -> Dict[str, object]:
    """A config (dataclass or OmegaConf) as {dotted key: value}."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg) if not OmegaConf.is_config(cfg) else cfg, resolve=True)
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix[:-1]] = node

    walk("", container)
    return out


def kind_of(key: str) -> str:
    if any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS):
        return "harmless"
    return "deliberate" if key in DELIBERATE else "breaking"


def changed_keys(saved: Dict[str, object], now: Dict[str, object]) -> List[Tuple[str, object, object]]:
    return [(k, saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(saved) | set(now))
            if saved.get(k, "<absent>") != now.get(k, "<absent>")]


def defaults_of(cfg) -> Dict[str, object]:
    """The flat defaults of `cfg`'s dataclass (a stage config); {} when it has required fields or is no dataclass."""
    try:
        return flat(type(cfg)()) if is_dataclass(cfg) else {}
    except TypeError:  # fields without defaults
        return {}


def both_values(checkpoint: Path, cfg, key: str) -> str:
    """"; KEY: saved -> now" for a message about one changed key ("" when the checkpoint holds no config)."""
    saved_file = Path(checkpoint) / CONFIG
    if cfg is None or not saved_file.is_file():
        return ""
    return f"; {key}: {flat(OmegaConf.load(saved_file)).get(key, '<absent>')!r} -> {flat(cfg).get(key, '<absent>')!r}"


def check_changes(checkpoint: Path, cfg, allowed) -> List[Tuple[str, object, object]]:
    """The deliberate changes to apply, after refusing breaking ones and deliberate ones not allowed (one line)."""
    saved_file = Path(checkpoint) / CONFIG
    if not saved_file.is_file():
        return []  # written before checkpoints carried their config: nothing to compare with
    # A key added to the config since the checkpoint was written (e.g. data.buckets) counts as its default there.
    saved = {**defaults_of(cfg), **flat(OmegaConf.load(saved_file))}
    changes = [c for c in changed_keys(saved, flat(cfg)) if kind_of(c[0]) != "harmless"]
    show = lambda cs: "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in cs)  # noqa: E731
    breaking = [c for c in changes if kind_of(c[0]) == "breaking"]
    if breaking:
        raise LdmError(
            f"resuming {checkpoint} with settings that do not fit its run: {show(breaking)}; set them as in "
            f"{saved_file}, or start a new run in another train.output_dir"
        )
    refused = [c for c in changes if c[0] not in set(allowed or ())]
    if refused:
        flags = " ".join(f"--allow-changed {k}" for k, _, _ in refused)
        raise LdmError(
            f"resuming {checkpoint} with changed settings: {show(refused)}; set them as in {saved_file}, "
            f"or change them on purpose with {flags}"
        )
    return changes


def apply_changes(accelerator, changes, step: int, run_dir: Path, cfg=None) -> None:
    """Make the allowed changes real and record them in run_dir/changes.jsonl.

    The checkpoint restored the old settings into the optimizers (learning rate, weight decay:
    param_groups) and the schedules (base rates), so these are rewritten here:
    - a new learning rate: each schedule whose base rate was the old value gets the new one;
      loss.discriminator_learning_rate: the discriminator's (its param group is named
      DISCRIMINATOR), set to the rate it now follows (train.learning_rate when unset);
    - a new weight decay: every param group that had the old one;
    - then every optimizer gets the rate its schedule gives at this step, so a new warm-up
      length (read by the schedule from the config) counts from this step on too.
    Batch size, accumulation and clipping take effect from the config itself (read as the run goes on).
    """
    if not changes:
        return
    keys = {key: (old, new) for key, old, new in changes}
    disc_rate = None
    if "loss.discriminator_learning_rate" in keys and cfg is not None:
        disc_rate = cfg.loss.discriminator_learning_rate or cfg.train.learning_rate
    for wrapped in accelerator._schedulers:
        scheduler = getattr(wrapped, "scheduler", wrapped)
        groups = scheduler.optimizer.param_groups
        if "train.learning_rate" in keys:
            old, new = keys["train.learning_rate"]
            scheduler.base_lrs = [new if base == old else base for base in scheduler.base_lrs]
        if disc_rate is not None:
            scheduler.base_lrs = [disc_rate if g.get("name") == DISCRIMINATOR else base
                                  for g, base in zip(groups, scheduler.base_lrs)]
        lambdas = getattr(scheduler, "lr_lambdas", None)
        for i, group in enumerate(groups):
            group["initial_lr"] = scheduler.base_lrs[i]
            factor = lambdas[i](scheduler.last_epoch) if lambdas else 1.0
            group["lr"] = scheduler.base_lrs[i] * factor
        scheduler._last_lr = [g["lr"] for g in groups]
    if "train.adam_weight_decay" in keys:
        old, new = keys["train.adam_weight_decay"]
        for optimizer in accelerator._optimizers:
            for group in optimizer.param_groups:
                if group["weight_decay"] == old:
                    group["weight_decay"] = new
    if accelerator.is_main_process and changes:
        with open(Path(run_dir) / CHANGES, "a") as f:
            for key, old, new in changes:
                f.write(json.dumps({"step": step, "key": key, "from": old, "to": new}) + "\n")
        for key, old, new in changes:
            accelerator.print(f"resumed with {key} changed on purpose: {old!r} -> {new!r} (recorded in {CHANGES})")

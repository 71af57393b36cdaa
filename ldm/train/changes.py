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


def apply_changes(accelerator, changes, step: int, run_dir: Path) -> None:
    """Make the allowed changes real and record them in run_dir/changes.jsonl.

    A new learning rate: the checkpoint restored the old base rates into every schedule; each
    schedule whose base rate was the old value gets the new one, and its optimizer the rate the
    schedule gives at this step. The other deliberate keys take effect from the config itself
    (batch size, accumulation, clipping, warm-up length are read as the run goes on).
    """
    for key, old, new in changes:
        if key == "train.learning_rate":
            for wrapped in accelerator._schedulers:
                scheduler = getattr(wrapped, "scheduler", wrapped)
                scheduler.base_lrs = [new if base == old else base for base in scheduler.base_lrs]
                lambdas = getattr(scheduler, "lr_lambdas", None)
                for i, group in enumerate(scheduler.optimizer.param_groups):
                    if group.get("initial_lr") == old:
                        group["initial_lr"] = new
                    factor = lambdas[i](scheduler.last_epoch) if lambdas else 1.0
                    group["lr"] = scheduler.base_lrs[i] * factor
                scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    if accelerator.is_main_process and changes:
        with open(Path(run_dir) / CHANGES, "a") as f:
            for key, old, new in changes:
                f.write(json.dumps({"step": step, "key": key, "from": old, "to": new}) + "\n")
        for key, old, new in changes:
            accelerator.print(f"resumed with {key} changed on purpose: {old!r} -> {new!r} (recorded in {CHANGES})")

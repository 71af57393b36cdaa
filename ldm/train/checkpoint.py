"""Checkpoints: checkpoints/step-000500/ = accelerator.save_state + EMA + checkpoint.json + manifest.json.

`accelerator.save_state` holds the models, optimizer, LR scheduler, grad scaler and every
process's RNG states. The EMA is saved here, as ema.safetensors (its shadow weights) +
ema.json (its counters), and not registered with accelerate: accelerate would pickle it
(custom_checkpoint_0.pkl) and unpickle it with weights_only=False, which lets a crafted
checkpoint run code. checkpoint.json adds where the loop stands: the optimizer step and
how many batches each process has drawn, from which a resume finds its place in the data
order (see loader.py). manifest.json (manifest.py), written last, lists every file with
its size and sha256: a checkpoint is checked as a whole before anything is restored.
Under FSDP2 save_state writes the model and optimizer as sharded folders (one file per
process); the EMA's shards are gathered and ema.safetensors holds whole tensors as
under DDP, each process taking its shard back on load (fsdp.py).

Only complete checkpoints count: a checkpoint is written into a hidden temporary
folder, flushed to disk and renamed once everything is there, so a crash mid-save
leaves no half-written step-NNNNNN/ for `--resume auto` to trip on.
"""

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ldm.config import save_config
from ldm.errors import LdmError
from ldm.finite import check_finite_ema, check_finite_module
from ldm.train.changes import CONFIG, apply_changes, check_changes
from ldm.train.disk import check_free_space, writing
from ldm.train.fsdp import gathered_shadow, is_fsdp, like
from ldm.train.manifest import MANIFEST, problem_of, write_manifest
from ldm.train.run import replace_folder, staging_folder

INFO = "checkpoint.json"
EMA_WEIGHTS, EMA_INFO = "ema.safetensors", "ema.json"
NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    batches: int = 0  # batches drawn by each process (counts gradient-accumulation micro-batches)


def complete_checkpoints(folder) -> List[Path]:
    """The complete checkpoints in `folder`, oldest first.

    A step-N folder gets its name only once written whole (the rename of save_checkpoint), so one
    holding a manifest but no checkpoint.json was damaged afterwards: it is listed, for `verified`
    to refuse it by name, rather than skipped for an older checkpoint without a word.
    """
    folder = Path(folder)
    found = [p for p in folder.glob("step-*") if NAME.match(p.name) and ((p / INFO).is_file() or (p / MANIFEST).is_file())
             ] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def find_checkpoint(folder, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None, "auto" (the newest complete one, if any) or a path.

    Starting afresh (None) in a folder that already holds checkpoints is refused: the new
    run's checkpoints would mix with the old ones, and nothing finished is ever overwritten.
    """
    if resume is None:
        found = complete_checkpoints(folder)
        if found:
            raise LdmError(
                f"{folder} already holds checkpoints (newest {found[-1].name}): continue that run with "
                "--resume auto, or set train.output_dir to a new folder"
            )
        return None
    if resume == "auto":
        found = complete_checkpoints(folder)
        return verified(found[-1]) if found else None
    path = Path(resume)
    if not (path / INFO).is_file():
        known = ", ".join(p.name for p in complete_checkpoints(folder)) or "none"
        raise LdmError(f"--resume {resume}: not a complete checkpoint folder (no {INFO}); complete ones in {folder}: {known}")
    return verified(path)


_VERIFIED = set()  # checkpoint folders found whole by this process


def verified(path: Path) -> Path:
    """`path` once checked as a whole (manifest.py); otherwise a one-line refusal naming the bad file
    and the newest earlier checkpoint that is whole."""
    if path.resolve() in _VERIFIED:  # find_checkpoint checked it already in this process: hash it once
        return path
    problem = problem_of(path)
    if problem is None:
        _VERIFIED.add(path.resolve())
        return path
    name, what = problem
    step = int(NAME.match(path.name).group(1)) if NAME.match(path.name) else None
    earlier = [p for p in complete_checkpoints(path.parent) if step is None or int(NAME.match(p.name).group(1)) < step]
    whole = next((p for p in reversed(earlier) if problem_of(p) is None), None)
    offer = (f"resume from the previous complete checkpoint with --resume {whole}" if whole is not None
             else "no earlier complete checkpoint: start afresh with a new train.output_dir")
    raise LdmError(f"checkpoint {path} cannot be restored: {name} is {what}; nothing was restored; {offer}")


def save_ema(ema, folder: Path, shadow=None) -> None:
    """The EMA as ema.safetensors (shadow weights, in parameter order) + ema.json (its counters).

    `shadow`: the whole shadow weights when they were gathered from FSDP shards (fsdp.gathered_shadow).
    """
    state = ema.state_dict()
    own = state.pop("shadow_params")
    shadow = own if shadow is None else shadow
    save_file({f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(shadow)}, str(folder / EMA_WEIGHTS))
    (folder / EMA_INFO).write_text(json.dumps({**state, "num_shadow_params": len(shadow)}, indent=2))


def load_ema(ema, folder: Path) -> None:
    """Restore what `save_ema` wrote into `ema`, checking it is this EMA's (one line otherwise)."""
    folder = Path(folder)
    counters = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
    for name in (EMA_WEIGHTS, EMA_INFO):
        if not (folder / name).is_file():
            raise LdmError(f"checkpoint {folder} has no {name} but this run has an EMA: set ema.enabled as in that run")
    info = json.loads((folder / EMA_INFO).read_text())
    missing = [k for k in counters if k not in info]
    if missing:
        raise LdmError(f"{folder / EMA_INFO} lacks the EMA's {', '.join(missing)}: not an EMA state this project wrote")
    tensors = load_file(str(folder / EMA_WEIGHTS))
    expected = [f"shadow.{i}" for i in range(len(ema.shadow_params))]
    if sorted(tensors) != sorted(expected):
        raise LdmError(
            f"{folder / EMA_WEIGHTS} holds {len(tensors)} tensors, not the EMA's {len(expected)} shadow.N weights: "
            "not this model's EMA (model settings changed?)"
        )
    for key, current in zip(expected, ema.shadow_params):
        if tensors[key].shape != current.shape:
            raise LdmError(
                f"{folder / EMA_WEIGHTS}: {key} has shape {tuple(tensors[key].shape)}, this model's {tuple(current.shape)}: "
                "the model settings differ from that run's"
            )
    state = {k: info[k] for k in counters}
    # Under FSDP each process keeps its own shard of each whole tensor saved (fsdp.py).
    state["shadow_params"] = [like(tensors[k], current) for k, current in zip(expected, ema.shadow_params)]
    try:
        ema.load_state_dict(state)
    except ValueError as e:
        raise LdmError(f"{folder / EMA_INFO}: {e}") from None


def save_checkpoint(accelerator, folder, state: TrainState, batches_per_epoch: int, total_limit: Optional[int],
                    ema=None, cfg=None) -> Path:
    """Save the full training state as folder/step-NNNNNN/ and keep the newest `total_limit`."""
    folder = Path(folder)
    final = folder / f"step-{state.step:06d}"
    found = complete_checkpoints(folder)
    check_free_space(folder, found[-1] if found else None)  # every process alike, before anything is written
    tmp = staging_folder(final) if accelerator.is_main_process else final.with_name(f".tmp-{final.name}")
    accelerator.wait_for_everyone()
    try:
        with writing("checkpoint", tmp):
            accelerator.save_state(str(tmp))
        # Every process joins: FSDP shards are gathered onto the main process, which writes them.
        shadow = gathered_shadow(ema, keep=accelerator.is_main_process) if is_fsdp(accelerator) else None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with writing("checkpoint", tmp):
                finish_checkpoint(tmp, final, state, batches_per_epoch, ema, cfg, shadow)
    except LdmError:
        shutil.rmtree(tmp, ignore_errors=True)  # give back the space a half-written checkpoint took
        raise
    if accelerator.is_main_process:
        if total_limit is not None:
            for stale in complete_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def finish_checkpoint(tmp: Path, final: Path, state: TrainState, batches_per_epoch: int, ema, cfg,
                      shadow=None) -> None:
    """The main process's part: EMA, config, checkpoint.json, the manifest last, then the rename that publishes it."""
    if ema is not None:
        save_ema(ema, tmp, shadow)
    if cfg is not None:  # what a resume is compared with (changes.py)
        save_config(cfg, tmp / CONFIG)
    (tmp / INFO).write_text(json.dumps({**asdict(state), "batches_per_epoch": batches_per_epoch}, indent=2))
    write_manifest(tmp)  # last: lists (and flushes) everything above
    replace_folder(tmp, final)  # the same step may be saved again, e.g. when a finished run is resumed


class Checkpointer:
    """One run's checkpoints, remembering the last step saved.

    The loop saves every N steps, again when it ends and when it is interrupted; knowing
    the last saved step keeps those from writing the same step twice.
    """

    def __init__(self, accelerator, folder, batches_per_epoch: int, total_limit: Optional[int],
                 saved_step: Optional[int] = None, ema=None, cfg=None):
        self.accelerator, self.folder, self.ema, self.cfg = accelerator, folder, ema, cfg
        self.batches_per_epoch, self.total_limit = batches_per_epoch, total_limit
        self.saved_step = saved_step  # a resumed run starts with its checkpoint's step saved

    def save(self, state: TrainState) -> Path:
        fix = "not saved; the earlier checkpoints are kept: lower train.learning_rate and resume with --resume auto"
        for model in self.accelerator._models:  # every process holds the same weights: all refuse together
            check_finite_module(model, f"checkpoint at step {state.step}: the model", fix)
        check_finite_ema(self.ema, f"checkpoint at step {state.step}", fix)
        path = save_checkpoint(self.accelerator, self.folder, state, self.batches_per_epoch, self.total_limit, self.ema,
                               self.cfg)
        self.saved_step = state.step
        return path

    def save_if_new(self, state: TrainState) -> Optional[Path]:
        """Save unless `state.step` is the step saved last; None when nothing was written."""
        return None if state.step == self.saved_step else self.save(state)


def load_checkpoint(accelerator, path, batches_per_epoch: int, ema=None) -> TrainState:
    """Restore everything `save_checkpoint` saved; returns where the loop stood."""
    path = verified(Path(path))  # the whole checkpoint, before anything is restored
    rng = Path(path) / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():  # accelerate would skip it silently, and the run would no longer be the same
        raise LdmError(f"checkpoint {path} has no {rng.name} for process {accelerator.process_index}: it was saved by "
                       "fewer processes; resume with the number of processes that run had")
    if ema is not None:
        load_ema(ema, path)
    elif (Path(path) / EMA_WEIGHTS).is_file():
        raise LdmError(f"checkpoint {path} holds an EMA ({EMA_WEIGHTS}) and this run has none: set ema.enabled as in that run")
    accelerator.load_state(str(path))
    info = json.loads((Path(path) / INFO).read_text())
    if info.get("batches_per_epoch", batches_per_epoch) != batches_per_epoch:
        # Data set, batch size or process count changed: the run goes on, but not in the same order.
        accelerator.print(
            f"warning: {path} was saved with {info['batches_per_epoch']} batches per epoch, this run has "
            f"{batches_per_epoch}: the data order will differ from the original run's"
        )
    return TrainState(step=int(info["step"]), batches=int(info["batches"]))


def remove_leftovers(folder) -> None:
    """Remove the .tmp-step-N / .old-step-N folders a crash mid-save left behind (outside checkpoints_total_limit)."""
    folder = Path(folder)
    for stale in list(folder.glob(".tmp-step-*")) + list(folder.glob(".old-step-*")) if folder.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


def start_or_resume(accelerator, checkpoint: Optional[Path], resume: Optional[str], folder, batches_per_epoch: int,
                    total_limit: Optional[int], ema=None, cfg=None) -> Tuple[TrainState, Checkpointer]:
    """Where the loop starts (step 0, or `checkpoint` restored) and the run's Checkpointer.

    Call it after every model, optimizer and scheduler is prepared: `accelerator.load_state`
    restores into them (and `load_ema` into `ema`).
    """
    state = TrainState()
    if accelerator.is_main_process:
        remove_leftovers(folder)
    if checkpoint is not None:
        changes = check_changes(checkpoint, cfg, cfg.train.allow_changed) if cfg is not None else []
        state = load_checkpoint(accelerator, checkpoint, batches_per_epoch, ema)
        apply_changes(accelerator, changes, state.step, Path(folder).parent, cfg)
        if ema is not None:
            ema.to(accelerator.device)  # the EMA's weights are loaded onto the CPU
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume is not None:
        accelerator.print(f"no checkpoint in {folder} yet: starting afresh")
    saved_step = state.step if checkpoint is not None else None  # a resumed run starts with its step saved
    return state, Checkpointer(accelerator, folder, batches_per_epoch, total_limit, saved_step=saved_step, ema=ema,
                                      cfg=cfg)

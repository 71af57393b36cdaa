"""Checkpoints: checkpoints/step-000500/ = accelerator.save_state + checkpoint.json.

`accelerator.save_state` holds the models, optimizer, LR scheduler, grad scaler, every
process's RNG states and registered objects (the EMA). checkpoint.json adds where the
loop stands: the optimizer step and how many batches each process has drawn, from
which a resume finds its place in the data order (see loader.py).

Only complete checkpoints count: a checkpoint is written into a hidden temporary
folder and renamed once everything is on disk, so a crash mid-save leaves no
half-written step-NNNNNN/ for `--resume auto` to trip on.
"""

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ldm.errors import LdmError
from ldm.train.run import replace_folder, staging_folder

INFO = "checkpoint.json"
NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    batches: int = 0  # batches drawn by each process (counts gradient-accumulation micro-batches)


def complete_checkpoints(folder) -> List[Path]:
    """The complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    found = [p for p in folder.glob("step-*") if NAME.match(p.name) and (p / INFO).is_file()] if folder.is_dir() else []
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
        return found[-1] if found else None
    path = Path(resume)
    if not (path / INFO).is_file():
        known = ", ".join(p.name for p in complete_checkpoints(folder)) or "none"
        raise LdmError(f"--resume {resume}: not a complete checkpoint folder (no {INFO}); complete ones in {folder}: {known}")
    return path


def save_checkpoint(accelerator, folder, state: TrainState, batches_per_epoch: int, total_limit: Optional[int]) -> Path:
    """Save the full training state as folder/step-NNNNNN/ and keep the newest `total_limit`."""
    folder = Path(folder)
    final = folder / f"step-{state.step:06d}"
    tmp = staging_folder(final) if accelerator.is_main_process else final.with_name(f".tmp-{final.name}")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / INFO).write_text(json.dumps({**asdict(state), "batches_per_epoch": batches_per_epoch}, indent=2))
        replace_folder(tmp, final)  # the same step may be saved again, e.g. when a finished run is resumed
        if total_limit is not None:
            for stale in complete_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


class Checkpointer:
    """One run's checkpoints, remembering the last step saved.

    The loop saves every N steps, again when it ends and when it is interrupted; knowing
    the last saved step keeps those from writing the same step twice.
    """

    def __init__(self, accelerator, folder, batches_per_epoch: int, total_limit: Optional[int],
                 saved_step: Optional[int] = None):
        self.accelerator, self.folder = accelerator, folder
        self.batches_per_epoch, self.total_limit = batches_per_epoch, total_limit
        self.saved_step = saved_step  # a resumed run starts with its checkpoint's step saved

    def save(self, state: TrainState) -> Path:
        path = save_checkpoint(self.accelerator, self.folder, state, self.batches_per_epoch, self.total_limit)
        self.saved_step = state.step
        return path

    def save_if_new(self, state: TrainState) -> Optional[Path]:
        """Save unless `state.step` is the step saved last; None when nothing was written."""
        return None if state.step == self.saved_step else self.save(state)


def load_checkpoint(accelerator, path, batches_per_epoch: int) -> TrainState:
    """Restore everything `save_checkpoint` saved; returns where the loop stood."""
    accelerator.load_state(str(path))
    info = json.loads((Path(path) / INFO).read_text())
    if info.get("batches_per_epoch", batches_per_epoch) != batches_per_epoch:
        # Data set, batch size or process count changed: the run goes on, but not in the same order.
        accelerator.print(
            f"warning: {path} was saved with {info['batches_per_epoch']} batches per epoch, this run has "
            f"{batches_per_epoch}: the data order will differ from the original run's"
        )
    return TrainState(step=int(info["step"]), batches=int(info["batches"]))


def start_or_resume(accelerator, checkpoint: Optional[Path], resume: Optional[str], folder, batches_per_epoch: int,
                    total_limit: Optional[int], ema=None) -> Tuple[TrainState, Checkpointer]:
    """Where the loop starts (step 0, or `checkpoint` restored) and the run's Checkpointer.

    Call it after every model, optimizer, scheduler and the EMA are prepared/registered:
    `accelerator.load_state` restores into them.
    """
    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, batches_per_epoch)
        if ema is not None:
            ema.to(accelerator.device)  # accelerate loads registered objects onto the CPU
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    elif resume is not None:
        accelerator.print(f"no checkpoint in {folder} yet: starting afresh")
    saved_step = state.step if checkpoint is not None else None  # a resumed run starts with its step saved
    return state, Checkpointer(accelerator, folder, batches_per_epoch, total_limit, saved_step=saved_step)

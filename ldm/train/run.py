"""The run folder, the Accelerator, and what a loop reports while it runs.

runs/NAME/
  config.yaml      the resolved config that produced the run
  checkpoints/     step-NNNNNN/ (see checkpoint.py)
  final/           the trained model folder
  samples/         image grids along the way
  logs/            TensorBoard, through Accelerate's tracker
  metrics.jsonl    one JSON record every log_every steps (and validation records)

Only the main process writes; tqdm shows on the local main process only.
"""

import json
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from ldm.config import save_config
from ldm.errors import LdmError
from ldm.readable import reading
from ldm.train.disk import writing
from ldm.train.distributed import check_distributed_type, fill_micro_batch  # noqa: F401 - re-exported
from ldm.train.fsdp import fsdp_on_cpu
from ldm.train.optim import check_optim_config

MIXED_PRECISIONS = ("no", "fp16", "bf16")


def check_train_config(cfg) -> None:
    """Reject a bad `TrainConfig` before anything slow happens."""
    for key in ("batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every", "log_every"):
        if getattr(cfg, key) < 1:
            raise LdmError(f"train.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.mixed_precision not in MIXED_PRECISIONS:
        raise LdmError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got '{cfg.mixed_precision}'")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise LdmError(f"train.checkpoints_total_limit must be at least 1 (or null: keep all), got {cfg.checkpoints_total_limit}")
    if cfg.process_group_timeout_minutes <= 0:
        raise LdmError(f"train.process_group_timeout_minutes must be positive, got {cfg.process_group_timeout_minutes}")
    if cfg.collective_timeout_minutes <= 0:
        raise LdmError(f"train.collective_timeout_minutes must be positive, got {cfg.collective_timeout_minutes}")
    if cfg.max_nonfinite_steps < 1:
        raise LdmError(f"train.max_nonfinite_steps must be at least 1, got {cfg.max_nonfinite_steps}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise LdmError(f"train.max_minutes must be positive (or null: no limit), got {cfg.max_minutes}")
    check_optim_config(cfg)


class Run:
    """Paths of one run folder."""

    def __init__(self, output_dir):
        self.dir = Path(output_dir)
        self.config = self.dir / "config.yaml"
        self.checkpoints = self.dir / "checkpoints"
        self.final = self.dir / "final"
        self.samples = self.dir / "samples"
        self.logs = self.dir / "logs"
        self.metrics = self.dir / "metrics.jsonl"

    def start(self, accelerator: Accelerator, config, tracker: str) -> None:
        """Make the folders, write config.yaml, start TensorBoard."""
        if accelerator.is_main_process:
            with writing("the run folder", self.dir):  # read-only or full: one line, not a traceback
                for folder in (self.checkpoints, self.samples, self.logs):
                    folder.mkdir(parents=True, exist_ok=True)
                save_config(config, self.config)
        accelerator.wait_for_everyone()
        accelerator.init_trackers(tracker)


def make_accelerator(cfg, run: Run, stage: str = "stage 2", trained: Sequence[str] = ("U-Net",),
                     lora: bool = False) -> Accelerator:
    """Accelerate does the plumbing only: devices, DDP/FSDP2/DeepSpeed, mixed precision, accumulation.

    `stage` and `trained` (the names of the models it trains), `lora`: what distributed.py
    decides from, before anything is built.
    """
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run.logs)),
        # Other ranks wait while the main process samples validation grids and writes
        # checkpoints; the default 10-30 min collective timeout can kill a big job there.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.process_group_timeout_minutes))],
    )
    fsdp_on_cpu(accelerator)  # Accelerate leaves FSDP off on CPUs (fsdp.py)
    check_distributed_type(accelerator, stage, trained, lora)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_micro_batch(accelerator.state.deepspeed_plugin, cfg.batch_size)
    return accelerator


class Reporter:
    """Progress bar, metrics.jsonl and TensorBoard: loss means over each log interval
    and throughput in `unit`/s over training time only (see `paused`)."""

    def __init__(self, accelerator: Accelerator, run: Run, max_steps: int, start_step: int, unit: str):
        self.accelerator, self.path, self.unit = accelerator, run.metrics, unit
        if accelerator.is_main_process and self.path.exists():
            # A resumed run redoes the steps after its checkpoint: drop their old records.
            with reading(self.path, "the run's JSON-lines log", "move it away to resume (it is only a log)"):
                records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in records if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.bar = tqdm(
            total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
            disable=not accelerator.is_local_main_process,
        )
        self.start = time.perf_counter()
        self.nonfinite = 0  # steps skipped as non-finite in this process's run, in every later record
        self._reset()

    def _reset(self):
        self.sums, self.adds, self.items = {}, 0, 0
        self.clock, self.pause = time.perf_counter(), 0.0

    def add(self, items: int, **scalars: torch.Tensor) -> None:
        """Count one (micro-)batch of `items` examples on this process and its losses."""
        for key, value in scalars.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.adds += 1
        self.items += items

    def step(self) -> None:
        """One optimizer step done."""
        self.bar.update(1)

    def skipped_nonfinite(self, step: int) -> None:
        """Step `step` was skipped for a non-finite loss or gradient norm: counted, and said above the bar."""
        self.nonfinite += 1
        if self.accelerator.is_main_process:
            tqdm.write(f"warning: step {step} skipped: non-finite (NaN or inf) loss or gradient norm "
                       f"({self.nonfinite} so far)", file=sys.stdout)

    def log(self, step: int, **extra) -> dict:
        """Write the means since the last log (over all processes) and the throughput."""
        keys = sorted(self.sums)
        means = {}
        if keys:
            values = torch.stack([self.sums[k] for k in keys]) / max(self.adds, 1)
            means = dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))
        seconds = max(time.perf_counter() - self.clock - self.pause, 1e-9)
        means[f"{self.unit}_per_s"] = self.items * self.accelerator.num_processes / seconds
        record = {**means, **extra}
        if self.nonfinite:
            record["nonfinite_steps"] = self.nonfinite
        self.write(step, **record)
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", f"{self.unit}_per_s") if k in record})
        self._reset()
        return record

    def write(self, step: int, **record) -> None:
        """Append one record to metrics.jsonl and TensorBoard (main process)."""
        record = {"step": step, **record, "time_s": round(time.perf_counter() - self.start, 3)}
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    @contextmanager
    def paused(self):
        """Time spent in the block (checkpoints, validation) does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - t0

    def close(self) -> None:
        self.bar.close()


class TimeBudget:
    """train.max_minutes: every process stops at the same step once it is spent."""

    def __init__(self, minutes: Optional[float]):
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes

    def spent(self, accelerator: Accelerator) -> bool:
        if self.deadline is None:
            return False
        if time.monotonic() > self.deadline:
            accelerator.set_trigger()
        return accelerator.check_trigger()


@contextmanager
def rng_untouched(device):
    """Run sampling/validation without moving the training RNG, so that a run that
    validates at some step stays bit-identical to one resumed past that step."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def staging_folder(final: Path) -> Path:
    """An empty hidden sibling of `final` to write into before `replace_folder`."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash mid-write
    return tmp


def replace_folder(tmp: Path, final: Path) -> Path:
    """Move the finished `tmp` folder to `final`, replacing an older one only once `tmp` is complete."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final

"""The collective watchdog: a rank stuck in one phase of a step ends its process, naming the phase.

With several processes, a rank that stalls (a hung data loader, a dead peer, a driver
hang) leaves every other rank waiting inside a collective (DDP's gradient all-reduce, the
stop-request all-reduce) until the process-group timeout, an hour by default
(train.process_group_timeout_minutes, kept long because the other ranks legitimately wait
that long while the main process samples validation grids). The main thread cannot notice
anything while it waits, so a daemon thread does: the loop marks what this rank is doing
("step 3: forward/backward", "step 3: stop-request all-reduce", ...), and when one phase
lasts longer than its allowance the thread writes one line naming the rank, the phase and
how long, dumps every thread's stack (faulthandler) to stderr, and ends the process with
exit status 124 (`os._exit`: the main thread is blocked in the collective and would never
see an exception). The launcher (torchrun, accelerate launch) then sees a rank fail and
tears the job down, instead of an hour of silence.

Allowances:
- the phases of a training step (loading the batch, forward/backward and the optimizer
  step, the stop-request all-reduce): train.collective_timeout_minutes (default 10);
- the cadence's work between steps (log, checkpoint, evaluation and validation, in which
  the other ranks wait for the main process) and the checkpoint of a stop:
  train.process_group_timeout_minutes, the wait the process group itself allows there,
  so the watchdog names the phase where the collective would otherwise time out silently
  (gloo) or with a bare timeout error.

One process has no collective to stall in: the watchdog watches only runs of several.
"""

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional, Tuple

EXIT_STATUS = 124  # as coreutils' timeout: the process was ended for taking too long


class Watchdog:
    """Remembers this rank's phase and when it began; a daemon thread ends the process when one lasts too long."""

    def __init__(self, rank: int, step_minutes: float, long_minutes: float, poll_s: Optional[float] = None):
        self.rank = rank
        self.step_s, self.long_s = 60.0 * step_minutes, 60.0 * long_minutes
        # Polling a few times per allowance is plenty: the error comes at most poll_s late.
        self.poll_s = poll_s if poll_s is not None else min(5.0, self.step_s / 10)
        # (what, start, allowance, its config key): replaced whole, never edited, so the thread reads it safely
        self.phase: Optional[Tuple[str, float, float, str]] = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ldm-watchdog", daemon=True)

    def mark(self, what: str, long: bool = False) -> None:
        """This rank now does `what` (a step's phase; `long`: cadence work, with the process-group allowance)."""
        key = "train.process_group_timeout_minutes" if long else "train.collective_timeout_minutes"
        self.phase = (what, time.monotonic(), self.long_s if long else self.step_s, key)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.phase = None
        self.done.set()

    def overdue(self, now: float) -> Optional[str]:
        """The error line when the current phase has outlasted its allowance, else None."""
        phase = self.phase
        if phase is None:
            return None
        what, start, allowance, key = phase
        if now - start <= allowance:
            return None
        return (
            f"watchdog: rank {self.rank} has spent {now - start:.1f} s in '{what}' (allowed {allowance:.1f} s, "
            f"{key}={allowance / 60:g}): a rank is stalled or gone; ending this process (exit {EXIT_STATUS}) so the "
            "launcher stops the job; the stacks of this process follow; resume with --resume auto"
        )

    def _watch(self) -> None:
        while not self.done.wait(self.poll_s):
            line = self.overdue(time.monotonic())
            if line is not None:
                try:
                    print(line, file=sys.stderr, flush=True)
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # needs a real file descriptor
                    sys.stderr.flush()
                finally:
                    os._exit(EXIT_STATUS)  # whatever happened to the report, the process must end


class NoWatchdog:
    """One process: nothing to watch (same interface)."""

    def mark(self, what: str, long: bool = False) -> None:
        pass


@contextmanager
def watching(accelerator, train_cfg):
    """A started `Watchdog` for this rank while the block runs (`NoWatchdog` for one process)."""
    if accelerator.num_processes == 1:
        yield NoWatchdog()
        return
    dog = Watchdog(accelerator.process_index, train_cfg.collective_timeout_minutes,
                   train_cfg.process_group_timeout_minutes).start()
    try:
        yield dog
    finally:
        dog.stop()

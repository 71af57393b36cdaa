"""Ctrl-C and SIGTERM while training: finish the step at hand, then stop, so the checkpoint is exact.

A KeyboardInterrupt raised in the middle of a step would checkpoint a half-done step: its
random draws already taken, a discriminator's BatchNorm statistics or the first of two
optimizers already moved. A run resumed from that checkpoint goes on, but no longer
matches the uninterrupted run. So while the loop runs, the first SIGINT or SIGTERM (a
cluster's preemption notice) only asks it to stop: the loop asks every process at the
end of each optimizer step (one process's signal stops all of them at the same step),
checkpoints that step and raises KeyboardInterrupt (the CLIs exit with 130). A second
signal interrupts at once, and the last finished step is saved as it stands.

With several processes a second signal does not interrupt: it only repeats the request.
A rank that jumped out of the step at hand would leave the others waiting in a collective
(or pair its checkpoint barrier with their gradient all-reduce), and second signals are
routine there: Ctrl-C in a terminal reaches every rank and the launcher, which forwards
it, so each rank sees two; a launcher whose first rank left sends the rest SIGTERM while
they finish the same stop. A stop that cannot complete (a rank stalled or gone) is ended
by the watchdog (watchdog.py) instead, naming the rank and what it was doing.
"""

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The signal handler while the loop runs: remembers the first signal; raises on the second in one process."""

    def __init__(self, num_processes: int = 1):
        self.signum, self.num_processes = None, num_processes

    def __call__(self, signum, frame):
        if self.signum is not None and self.num_processes == 1:
            raise KeyboardInterrupt(f"signal {signum}, the second: stopping now")
        self.signum = self.signum or signum  # several processes: the stop already asked for goes on

    def requested(self, accelerator) -> bool:
        """True on every process once any has been signalled; call it on all of them at the same step."""
        if accelerator.num_processes == 1:
            return self.signum is not None  # no collective (nor device sync) for one process
        if self.signum is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


@contextmanager
def stop_at_step_end(num_processes: int = 1):
    """While the block runs, SIGINT and SIGTERM set a `StopRequest` instead of interrupting."""
    request = StopRequest(num_processes)
    if threading.current_thread() is not threading.main_thread():
        yield request  # only the main thread may set signal handlers; there signals interrupt as before
        return
    previous = {signum: signal.signal(signum, request) for signum in SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

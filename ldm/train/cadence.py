"""What the loop (loop.py) does between optimizer steps, and when it stops.

After every optimizer step: log every `log_every`, checkpoint every `checkpoint_every`,
evaluate (every process) and validate (the main process) every `validation_every` and at
the last step (checkpoint and validation time are not counted as training time), and
stop once `train.max_minutes` is spent. What `evaluate` returns joins the step's log
record when one is due (one record a step). When the loop ends, the last step is
checkpointed (and validated, if the loop ran no step); when it is interrupted (Ctrl-C,
or SIGTERM through the CLIs), the last step is checkpointed before the interrupt goes on.
"""

from typing import Callable, Optional

from ldm.train.checkpoint import Checkpointer, TrainState
from ldm.train.run import Reporter, TimeBudget


class Cadence:
    def __init__(self, accelerator, train_cfg, validation_every: int, report: Reporter, checkpoints: Checkpointer,
                 validate: Callable[[int], None], lr_scheduler, batches_per_epoch: int,
                 evaluate: Optional[Callable[[int], dict]] = None):
        self.accelerator, self.cfg, self.validation_every = accelerator, train_cfg, validation_every
        self.report, self.checkpoints, self.validate = report, checkpoints, validate
        self.evaluate = evaluate or (lambda step: {})
        self.lr_scheduler, self.batches_per_epoch = lr_scheduler, batches_per_epoch
        self.budget = TimeBudget(train_cfg.max_minutes)
        self.validated_step = None

    def after_step(self, state: TrainState) -> bool:
        """Log, checkpoint and validate as due after optimizer step `state.step`; True: stop now."""
        step, report = state.step, self.report
        report.step()
        stop = self.budget.spent(self.accelerator)
        due = step % self.validation_every == 0 or step >= self.cfg.max_steps or stop
        evaluated = {}
        if due:
            with report.paused():
                evaluated = self.evaluate(step)
        if step % self.cfg.log_every == 0:
            report.log(step, epoch=state.batches / self.batches_per_epoch, lr=self.lr_scheduler.get_last_lr()[0],
                       **evaluated)
        elif evaluated:
            report.write(step, **evaluated)
        if step % self.cfg.checkpoint_every == 0:
            with report.paused():
                self.checkpoints.save(state)
        if due:
            with report.paused():
                self.validate(step)
                self.validated_step = step
        if stop:
            self.accelerator.print(f"train.max_minutes={self.cfg.max_minutes} spent: stopping at step {step}")
            return True
        return False

    def interrupted(self, state: TrainState) -> None:
        """Save the last step (unless it is saved already), then let the interrupt go on."""
        path = self.checkpoints.save_if_new(state)
        if path is not None:
            self.accelerator.print(f"\ninterrupted: saved {path}; continue with --resume auto")
        self.report.close()

    def finish(self, state: TrainState) -> None:
        """The loop ended: checkpoint and validate the last step unless that was just done."""
        self.checkpoints.save_if_new(state)
        if state.step != self.validated_step:
            evaluated = self.evaluate(state.step)
            if evaluated:
                self.report.write(state.step, **evaluated)
            self.validate(state.step)
        self.report.close()

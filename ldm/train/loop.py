"""The one training loop every stage runs: stage 1 (VAE), stage 2 (U-Net), the control stage.

An explicit loop with Accelerate for the plumbing only, as in edm2's training_loop and
k-diffusion. The loop owns what is the same for every model: gradient accumulation,
clipping, the optimizer and learning-rate steps, the EMA, the cadence (log, checkpoint,
validate, time budget; cadence.py), interrupts (a signal stops the run after the step at
hand; interrupt.py), exact resume and the final barrier. A stage owns the rest:

- its setup, before it calls `training_loop`: data, models, optimizers and LR schedulers,
  prepared by its Accelerator; what trains and what is frozen; what the EMA averages;
- `step(batch, step) -> Step`: one (micro-)batch's losses, as one `Update` per optimizer,
  and the scalars to log. `step` is the number of optimizer steps taken so far;
- `validate(step) -> records`: metrics and image grids of the model as it stands;
- `save(step) -> records`: the final model folder;
- optionally `evaluate(step, ema) -> records`: metrics every process takes part in (the
  held-out validation loss, ldm/eval/validation_loss.py: each process its share, reduced).

`validate` and `save` run on the main process alone, with the EMA weights swapped into
`net` and `net` in eval mode, without moving the training RNG (so that validating changes
no result); the other processes wait. `evaluate` runs just before `validate`, on every
process, in eval mode with the RNG untouched likewise: once with the raw weights
(`ema=False`), then, when there is an EMA, with the EMA weights (`ema=True`). The records
they return go to metrics.jsonl (`evaluate`'s in the step's log record when one is due).

A new stage plugs in like this (the control stage: only the ControlNet trains):

    controlnet, optimizer, loader, lr_scheduler = accelerator.prepare(controlnet, optimizer, loader, lr_scheduler)
    controlnet_net = accelerator.unwrap_model(controlnet)  # what the EMA (built on it before) averages

    def step(batch, step):
        z0, context = ...  # from the frozen VAE and text encoder
        loss = ...  # the frozen U-Net's denoising loss given the ControlNet's residuals: only they get gradients
        return Step([Update(loss, optimizer, lr_scheduler, clip=controlnet.parameters())], len(z0), {"loss": loss})

    def validate(step):
        ...  # a grid sampled with the control images (the ControlNet holds its EMA weights here)
        return {}

    def save(step):
        controlnet_net.save_pretrained(...)  # staging_folder + replace_folder, as the other stages

    training_loop(accelerator, run, cfg, loader, checkpoint, resume, name="control", unit="samples",
                  trained=[controlnet], net=controlnet_net, ema=ema, lr_scheduler=lr_scheduler,
                  step=step, validate=validate, save=save)

Exact resume holds when the stage draws its training randomness from the global torch
RNG inside `step` (the loop seeds it per process and checkpoints carry it), and prepares
every trained model, optimizer and scheduler before calling the loop, in the same order
on every run (accelerate names their checkpoint files by that order).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from accelerate.utils import set_seed
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.finite import check_finite_ema, check_finite_module
from ldm.train.cadence import Cadence
from ldm.data.skips import finish_skip_report, write_skip_report
from ldm.errors import LdmError
from ldm.train.checkpoint import TrainState, complete_checkpoints, start_or_resume
from ldm.train.disk import writing
from ldm.train.distributed import deepspeed_nonfinite_loss
from ldm.train.ema import ema_weights
from ldm.train.interrupt import stop_at_step_end
from ldm.train.loader import batches_from
from ldm.train.run import Reporter, rng_untouched
from ldm.train.watchdog import watching

Records = Optional[Dict[str, float]]


@dataclass
class Update:
    """One optimizer's part of a training step: backpropagate `loss`, clip the gradients of
    `clip` to train.max_grad_norm (None: no clipping), then step `optimizer` and `lr_scheduler`."""

    loss: torch.Tensor
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    clip: Optional[Iterable[torch.nn.Parameter]] = None


@dataclass
class Step:
    """What a stage's step returns for one (micro-)batch.

    `updates` are applied in order once the step returns, so a later update's loss sees
    the weights from before the earlier ones (stage 1: the discriminator judges the
    reconstructions the autoencoder made before its update, as in LDM).
    """

    updates: List[Update]
    items: int  # examples in the batch on this process, for the throughput
    logged: Dict[str, torch.Tensor] = field(default_factory=dict)  # averaged over each log interval


def apply_update(accelerator, update: Update, max_grad_norm: float) -> bool:
    """Backward, clip (on the micro-batch that syncs gradients), optimizer and LR steps.

    Under gradient accumulation the prepared optimizer and scheduler skip their step on the
    micro-batches that only accumulate. Returns False when the step was skipped as
    non-finite: a NaN/inf loss or gradient norm on any process skips the optimizer and LR
    steps on all of them (the flag is reduced over processes, so they stay in step), and the
    weights stay as they were. Under fp16 the grad scaler finds inf/NaN gradients itself
    (and must see them to lower its scale): its skipped steps are reported the same way.
    """
    if deepspeed_nonfinite_loss(accelerator, update.loss):
        return False  # DeepSpeed's engine steps inside backward, past the checks below: a non-finite loss stops here
    accelerator.backward(update.loss)
    if not accelerator.sync_gradients:
        update.optimizer.step()  # no-ops while gradients accumulate
        update.lr_scheduler.step()
        update.optimizer.zero_grad(set_to_none=True)
        return True
    if update.clip is not None:
        norm = accelerator.clip_grad_norm_(update.clip, max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
    else:
        grads = [p.grad for group in update.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    if accelerator.scaler is None:
        finite = torch.isfinite(update.loss.detach().float()).all()
        if norm is not None:
            finite = finite & torch.isfinite(torch.as_tensor(norm, device=finite.device).float())
        bad = accelerator.reduce((~finite).float().reshape(1), "sum")
        if bool(bad.item() > 0):
            update.optimizer.zero_grad(set_to_none=True)
            return False
    update.optimizer.step()
    update.lr_scheduler.step()  # accelerate's scheduler does not step when the grad scaler skipped
    update.optimizer.zero_grad(set_to_none=True)
    return not getattr(update.optimizer, "step_was_skipped", False)


def nonfinite_stop(step: int, count: int, checkpoints) -> LdmError:
    """The one-line stop after train.max_nonfinite_steps skipped steps in a row (no checkpoint of them is written)."""
    last = complete_checkpoints(checkpoints.folder)
    keep = f"the last checkpoint ({last[-1]}) is kept" if last else "no checkpoint was written yet"
    return LdmError(
        f"training diverged: {count} steps in a row (to step {step}) had a non-finite (NaN or inf) loss or gradient "
        f"norm and were skipped (train.max_nonfinite_steps={count}); {keep}: resume with a lower learning rate, "
        "--resume auto --allow-changed train.learning_rate train.learning_rate=... (or use bf16 instead of fp16)"
    )


def training_loop(
    accelerator, run, cfg, loader, checkpoint, resume: Optional[str], *, name: str, unit: str,
    trained: Sequence[torch.nn.Module], net: torch.nn.Module, ema, lr_scheduler,
    step: Callable[[dict, int], Step], validate: Callable[[int], Records], save: Callable[[int], Records],
    evaluate: Optional[Callable[[int, bool], Records]] = None, full=None,
) -> TrainState:
    """Train to `cfg.train.max_steps` (or the time budget), then `save`; returns the last state.

    `cfg`: the stage config (its `train`, `validation.every`; all of it goes to config.yaml).
    `loader`: the prepared training loader. `checkpoint`, `resume`: from `find_checkpoint`.
    `name`: the TensorBoard run name. `unit`: what `Step.items` counts ("images", "samples").
    `trained`: the prepared modules that learn (accumulation skips their gradient sync).
    `net`: the unwrapped module the EMA averages (`ema`, or None) and validation evaluates.
    `lr_scheduler`: the schedule whose learning rate is logged.
    `evaluate`: None, or metrics taken on every process (see the module doc).
    `full`: under FSDP, the main process's whole copy of `net` (fsdp.FullWeights) that
    `validate` and `save` use; every process joins its gather of the EMA weights first.
    """
    train_cfg = cfg.train
    if ema is not None:
        ema.to(accelerator.device)  # checkpointed by checkpoint.py as safetensors + JSON, never pickled
    # Weights were drawn alike on every process; the training noise must differ between them.
    set_seed(train_cfg.seed, device_specific=True)
    run.start(accelerator, cfg, name)
    # Bad captions skipped: skipped.jsonl and a summary; images found unreadable later are appended to it.
    write_skip_report(accelerator, run.dir, loader.dataset, resuming=checkpoint is not None)
    state, checkpoints = start_or_resume(
        accelerator, checkpoint, resume, run.checkpoints, len(loader), train_cfg.checkpoints_total_limit, ema, cfg
    )
    report = Reporter(accelerator, run, train_cfg.max_steps, state.step, unit=unit)

    def on_main(function: Callable[[int], Records], step_: int) -> None:
        """`function(step_)` on the main process with the EMA weights, in eval mode, the RNG untouched."""
        model = net
        if full is not None:  # FSDP: every process gathers the EMA weights into the main process's whole copy
            with ema_weights(ema, net):
                model = full.gather(net)
        if accelerator.is_main_process:
            with ema_weights(ema if full is None else None, model), rng_untouched(accelerator.device):
                training = model.training
                model.eval()
                records = function(step_)
                model.train(training)
            if full is not None:
                full.release()
            if records:
                report.write(step_, **records)
        accelerator.wait_for_everyone()

    def everywhere(step_: int) -> Dict[str, float]:
        """`evaluate` on every process, raw weights then EMA weights, in eval mode, the RNG untouched."""
        records = {}
        if evaluate is None:
            return records
        with rng_untouched(accelerator.device):
            training = net.training
            net.eval()
            records.update(evaluate(step_, False) or {})
            if ema is not None:
                with ema_weights(ema, net):
                    records.update(evaluate(step_, True) or {})
            net.train(training)
        return records

    cadence = Cadence(accelerator, train_cfg, cfg.validation.every, report, checkpoints,
                      lambda s: on_main(validate, s), lr_scheduler, len(loader), evaluate=everywhere)
    data = batches_from(accelerator, loader, state.batches)
    steps, batches = state.step, state.batches
    nonfinite = 0  # non-finite steps in a row
    # Ctrl-C / SIGTERM: stop after the step at hand (interrupt.py); a rank stuck in a phase ends the job
    # (watchdog.py). Log records (a skipped image's warning, from this process or from a DataLoader worker
    # forked inside the block) go through tqdm.write, above the progress bar instead of through it.
    with stop_at_step_end(accelerator.num_processes) as stop, watching(accelerator, train_cfg) as watch, \
            logging_redirect_tqdm():
        try:
            while steps < train_cfg.max_steps:
                watch.mark(f"step {steps + 1}: loading the batch")
                batch = next(data)
                batches += 1
                watch.mark(f"step {steps + 1}: forward/backward")
                with accelerator.accumulate(*trained):
                    out = step(batch, steps)
                    applied = [apply_update(accelerator, update, train_cfg.max_grad_norm) for update in out.updates]
                report.add(out.items, **out.logged)
                if not accelerator.sync_gradients:
                    continue  # a micro-batch: gradients accumulate, no optimizer step was taken
                if all(applied):
                    nonfinite = 0
                    if ema is not None:
                        ema.step(net.parameters())
                else:  # skipped on every process: counted, and the run stops after too many in a row
                    nonfinite += 1
                    report.skipped_nonfinite(steps + 1)
                    if nonfinite >= train_cfg.max_nonfinite_steps:
                        raise nonfinite_stop(steps + 1, nonfinite, checkpoints)
                steps += 1
                state = TrainState(steps, batches)  # a consistent point to checkpoint at
                watch.mark(f"step {steps}: log, checkpoint, validation", long=True)
                if cadence.after_step(state):
                    break
                watch.mark(f"step {steps}: stop-request all-reduce")
                if stop.requested(accelerator):
                    raise KeyboardInterrupt(f"stopped at step {steps} on request")
        except KeyboardInterrupt:
            watch.mark(f"checkpoint save at step {state.step} (stopping)", long=True)
            cadence.interrupted(state)  # checkpoints the last finished step
            write_run_report(accelerator, run)
            # Every rank leaves together: a launcher that sees one leave first sends the others SIGTERM.
            accelerator.wait_for_everyone()
            raise
        except LdmError:
            report.close()  # the error's one line below the progress bar, not on it
            raise
    cadence.finish(state)

    accelerator.wait_for_everyone()
    finish_skip_report(accelerator, run.dir, loader.dataset)  # with the images found unreadable, by any worker
    check_finite_module(net, "the final model", "nothing was saved; resume from the last checkpoint with a lower train.learning_rate")
    check_finite_ema(ema, "the final model", "nothing was saved; resume from the last checkpoint with a lower train.learning_rate")
    with writing("the final model", run.final):
        on_main(save, state.step)
    write_run_report(accelerator, run)
    accelerator.end_training()
    return state


def write_run_report(accelerator, run) -> None:
    """RUN_DIR/report.html (ldm-report) as the run stands; failing to draw it never costs the run."""
    if not accelerator.is_main_process:
        return
    try:
        from ldm.eval.report import write_report  # matplotlib loads only here

        accelerator.print(f"report: {write_report([run.dir])}")
    except Exception as e:  # noqa: BLE001 - the model and checkpoints are saved; the page can be drawn later
        accelerator.print(f"warning: no report written ({type(e).__name__}: {e}); `ldm-report {run.dir}` draws it later")

"""The shared training loop (ldm/train/loop.py), driven by a toy stage as a new stage would plug in:
a generator and a critic (two updates of one step, as stage 1), noise drawn inside the step, an EMA."""

import json
import os
import signal
from dataclasses import dataclass, field

import pytest
import torch
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

from ldm.config import TrainConfig
from ldm.train.checkpoint import find_checkpoint
from ldm.train.loader import train_loader
from ldm.train.loop import Step, Update, training_loop
from ldm.train.optim import build_lr_scheduler
from ldm.train.run import Run, make_accelerator


@dataclass
class ToyValidation:
    every: int = 100


@dataclass
class ToyConfig:
    train: TrainConfig
    validation: ToyValidation = field(default_factory=ToyValidation)


def toy_stage(out, resume=None, every=100, signals=None, sgd=False, **train):
    """Train the toy stage; returns what its validate and save saw. `signals`: {call of step: SIGINTs sent}."""
    train = {"batch_size": 2, "max_steps": 4, "log_every": 1, "checkpoint_every": 2, "checkpoints_total_limit": None,
             "learning_rate": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 1, **train}
    cfg = ToyConfig(TrainConfig(output_dir=str(out), **train), ToyValidation(every))
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, resume)
    accelerator = make_accelerator(cfg.train, run)
    data = [{"x": torch.linspace(-1, 1, 3) * i} for i in range(1, 7)]  # 6 items: 3 batches an epoch
    loader = train_loader(data, cfg.train.batch_size, 0, cfg.train.seed, accelerator.num_processes)

    set_seed(cfg.train.seed)
    gen, critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    ema = EMAModel(gen.parameters(), decay=0.5)
    opt = torch.optim.SGD if sgd else torch.optim.AdamW
    opt_g, opt_c = opt(gen.parameters(), lr=cfg.train.learning_rate), opt(critic.parameters(), lr=cfg.train.learning_rate)
    sched_g, sched_c = (build_lr_scheduler(o, cfg.train, accelerator.num_processes) for o in (opt_g, opt_c))
    gen, critic, opt_g, opt_c, loader, sched_g, sched_c = accelerator.prepare(gen, critic, opt_g, opt_c, loader, sched_g, sched_c)
    net = accelerator.unwrap_model(gen)
    seen = {"steps": [], "validated": [], "saved": None}

    def step(batch, step):
        seen["steps"].append(step)
        for _ in range((signals or {}).get(len(seen["steps"]), 0)):
            os.kill(os.getpid(), signal.SIGINT)
        x = batch["x"]
        y = gen(x + torch.randn_like(x))  # the training noise: from the per-process RNG that checkpoints carry
        g_loss = (y - x).pow(2).mean()
        c_loss = critic(y.detach()).pow(2).mean()
        return Step([Update(g_loss, opt_g, sched_g, clip=gen.parameters()), Update(c_loss, opt_c, sched_c)],
                    len(x), {"loss": g_loss, "c_loss": c_loss})

    def validate(step):
        ema_in = all(torch.equal(p, s) for p, s in zip(net.parameters(), ema.shadow_params))
        seen["validated"].append((step, net.training, ema_in))
        torch.rand(5)  # validation may draw: the training RNG must not move
        return {"val_weight_sum": net.weight.sum().item()}

    def save(step):
        seen["saved"] = {"ema": [p.detach().clone() for p in net.parameters()], "step": step}
        return {"final": 1.0}

    state = training_loop(
        accelerator, run, cfg, loader, checkpoint, resume, name="toy", unit="samples", trained=(gen, critic), net=net,
        ema=ema, lr_scheduler=sched_g, step=step, validate=validate, save=save,
    )
    seen["state"] = state
    seen["raw"] = [p.detach().clone() for p in list(net.parameters()) + list(critic.parameters())]
    return seen


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_accumulation_counts_optimizer_steps_and_logs_each(tmp_path):
    seen = toy_stage(tmp_path / "run", gradient_accumulation_steps=2)
    # step(batch, step) sees the optimizer steps taken so far, once per micro-batch. Accelerate
    # also steps on an epoch's last batch (3 batches an epoch): steps 1 and 3 had one micro-batch.
    assert seen["steps"] == [0, 0, 1, 2, 2, 3]
    assert seen["state"].step == 4 and seen["state"].batches == 6
    info = json.loads((tmp_path / "run/checkpoints/step-000004/checkpoint.json").read_text())
    assert info["step"] == 4 and info["batches"] == 6
    logged = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all("c_loss" in r and "lr" in r for r in logged)
    # The final validation and the save write their records; the save sees the last step.
    assert [r["step"] for r in records(tmp_path / "run") if "val_weight_sum" in r] == [4]
    assert [r["step"] for r in records(tmp_path / "run") if "final" in r] == [4] and seen["saved"]["step"] == 4


def test_validate_and_save_see_the_ema_weights_in_eval_mode_and_leave_the_rng(tmp_path):
    rare = toy_stage(tmp_path / "rare", every=100)
    often = toy_stage(tmp_path / "often", every=1)
    assert often["validated"] == [(s, False, True) for s in (1, 2, 3, 4)]  # eval mode, the EMA weights in
    assert rare["validated"] == [(4, False, True)]
    assert same(rare["raw"], often["raw"])  # validating at every step changed nothing
    assert same(rare["saved"]["ema"], often["saved"]["ema"])
    assert not same(rare["saved"]["ema"], rare["raw"][:2])  # the save had the EMA weights, training the raw ones


def test_only_the_clip_parameters_are_clipped(tmp_path):
    """SGD with lr 1: a parameter moves by its gradient, clipped to max_grad_norm for the generator only."""
    from ldm.train.loop import apply_update

    applied = []

    def recording(accelerator, update, max_grad_norm):
        before = [p.detach().clone() for group in update.optimizer.param_groups for p in group["params"]]
        apply_update(accelerator, update, max_grad_norm)
        after = [p.detach() for group in update.optimizer.param_groups for p in group["params"]]
        applied.append(torch.cat([(a - b).flatten() for a, b in zip(after, before)]).norm().item())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ldm.train.loop.apply_update", recording)
        toy_stage(tmp_path / "run", sgd=True, max_steps=1, learning_rate=1.0, lr_scheduler="constant",
                  lr_warmup_steps=0, max_grad_norm=1e-3)
    generator, critic = applied
    assert generator == pytest.approx(1e-3, rel=1e-4)
    assert critic > 1e-2


def test_resume_and_interrupt_are_bit_identical(tmp_path):
    """4 steps straight vs. Ctrl-C in the first micro-batch of step 3: that step is finished and
    saved, then resumed. Two optimizers, two LR schedules, the EMA and the noise drawn in the step
    all come back; the data crosses epochs."""
    straight = toy_stage(tmp_path / "straight", gradient_accumulation_steps=2)

    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        toy_stage(run, gradient_accumulation_steps=2, checkpoint_every=100, signals={4: 1})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]
    assert not (run / "samples").exists() or not any((run / "samples").iterdir())
    resumed = toy_stage(run, resume="auto", gradient_accumulation_steps=2, checkpoint_every=100)
    assert resumed["steps"] == [3]
    assert same(straight["raw"], resumed["raw"]) and same(straight["saved"]["ema"], resumed["saved"]["ema"])
    loss = {r["step"]: r["loss"] for r in records(tmp_path / "straight") if "loss" in r}
    assert {r["step"]: r["loss"] for r in records(run) if "loss" in r} == loss


def test_a_second_signal_interrupts_at_once(tmp_path):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job (CI)
    with pytest.raises(KeyboardInterrupt):
        toy_stage(run, checkpoint_every=100, signals={3: 2})  # in step 3: steps 1 and 2 are done
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert toy_stage(run, resume="auto", checkpoint_every=100)["steps"] == [2, 3]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back

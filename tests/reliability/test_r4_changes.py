"""R4: changed settings on resume (ldm/train/changes.py), one case per key.

A stage-1 run (with its discriminator, so that every deliberate key has something to act on)
checkpointed at step 2, resumed to step 4 with one setting changed:
- breaking keys (model shape, data, seed, optimizer and schedule kind, loss, EMA, ...): refused
  in one line listing the key and both values, also when `--allow-changed KEY` names it;
- harmless keys (max_steps, max_minutes, log / checkpoint / validation cadence, num_workers, ...):
  the run resumes from the checkpoint and ends, nothing recorded as changed;
- deliberate keys (learning rates, batch size, accumulation, clipping, warm-up, weight decay):
  refused without `--allow-changed KEY` (one line naming the flag); with it the run resumes,
  changes.jsonl records the change, and the change is applied for real: the step-4 weights
  differ from those of the same resume without the change, plus a direct check where the run
  shows it (the logged lr, the batches per epoch and per step in checkpoint.json).
"""

import json
import shutil

import pytest
from safetensors.torch import load_file

from harness import one_line, same_weights, stage_argv

from ldm.cli.train_vae import main

RUN = ["train.learning_rate=1e-3", "train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=1",
       "train.checkpoint_every=2", "train.checkpoints_total_limit=null",
       "validation.every=100", "loss.discriminator_start=1", "loss.discriminator_channels=8",
       "loss.discriminator_layers=1"]

BREAKING = [  # (override, what the line must show)
    ("data.resolution=32", "data.resolution: 16 -> 32"),
    ("data.shapes.num_images=12", "data.shapes.num_images: 8 -> 12"),
    ("data.shapes.seed=1", "data.shapes.seed: 0 -> 1"),
    ("data.random_flip=true", "data.random_flip: False -> True"),
    ("data.center_crop=false", "data.center_crop: True -> False"),
    ("model.block_out_channels=[8,32]", "model.block_out_channels: [8, 16] -> [8, 32]"),
    ("model.latent_channels=8", "model.latent_channels: 4 -> 8"),
    ("model.layers_per_block=2", "model.layers_per_block: 1 -> 2"),
    ("train.seed=1", "train.seed: 0 -> 1"),
    ("train.lr_scheduler=cosine", "train.lr_scheduler: 'constant_with_warmup' -> 'cosine'"),
    ("train.adam_beta1=0.8", "train.adam_beta1: 0.9 -> 0.8"),
    ("train.adam_epsilon=1e-6", "train.adam_epsilon: 1e-08 -> 1e-06"),
    ("loss.reconstruction=l2", "loss.reconstruction: 'l1' -> 'l2'"),
    ("loss.kl_weight=1e-3", "loss.kl_weight: 1e-06 -> 0.001"),
    ("loss.discriminator_weight=1.0", "loss.discriminator_weight: 0.5 -> 1.0"),
    ("loss.discriminator_loss=vanilla", "loss.discriminator_loss: 'hinge' -> 'vanilla'"),
    ("ema.enabled=true", "ema.enabled: False -> True"),
]
HARMLESS = ["train.max_minutes=60", "train.log_every=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=2",
            "validation.every=1", "validation.grid_images=4", "data.num_workers=1", "scale_samples=8",
            "train.max_nonfinite_steps=3"]
DELIBERATE = [  # (override, key, from, to)
    ("train.learning_rate=5e-4", "train.learning_rate", 1e-3, 5e-4),
    ("train.batch_size=2", "train.batch_size", 4, 2),
    ("train.gradient_accumulation_steps=2", "train.gradient_accumulation_steps", 1, 2),
    ("train.max_grad_norm=1e-4", "train.max_grad_norm", 1.0, 1e-4),
    ("train.lr_warmup_steps=100", "train.lr_warmup_steps", 1, 100),
    ("train.adam_weight_decay=100.0", "train.adam_weight_decay", 0.0, 100.0),
    ("loss.discriminator_learning_rate=0.5", "loss.discriminator_learning_rate", None, 0.5),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r4") / "vae"
    assert main(stage_argv("vae", out, *RUN, "train.max_steps=2")) == 0
    return out


@pytest.fixture(scope="module")
def unchanged(run, tmp_path_factory):
    """The step-4 weights (VAE and discriminator) of the resume without a change."""
    out = tmp_path_factory.mktemp("r4-unchanged") / "vae"
    shutil.copytree(run, out)
    assert main(stage_argv("vae", out, *RUN, "train.max_steps=4", "--resume", "auto")) == 0
    return weights(out)


def weights(out):
    folder = out / "checkpoints/step-000004"
    return {**load_file(str(folder / "model.safetensors")), **{
        f"disc.{k}": v for k, v in load_file(str(folder / "model_1.safetensors")).items()}}


def resume(run, tmp_path, capsys, *extra):
    out = tmp_path / "vae"
    shutil.copytree(run, out)
    capsys.readouterr()
    code = main(stage_argv("vae", out, *RUN, "train.max_steps=4", *extra, "--resume", "auto"))
    captured = capsys.readouterr()
    return out, code, captured.out, captured.err


@pytest.mark.parametrize("override, shown", BREAKING, ids=[b[0].split("=")[0] for b in BREAKING])
@pytest.mark.parametrize("flag", [False, True], ids=["", "allowed"])
def test_a_breaking_change_is_refused_with_both_values(run, tmp_path, capsys, record, override, shown, flag):
    key = override.split("=")[0]
    extra = [override] + (["--allow-changed", key] if flag else [])
    out, code, _, err = resume(run, tmp_path, capsys, *extra)
    held, line = one_line(code, err)
    held = held and shown in line and not (out / "checkpoints/step-000004").exists()
    case = f"breaking {key}" + (" (with --allow-changed)" if flag else "")
    assert record("R4", case, held, detail=line), line


@pytest.mark.parametrize("override", HARMLESS, ids=[h.split("=")[0] for h in HARMLESS])
def test_a_harmless_change_is_allowed(run, tmp_path, capsys, record, override):
    out, code, stdout, err = resume(run, tmp_path, capsys, override)
    resumed = f"resumed from {out / 'checkpoints/step-000002'} at step 2" in stdout + err
    held = code == 0 and resumed and (out / "final").is_dir() and not (out / "changes.jsonl").exists()
    detail = "resumed at step 2, finished, nothing recorded" if held else f"exit {code}: {err.strip()[-300:]}"
    assert record("R4", f"harmless {override.split('=')[0]}", held, detail=detail), detail


@pytest.mark.parametrize("override, key, old, new", DELIBERATE, ids=[d[1] for d in DELIBERATE])
def test_a_deliberate_change_needs_the_flag(run, tmp_path, capsys, record, override, key, old, new):
    _, code, _, err = resume(run, tmp_path, capsys, override)
    held, line = one_line(code, err)
    held = held and f"{key}: {old!r} -> {new!r}" in line and f"--allow-changed {key}" in line
    assert record("R4", f"deliberate {key} without the flag", held, detail=line), line


def applied(out, key, new) -> str:
    """A direct sign of the new value in the resumed run ('' when shown, else what is wrong)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    info = json.loads((out / "checkpoints/step-000004/checkpoint.json").read_text())
    if key == "train.learning_rate":
        return "" if lrs[3] == lrs[4] == new else f"logged lr {lrs[3]}, {lrs[4]}"
    if key == "train.lr_warmup_steps":
        warming = lrs[3] < 1e-3 * 0.05 and lrs[4] > lrs[3]  # a few 100ths of the rate, rising
        return "" if warming else f"logged lr {lrs[3]}, {lrs[4]} at steps 3, 4 of a 100-step warm-up"
    if key == "train.batch_size":
        return "" if info["batches_per_epoch"] == 4 else f"batches_per_epoch {info['batches_per_epoch']}"
    if key == "train.gradient_accumulation_steps":
        return "" if info["batches"] == 2 + 2 * 2 else f"{info['batches']} batches after 2 + 2 steps of 2"
    return ""


@pytest.mark.parametrize("override, key, old, new", DELIBERATE, ids=[d[1] for d in DELIBERATE])
def test_a_deliberate_change_with_the_flag_is_applied_and_recorded(run, unchanged, tmp_path, capsys, record,
                                                                   override, key, old, new):
    out, code, _, err = resume(run, tmp_path, capsys, override, "--allow-changed", key)
    problems = []
    if code != 0:
        problems.append(f"exit {code}: {err.strip()[-300:]}")
    else:
        changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
        if changes != [{"step": 2, "key": key, "from": old, "to": new}]:
            problems.append(f"changes.jsonl holds {changes}")
        if same_weights(weights(out), unchanged):
            problems.append("the step-4 weights are those of the unchanged resume: not applied")
        sign = applied(out, key, new)
        if sign:
            problems.append(sign)
    detail = "; ".join(problems) or "applied (step-4 weights differ from the unchanged resume), in changes.jsonl"
    assert record("R4", f"deliberate {key} with --allow-changed", not problems, detail=detail), detail

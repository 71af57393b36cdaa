"""R2: checkpoint integrity. Every file of a real checkpoint x {truncated, corrupt, missing, foreign
file added beside it}: `--resume auto` is refused in one line naming the file and the previous
complete checkpoint, and nothing was restored (no weight, optimizer, scheduler, RNG or EMA load
was even started: the refusal comes first) nor written (every file of the run folder as before).

The checkpoint: stage 1 with its PatchGAN discriminator and the EMA on, so that it holds every
kind of part a checkpoint can hold (two models, two optimizers, two schedulers, the RNG states,
the EMA as safetensors + json, the run's config, checkpoint.json and the manifest).
"""

import shutil

import pytest

from harness import DAMAGES, damage, digest_tree, one_line, stage_argv

from ldm.cli.train_vae import main

RUN = ["train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=null", "ema.enabled=true",
       "ema.decay=0.9", "validation.every=100", "loss.discriminator_start=1", "loss.discriminator_channels=8",
       "loss.discriminator_layers=1"]
PARTS = ["model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin", "scheduler.bin",
         "scheduler_1.bin", "random_states_0.pkl", "ema.safetensors", "ema.json", "config.yaml", "checkpoint.json",
         "manifest.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("r2") / "vae"
    assert main(stage_argv("vae", run, *RUN)) == 0
    return run


def test_the_matrix_covers_every_file_of_the_checkpoint(trained):
    names = {p.name for p in (trained / "checkpoints/step-000002").iterdir()}
    assert names == set(PARTS)


class Loads:
    """Records every restore the resume starts (weights, optimizer and scheduler states, RNG, EMA)."""

    def __init__(self, monkeypatch):
        import accelerate
        import ldm.train.checkpoint as checkpoint

        self.calls = []
        for owner, name in [(accelerate.Accelerator, "load_state"), (checkpoint, "load_ema"),
                            (checkpoint, "load_checkpoint")]:
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self.wrap(name, real))

    def wrap(self, name, real):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("part", PARTS)
def test_a_damaged_part_is_refused_before_anything_is_restored(trained, tmp_path, capsys, monkeypatch, record,
                                                                part, how):
    run = tmp_path / "vae"
    shutil.copytree(trained, run)
    folder = run / "checkpoints/step-000002"
    named = damage(folder / part, how).name
    before = digest_tree(run, "")
    loads = Loads(monkeypatch)
    capsys.readouterr()
    code = main(stage_argv("vae", run, *RUN, "train.max_steps=3", "--resume", "auto"))
    held, line = one_line(code, capsys.readouterr().err)
    problems = []
    if not held:
        problems.append("not a one-line refusal")
    if named not in line:
        problems.append(f"does not name {named}")
    if f"--resume {run / 'checkpoints/step-000001'}" not in line:
        problems.append("does not offer step-000001")
    if loads.calls:
        problems.append(f"restored first: {loads.calls}")
    after = digest_tree(run, "")
    if after != before:  # the run folder as the damage left it: nothing trained, saved or removed
        problems.append(f"the run folder changed: {sorted(set(after.items()) ^ set(before.items()))[:3]}")
    detail = line if not problems else f"{'; '.join(problems)}: {line}"
    assert record("R2", f"{part} {how}", not problems, detail=detail), detail

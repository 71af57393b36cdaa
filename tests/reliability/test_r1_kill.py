"""R1: kill -9 at seeded moments of the three trainers; the run resumed with --resume auto ends identical.

For each stage (stage 1 VAE, stage 2 U-Net, the control stage's ControlNet) one uninterrupted
reference run, then one run per moment, killed with SIGKILL there and resumed with
`--resume auto` to the end. Held: every safetensors file of final/ (the EMA weights) and the
last checkpoint's model.safetensors and ema.safetensors are bit for bit the reference's.

The moments are drawn from SEED (21 in all, 7 per stage):
- after the k-th logged step, before the first checkpoint; mid-epoch; in a later epoch
  (killed from outside, as soon as metrics.jsonl holds the k-th step);
- during the n-th checkpoint write: before its EMA is written, before its manifest is
  written, and before the rename that publishes it (the process kills itself at that
  call, which an outside poll could not hit reliably: a tiny checkpoint takes ~10 ms);
- during the final save (final/ written in its staging folder, not yet renamed).

The training processes are forked by a fork server that imported the trainers once (harness.py),
each a real process that dies by SIGKILL.
"""

import random
import shutil
import time
from pathlib import Path

import pytest

from harness import digest_tree, fork_train, logged_steps, stage_argv

SEED = 10
# Per stage: steps, checkpoint cadence, batches per epoch, the loop module (its final save), EMA on.
STAGES = {
    "vae": dict(steps=6, every=2, epoch=2, loop="ldm.train.vae_loop"),  # 8 images, batch 4
    "unet": dict(steps=9, every=4, epoch=5, loop="ldm.train.unet_loop"),  # 20 training images, batch 4
    "control": dict(steps=9, every=4, epoch=5, loop="ldm.train.control_loop"),
}


def saves(stage) -> int:
    s = STAGES[stage]
    return s["steps"] // s["every"] + (s["steps"] % s["every"] != 0)  # every N steps, and at the end


def moments(seed=SEED):
    """[(stage, name, kind, k)]: 'log' = kill from outside after the k-th logged step, else the
    k-th call of that function kills the process."""
    rng = random.Random(seed)
    out = []
    for stage, s in STAGES.items():
        steps, every, epoch = s["steps"], s["every"], s["epoch"]
        first_epoch = [k for k in range(1, min(epoch, steps)) if k % every]
        later = [k for k in range(epoch + 1, steps) if k % every]
        out += [
            (stage, "before the first checkpoint", "log", rng.randint(1, every - 1)),
            (stage, "mid-epoch", "log", rng.choice(first_epoch)),
            (stage, "a later epoch", "log", rng.choice(later)),
            (stage, "checkpoint write: before its EMA", "save_ema", rng.randint(1, saves(stage))),
            (stage, "checkpoint write: before its manifest", "write_manifest", rng.randint(1, saves(stage))),
            (stage, "checkpoint written, before the rename", "replace_folder", rng.randint(1, saves(stage))),
            (stage, "during the final save", "final", 1),
        ]
    return out


MOMENTS = moments()


def argv(stage, run, vae_dir, base_dir, *extra):
    s = STAGES[stage]
    return stage_argv(stage, run, f"train.max_steps={s['steps']}", f"train.checkpoint_every={s['every']}",
                      "train.checkpoints_total_limit=null", "ema.enabled=true", "ema.decay=0.9",
                      "validation.every=1000", *extra, vae_dir=vae_dir, base_dir=base_dir)


def result(run: Path, stage) -> dict:
    """What must be identical: final/'s weights and the last checkpoint's model and EMA."""
    last = run / f"checkpoints/step-{STAGES[stage]['steps']:06d}"
    out = {f"final/{k}": v for k, v in digest_tree(run / "final").items()}
    out.update({f"last/{k}": v for k, v in digest_tree(last).items()})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vae_dir, base_dir):
    root = tmp_path_factory.mktemp("r1-reference")
    refs = {}
    for stage in STAGES:
        run = root / stage
        proc = fork_train(stage, argv(stage, run, vae_dir, base_dir), root / f"{stage}.log")
        proc.wait()
        assert proc.exit_code == 0, proc.output()[-3000:]
        refs[stage] = result(run, stage)
        assert any(k.startswith("last/ema") for k in refs[stage]) and any(k.startswith("final/") for k in refs[stage])
    return refs


def kill_run(stage, kind, k, run, vae_dir, base_dir, log):
    """Start the run, kill it at the moment; (killed, what the run folder held then)."""
    command = argv(stage, run, vae_dir, base_dir)
    if kind == "log":
        proc = fork_train(stage, command, log)
        deadline = time.monotonic() + 300
        while logged_steps(run) < k and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
        assert logged_steps(run) >= k, f"killed before step {k} was logged: {proc.output()[-2000:]}"
    else:
        module, name = (STAGES[stage]["loop"], "replace_folder") if kind == "final" else ("ldm.train.checkpoint", kind)
        proc = fork_train(stage, command, log, die_at=(module, name, k))
        proc.wait()
    state = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    return proc, state


@pytest.mark.reliability
@pytest.mark.parametrize("stage, name, kind, k", MOMENTS, ids=[f"{m[0]}-{i}-{m[2]}-{m[3]}" for i, m in enumerate(MOMENTS)])
def test_killed_and_resumed_run_is_identical(reference, tmp_path, vae_dir, base_dir, record, stage, name, kind, k):
    run = tmp_path / stage
    killed, state = kill_run(stage, kind, k, run, vae_dir, base_dir, tmp_path / "killed.log")
    assert killed.killed, f"the run was not killed at {name} (k={k}): {killed.output()[-2000:]}"
    assert not (run / "final").exists() or kind == "log"  # the self-kills all come before final/ is published
    resumed = fork_train(stage, [*argv(stage, run, vae_dir, base_dir), "--resume", "auto"], tmp_path / "resumed.log")
    resumed.wait()
    assert resumed.exit_code == 0, resumed.output()[-3000:]
    got = result(run, stage)
    differ = sorted(key for key in set(got) | set(reference[stage]) if got.get(key) != reference[stage].get(key))
    detail = f"killed {name} (k={k}; checkpoints then: {', '.join(state) or 'none'}); " + (
        f"{len(got)} weight files identical" if not differ else f"differ: {', '.join(differ)}")
    assert record("R1", f"{stage}: {name} (k={k})", not differ, detail=detail), detail
    shutil.rmtree(run)  # tmp space: ~1 MB a run


def test_the_seeded_moments_cover_every_stage_and_kind():
    """Fast: at least 20 moments, each stage with every kind (the battery's plan, checked without training)."""
    assert len(MOMENTS) >= 20 and MOMENTS == moments()  # deterministic from the seed
    for stage, s in STAGES.items():
        kinds = {m[2] for m in MOMENTS if m[0] == stage}
        assert kinds == {"log", "save_ema", "write_manifest", "replace_folder", "final"}
        logs = [m[3] for m in MOMENTS if m[0] == stage and m[2] == "log"]
        assert logs[0] < s["every"] and logs[1] < s["epoch"] and s["epoch"] < logs[2] < s["steps"]

"""SIGTERM (a cluster's preemption notice) saves a checkpoint that --resume auto continues.

A real training process gets a real signal: the default SIGTERM action would kill it
with every step since the last checkpoint lost.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.block_out_channels=[8,16]", "model.norm_num_groups=8", "data.resolution=16",
    "data.shapes.num_images=16", "data.num_validation=4", "train.batch_size=4", "train.log_every=1",
    "scale_samples=8", "train.checkpoint_every=100000",  # only the signal makes a checkpoint
]


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return sum(1 for line in lines if "loss" in json.loads(line))


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    run = tmp_path / "vae"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train_vae.py"), f"train.output_dir={run}", *TINY]
    proc = subprocess.Popen([*cmd, "train.max_steps=100000"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while logged_steps(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        err, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "checkpoint.json").is_file(), err
    step = json.loads((saved[0] / "checkpoint.json").read_text())["step"]
    assert step >= 3 and "--resume auto" in err

    done = subprocess.run([*cmd, f"train.max_steps={step + 1}", "--resume", "auto"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {saved[0]} at step {step}" in done.stdout + done.stderr
    assert (run / "final/config.json").is_file()

"""R3: the samples of each epoch across an interruption and a resume, 1 and 2 processes, folder and shard data.

A stage-2 run of three epochs of 3 steps (12 training samples, 4 per step in all), stopped after its
step-4 checkpoint (mid-epoch 2) and resumed with --resume auto to the end (ids_train.py).
Each process's loaded sample ids are recorded; the interrupted run's sequence is the steps up
to 4 of the first run plus the resumed run's. Figures, per epoch over all processes:
duplicates (a sample loaded more than once) and misses (a sample not loaded): both 0 when
held, and the interrupted run loaded the same samples in the same order as the straight one.
The one-process cases run in the test's process (seconds); the two-process ones launch torchrun.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from harness import stage_argv
from ids_train import recording, run as run_recorded

SCRIPT = Path(__file__).with_name("ids_train.py")
SAMPLES, STEPS_PER_EPOCH, EPOCHS, CUT, GLOBAL_BATCH = 12, 3, 3, 4, 4


def folder_data(root: Path) -> list:
    """12 images with captions (metadata.jsonl); ids are their indices."""
    root.mkdir(parents=True)
    lines = []
    for i in range(SAMPLES):
        Image.new("RGB", (16, 16), (20 * i, 10, 200 - 10 * i)).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return ["data.source=folder", f"data.path={root}"], list(range(SAMPLES))


def shard_data(root: Path) -> list:
    """4 shards of 3 samples (2 shards a process with 2 processes); ids are the __key__s."""
    root.mkdir(parents=True)
    for s in range(4):
        with wds.TarWriter(str(root / f"shard-{s}.tar")) as sink:
            for j in range(3):
                i = 3 * s + j
                out = io.BytesIO()
                Image.new("RGB", (16, 16), (20 * i, 10, 200 - 10 * i)).save(out, format="PNG")
                sink.write({"__key__": f"{i:04d}", "png": out.getvalue(), "txt": f"image {i}".encode()})
    return ["data.source=webdataset", f"data.path={root}/shard-{{0..3}}.tar", f"data.num_samples={SAMPLES}"], [
        f"{i:04d}" for i in range(SAMPLES)]


def argv(run: Path, data, processes: int, vae_dir):
    return stage_argv("unet", run, *data, "data.num_validation=0", f"train.batch_size={GLOBAL_BATCH // processes}",
                      f"train.max_steps={STEPS_PER_EPOCH * EPOCHS}", f"train.checkpoint_every={CUT}",
                      "train.checkpoints_total_limit=null", "validation.every=1000", vae_dir=vae_dir)


def figures(straight, resumed, expected, processes: int) -> dict:
    """Duplicates and misses per epoch of the interrupted run; whether it loaded what the straight run did."""
    per_process = GLOBAL_BATCH // processes
    interrupted = [s[: CUT * per_process] + r for s, r in zip(straight, resumed)]
    epochs = []
    for e in range(EPOCHS):
        part = slice(e * STEPS_PER_EPOCH * per_process, (e + 1) * STEPS_PER_EPOCH * per_process)
        ids = [i for rank in interrupted for i in rank[part]]
        epochs.append((len(ids) - len(set(ids)), len(set(expected) - set(ids))))
    steps = EPOCHS * STEPS_PER_EPOCH  # each process loads its share of every step, the resumed run none before CUT
    counts = all(len(s) == steps * per_process and len(r) == (steps - CUT) * per_process
                 for s, r in zip(straight, resumed))
    return dict(duplicates=sum(d for d, _ in epochs), misses=sum(m for _, m in epochs), per_epoch=epochs,
                same_as_straight=interrupted == straight and counts)


def check(record, case, straight, resumed, expected, processes):
    f = figures(straight, resumed, expected, processes)
    held = f["duplicates"] == 0 and f["misses"] == 0 and f["same_as_straight"]
    detail = (f"duplicates={f['duplicates']}, misses={f['misses']} (per epoch {f['per_epoch']}); the interrupted run "
              f"loaded {'the same' if f['same_as_straight'] else 'NOT the same'} samples in the same order as the straight one")
    assert record("R3", case, held, detail=detail, duplicates=f["duplicates"], misses=f["misses"]), detail


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_one_process(tmp_path, vae_dir, record, source):
    data, expected = (folder_data if source == "folder" else shard_data)(tmp_path / "data")
    with recording():
        phases = run_recorded(None, CUT, "unet", argv(tmp_path / "unet", data, 1, vae_dir))
    check(record, f"1 process, {source} data", [phases["straight"]], [phases["resumed"]], expected, 1)


@pytest.mark.reliability
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_two_processes(tmp_path, vae_dir, record, source):
    data, expected = (folder_data if source == "folder" else shard_data)(tmp_path / "data")
    report = tmp_path / "report"
    report.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               str(report), str(CUT), "unet", *argv(tmp_path / "unet", data, 2, vae_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    load = lambda phase: [json.loads((report / f"{phase}-rank{r}.json").read_text()) for r in range(2)]  # noqa: E731
    check(record, f"2 processes, {source} data", load("straight"), load("resumed"), expected, 2)

"""Checkpoints as untrusted input (issue 10, defects 1 and 2).

No file of a checkpoint may run code when it is read (no pickle loaded with
weights_only=False), and a checkpoint is checked as a whole (manifest.json: every file's
size and sha256, written last) before anything is restored: a missing, truncated,
corrupt or foreign part is a one-line refusal naming the file and the previous complete
checkpoint to resume from.
"""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.cli.train_vae import main

RUN = ["train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=null",
       "ema.enabled=true", "ema.decay=0.9", "validation.every=100"]


def tiny(out, *extra):
    return [
        f"train.output_dir={out}", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
        "data.resolution=16", "data.shapes.num_images=8", "data.num_validation=0",
        "train.batch_size=4", "train.log_every=1", "scale_samples=4", *extra,
    ]


class Sentinel:
    """A pickle that creates a file when unpickled: what a hostile checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def hostile_pickle(path, sentinel):
    torch.save({"state": Sentinel(sentinel)}, str(path))


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def rewrite_manifest(folder):
    """What a careful attacker does: make the manifest match the planted files."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return
    try:
        info = json.loads(manifest.read_text())
    except ValueError:
        return  # the manifest itself was replaced
    for name, entry in info["files"].items():
        data = (folder / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.write_text(json.dumps(info))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "vae"
    assert main(tiny(run, *RUN)) == 0
    return run


def copy_run(trained, tmp_path):
    run = tmp_path / "vae"
    shutil.copytree(trained, run)
    return run


def test_checkpoint_holds_the_ema_as_safetensors_and_json(trained):
    folder = trained / "checkpoints/step-000002"
    names = {p.name for p in folder.iterdir()}
    assert {"ema.safetensors", "ema.json", "manifest.json", "checkpoint.json"} <= names
    assert not any(n.startswith("custom_checkpoint") for n in names)
    info = json.loads((folder / "ema.json").read_text())
    assert info["optimization_step"] == 2 and info["decay"] == 0.9
    shadow = load_file(str(folder / "ema.safetensors"))
    assert len(shadow) == len(load_file(str(folder / "model.safetensors")))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("part", [
    "ema.safetensors", "ema.json", "model.safetensors", "optimizer.bin", "scheduler.bin",
    "random_states_0.pkl", "checkpoint.json", "manifest.json",
])
def test_a_code_running_pickle_in_any_checkpoint_file_never_runs(trained, tmp_path, capsys, part):
    """Fails on the main of 2026-11-30: custom_checkpoint_0.pkl (the EMA) was unpickled with weights_only=False."""
    run = copy_run(trained, tmp_path)
    folder = run / "checkpoints/step-000002"
    sentinel = tmp_path / "pwned"
    target = folder / part
    if part.startswith("ema") and not target.exists():
        target = folder / "custom_checkpoint_0.pkl"  # where the EMA lived before the fix
    hostile_pickle(target, sentinel)
    rewrite_manifest(folder)
    err = one_line_error(capsys, tiny(run, *RUN, "train.max_steps=3", "--resume", "auto"))
    assert not sentinel.exists()
    assert "step-000002" in err


def test_a_foreign_pickle_in_a_checkpoint_is_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    folder = run / "checkpoints/step-000002"
    sentinel = tmp_path / "pwned"
    hostile_pickle(folder / "custom_checkpoint_0.pkl", sentinel)
    err = one_line_error(capsys, tiny(run, *RUN, "train.max_steps=3", "--resume", "auto"))
    assert not sentinel.exists()
    assert "custom_checkpoint_0.pkl" in err and "--resume" in err and "step-000001" in err


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
@pytest.mark.parametrize("part", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors"])
def test_a_damaged_part_is_refused_naming_it_and_the_previous_checkpoint(trained, tmp_path, capsys, part, damage):
    """Fails on the main of 2026-11-30: a corrupt random_states_0.pkl was skipped with an info log line."""
    run = copy_run(trained, tmp_path)
    path = run / "checkpoints/step-000002" / part
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
    err = one_line_error(capsys, tiny(run, *RUN, "train.max_steps=3", "--resume", "auto"))
    assert part in err and "--resume" in err and str(run / "checkpoints/step-000001") in err
    # The offered checkpoint is complete: resuming from it works.
    assert main(tiny(run, *RUN, "train.max_steps=3", "--resume", str(run / "checkpoints/step-000001"))) == 0


def test_a_corrupt_random_state_is_refused_even_with_a_matching_manifest(trained, tmp_path, capsys):
    """Fails on the main of 2026-11-30: accelerate skipped an unreadable random_states file silently."""
    run = copy_run(trained, tmp_path)
    folder = run / "checkpoints/step-000002"
    (folder / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    rewrite_manifest(folder)
    err = one_line_error(capsys, tiny(run, *RUN, "train.max_steps=3", "--resume", "auto"))
    assert "random_states_0.pkl" in err


def test_an_ema_file_without_the_ema_is_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    folder = run / "checkpoints/step-000002"
    save_file({"something": torch.zeros(3)}, str(folder / "ema.safetensors"))
    rewrite_manifest(folder)
    err = one_line_error(capsys, tiny(run, *RUN, "train.max_steps=3", "--resume", "auto"))
    assert "ema.safetensors" in err

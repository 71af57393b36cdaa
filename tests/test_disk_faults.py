"""Filesystem faults (issue 10, defect 5): a read-only output folder and a full disk are one line
naming the path and the cause (with bytes free); free space is checked before a checkpoint
against the last one's size; leftover .tmp-step-N folders are removed at start. The full-disk
and read-only cases run on a real small tmpfs when this process may mount one (root)."""

import json
import shutil
import subprocess

import pytest

from ldm.cli.train_vae import main


def tiny(out, *extra):
    return [
        f"train.output_dir={out}", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
        "data.resolution=16", "data.shapes.num_images=8", "data.num_validation=0", "train.batch_size=4",
        "train.log_every=1", "scale_samples=4", "train.checkpoints_total_limit=null", "validation.every=100", *extra,
    ]


def error_line(capsys, argv):
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and not any("Traceback" in line for line in lines), lines
    return errors[0]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (skipped where mounting is not allowed); unmounted after."""
    mounted = []

    def mount(options):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_leftover_staging_folders_are_removed_at_start(tmp_path):
    """Fails on the main of 2026-11-30: a .tmp-step-N whose step is never saved again stayed forever."""
    run = tmp_path / "vae"
    assert main(tiny(run, "train.max_steps=1", "train.checkpoint_every=1")) == 0
    for name in (".tmp-step-000007", ".old-step-000001"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "model.safetensors").write_bytes(b"half")
    assert main(tiny(run, "train.max_steps=2", "train.checkpoint_every=1", "--resume", "auto")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_free_space_is_checked_before_a_checkpoint(tmp_path, capsys, monkeypatch):
    import ldm.train.disk as disk
    from ldm.train.manifest import problem_of

    run = tmp_path / "vae"
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1000)
    err = error_line(capsys, tiny(run, "train.max_steps=3", "train.checkpoint_every=1"))
    assert "not enough disk space" in err and "1000 free" in err and str(run / "checkpoints") in err
    needed = int(err.split("about ")[1].split(" bytes")[0])
    size = sum(p.stat().st_size for p in (run / "checkpoints/step-000001").rglob("*") if p.is_file())
    assert needed >= size
    # The first checkpoint was written (no earlier one to judge by) and is whole; no half-written second one.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert problem_of(run / "checkpoints/step-000001") is None


@pytest.mark.parametrize("size, whole", [("400k", 0), ("1800k", 2)], ids=["mid-write", "before-write"])
def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay_whole(tmp_path, capsys, tmpfs, size, whole):
    """Fails on the main of 2026-11-30: 'unexpected pos N vs M' traceback, no word about the disk.
    400k: the first checkpoint (~660 kB) fills the disk mid-write; 1800k: two fit, the third is
    refused before it is written, by the last one's size."""
    disk = tmpfs(f"size={size}")
    run = disk / "vae"
    err = error_line(capsys, tiny(run, "train.max_steps=40", "train.checkpoint_every=1"))
    from ldm.train.manifest import problem_of

    expected = "no space left on its disk" if whole == 0 else "not enough disk space"
    assert expected in err and " free" in err and str(run / "checkpoints") in err
    complete = sorted((run / "checkpoints").glob("step-*"))
    assert len(complete) == whole and all(problem_of(p) is None for p in complete)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written one gave its space back
    # Space freed (a bigger disk): the run resumes from the last whole checkpoint and finishes.
    bigger = tmp_path / "bigger"
    shutil.copytree(run, bigger)
    assert main(tiny(bigger, "train.max_steps=3", "train.checkpoint_every=1", "--resume", "auto")) == 0


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, tmpfs):
    """Fails on the main of 2026-11-30: a traceback from mkdir."""
    disk = tmpfs("ro,size=1m")
    err = error_line(capsys, tiny(disk / "vae", "train.max_steps=1"))
    assert str(disk / "vae") in err and "not writable" in err and "train.output_dir" in err

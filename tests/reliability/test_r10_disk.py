"""R10 (issue 10): filesystem faults while training (stage 1). A read-only output folder,
a folder turned read-only between checkpoints, a disk that fills up in the middle of a
checkpoint (and one found too full before it): each is one `error:` line naming the path
and the cause, the earlier checkpoints stay whole (their manifest check passes) and no
half-written one is left; once the folder is writable again or space is freed, the run
resumes and ends with exactly the weights of a run that never met the fault.

The disk cases run on a real small tmpfs (root may mount one); where mounting is not
allowed they are skipped, and the fault-injection case (ENOSPC raised inside the third
checkpoint's write) shows the same on any disk."""

import errno

import pytest
import torch

from bad_inputs import one_line_error, remount, tensors_of, tiny_vae_args
from ldm.cli.train_vae import main
from ldm.train.manifest import problem_of
from test_disk_faults import tmpfs  # noqa: F401  (the fixture: a fresh tmpfs, unmounted after)

STEPS = 4


def args(run, *extra):
    return tiny_vae_args(run, f"train.max_steps={STEPS}", "train.checkpoint_every=1", *extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The final model's tensors of the run that meets no fault."""
    run = tmp_path_factory.mktemp("straight") / "vae"
    assert main(args(run)) == 0
    return tensors_of(run / "final")


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def whole_checkpoints(run):
    """The names of the published checkpoints, when every one passes the manifest check; and no staging left."""
    found = sorted((run / "checkpoints").glob("step-*"))
    staging = list((run / "checkpoints").glob(".tmp-*"))
    return [p.name for p in found] if all(problem_of(p) is None for p in found) and not staging else None


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, tmpfs, record):  # noqa: F811
    disk = tmpfs("ro,size=1m")
    code = main(args(disk / "vae"))
    error = one_line_error(capsys.readouterr().err)
    held = code == 2 and error is not None and str(disk / "vae") in error and "not writable" in error
    assert record("R10", "read-only output folder", held, detail=f"exit {code}; {error}"), error


def test_a_folder_turned_read_only_then_writable_resumes_identically(tmp_path, capsys, tmpfs, straight, record):  # noqa: F811
    disk = tmpfs("size=8m")
    run = disk / "vae"
    first = main(args(run, "train.max_steps=2"))
    remount(disk, "ro")
    code = main(args(run, "--resume", "auto"))
    error = one_line_error(capsys.readouterr().err)
    kept = whole_checkpoints(run)
    remount(disk, "rw")
    again = main(args(run, "--resume", "auto"))
    same = again == 0 and identical(tensors_of(run / "final"), straight)
    held = (first == 0 and code == 2 and error is not None and "not writable" in error
            and kept == ["step-000001", "step-000002"] and same)
    assert record("R10", "folder read-only after 2 checkpoints, then writable: resume", held,
                  detail=f"exit {code}; {error}; kept {kept}; resumed final identical: {same}"), (error, kept, same)


def test_a_disk_full_in_the_middle_of_a_checkpoint(tmp_path, capsys, tmpfs, straight, record, monkeypatch):  # noqa: F811
    """A 1800 kB tmpfs holds two checkpoints (~660 kB each); the free-space check is told the disk
    has room (as when another writer fills it after the check), so the third fills it mid-write."""
    import ldm.train.checkpoint as checkpoint

    disk = tmpfs("size=1800k")
    run = disk / "vae"
    monkeypatch.setattr(checkpoint, "check_free_space", lambda folder, last: None)
    code = main(args(run))
    monkeypatch.undo()
    error = one_line_error(capsys.readouterr().err)
    kept = whole_checkpoints(run)
    remount(disk, "size=8m")  # space freed
    again = main(args(run, "--resume", "auto"))
    same = again == 0 and identical(tensors_of(run / "final"), straight)
    held = (code == 2 and error is not None and "no space left" in error and str(run / "checkpoints") in error
            and kept == ["step-000001", "step-000002"] and same)
    assert record("R10", "disk full mid-checkpoint (3rd), then space freed: resume", held,
                  detail=f"exit {code}; {error}; kept {kept}; resumed final identical: {same}"), (error, kept, same)


def test_a_disk_too_full_for_the_next_checkpoint(tmp_path, capsys, tmpfs, straight, record):  # noqa: F811
    """The free-space check (the last checkpoint's size x 1.1) refuses the third before writing it."""
    disk = tmpfs("size=1800k")
    run = disk / "vae"
    code = main(args(run))
    error = one_line_error(capsys.readouterr().err)
    kept = whole_checkpoints(run)
    remount(disk, "size=8m")
    again = main(args(run, "--resume", "auto"))
    same = again == 0 and identical(tensors_of(run / "final"), straight)
    held = (code == 2 and error is not None and "not enough disk space" in error
            and kept == ["step-000001", "step-000002"] and same)
    assert record("R10", "disk too full for the 3rd checkpoint, then space freed: resume", held,
                  detail=f"exit {code}; {error}; kept {kept}; resumed final identical: {same}"), (error, kept, same)


def test_enospc_injected_into_a_checkpoint_write(tmp_path, capsys, straight, record, monkeypatch):
    """Any disk, no mount needed: the third checkpoint's manifest write gets 100 kB out then ENOSPC."""
    import ldm.train.checkpoint as checkpoint

    calls = []
    write_manifest = checkpoint.write_manifest

    def full_on_third(folder):
        calls.append(folder)
        if len(calls) == 3:
            (folder / "junk").write_bytes(b"\0" * 100_000)
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "manifest.json"))
        return write_manifest(folder)

    monkeypatch.setattr(checkpoint, "write_manifest", full_on_third)
    run = tmp_path / "vae"
    code = main(args(run))
    monkeypatch.undo()
    error = one_line_error(capsys.readouterr().err)
    kept = whole_checkpoints(run)
    again = main(args(run, "--resume", "auto"))
    same = again == 0 and identical(tensors_of(run / "final"), straight)
    held = (code == 2 and error is not None and "no space left" in error and "manifest.json" in error
            and kept == ["step-000001", "step-000002"] and same)
    assert record("R10", "ENOSPC injected into the 3rd checkpoint's write (any disk): resume", held,
                  detail=f"exit {code}; {error}; kept {kept}; resumed final identical: {same}"), (error, kept, same)

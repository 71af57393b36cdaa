"""Filesystem faults while writing a run: one line naming the path and the cause.

A full disk inside torch.save reads `unexpected pos 3257600 vs 3257488`, a read-only folder
a PermissionError traceback; neither names the disk. Before a checkpoint is written the free
space is checked against the size of the last one; a write that fails all the same is
reported with the path, the cause and the bytes free.
"""

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from ldm.errors import LdmError

MARGIN = 1.1  # a new checkpoint is about the size of the last; leave a little room
FULL = 1 << 20  # fewer free bytes than this after a failed write: the disk is full


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, last_checkpoint) -> None:
    """Refuse to start writing a checkpoint that would not fit, judged by the last one's size."""
    if last_checkpoint is None:
        return
    need = int(folder_size(last_checkpoint) * MARGIN)
    free = free_bytes(folder)
    if free < need:
        raise LdmError(
            f"not enough disk space for a checkpoint in {folder}: about {need} bytes needed (the last one, "
            f"{Path(last_checkpoint).name}, took {folder_size(last_checkpoint)}), {free} free; free some space or "
            "lower train.checkpoints_total_limit, then resume with --resume auto"
        )


@contextmanager
def writing(what: str, path):
    """Turn a filesystem failure while writing `what` at `path` into one line (path, cause, bytes free)."""
    try:
        yield
    except OSError as e:
        raise LdmError(f"cannot write {what} {path}: {describe(e, path)}") from None
    except RuntimeError as e:
        # torch.save's zip writer reports a full disk as "unexpected pos N vs M" or a failed write.
        if "unexpected pos" in str(e) or "PytorchStreamWriter" in str(e) or "file write failed" in str(e):
            free = free_bytes(path)
            cause = f"no space left on its disk ({free} bytes free)" if free < FULL else f"the write failed ({free} bytes free)"
            raise LdmError(f"cannot write {what} {path}: {cause}; free some space, then resume with --resume auto") from None
        raise


def describe(e: OSError, path) -> str:
    where = e.filename or path
    if e.errno == errno.ENOSPC:
        return f"no space left on the disk of {where} ({free_bytes(path)} bytes free); free some space, then resume with --resume auto"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where} is not writable ({e.strerror}); set train.output_dir to a writable folder"
    return f"{e.strerror or e} ({where})"

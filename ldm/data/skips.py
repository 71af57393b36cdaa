"""The skip report: which items of the data set were left out of training, and why.

A run on scraped data meets captions that are not UTF-8 or are empty, and images that do
not decode (corrupt, truncated, a decompression bomb); those items are skipped rather than
ending the run, and named in the run folder's skipped.jsonl ({"path", "reason"} a line)
with a one-line summary, so that trained + held out + skipped = total is there to check.

Bad captions are known when the data set is built and written at the start. Images are
found unreadable only when decoded, often in a DataLoader worker process, whose copy of
the data set the main process never sees: so every process (worker or not, any rank)
appends its own finds to skipped.jsonl as it meets them (`note_skip`, one short line per
append, atomic on a local or shared file system), and the main process reads the file
back, without duplicates, for the summary at the end of training (`finish_skip_report`).
The summary's "trained" counts the images not found bad: an image the run never decoded
(a run shorter than an epoch) counts as trained.
"""

import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

from torch.utils.data import Subset

SKIPPED = "skipped.jsonl"
logger = logging.getLogger("ldm.data")


def base_dataset(dataset):
    """The data set under any Subset wrappers (the train split is a Subset of the folder)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def note_skip(log: Optional[Path], path: str, reason: str, warn: logging.Logger = logger) -> None:
    """`path` was skipped for `reason`: a warning on `warn` (through tqdm while a run's bar
    shows, see the training loop) and, when the run set `log`, a line appended to its skipped.jsonl."""
    warn.warning("skipping %s (%s)", path, reason)
    if log is not None:
        line = (json.dumps({"path": path, "reason": reason}) + "\n").encode()
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line: appends from several processes do not interleave
        finally:
            os.close(fd)


def read_skip_report(path: Path) -> List[Tuple[str, str]]:
    """(path, reason) of each item skipped.jsonl names, the first reason of each, in file order."""
    seen = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
                seen.setdefault(row["path"], row["reason"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line (a kill mid-append)
    return list(seen.items())


def write_skip_report(accelerator, run_dir, dataset, resuming: bool = False) -> None:
    """Start the skip report: every process's data set appends its decode failures to
    run_dir/skipped.jsonl from now on; the main process writes the bad captions known now
    (keeping, on a resume, what the earlier part of the run found) and prints the summary."""
    base = base_dataset(dataset)
    if not hasattr(base, "skip_log"):  # a data set that skips nothing (the shapes)
        return
    path = Path(run_dir) / SKIPPED
    base.skip_log = path  # set before the loader's workers start, so that their copies carry it
    skipped = getattr(base, "skipped", None)
    if accelerator.is_main_process:
        earlier = read_skip_report(path) if resuming else []
        known = {p for p, _ in skipped or []}
        rows = list(skipped or []) + [(p, r) for p, r in earlier if p not in known]
        path.write_text("".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in rows))
        if skipped is not None:
            total = len(base) + len(skipped)
            held_out = len(base) - len(dataset)
            accelerator.print(
                f"data: {len(dataset)} trained + {held_out} held out for validation + {len(skipped)} skipped = {total} images"
                + (f"; the skipped ones and why: {path}" if skipped else "")
            )
    accelerator.wait_for_everyone()  # the file is there before any worker appends to it


def finish_skip_report(accelerator, run_dir, dataset) -> None:
    """At the end of training (main process): skipped.jsonl without duplicates (each worker
    of each process names the images it found unreadable), and the summary with them."""
    base = base_dataset(dataset)
    if not accelerator.is_main_process or not hasattr(base, "skip_log"):
        return
    path = Path(run_dir) / SKIPPED
    rows = read_skip_report(path)
    tmp = path.with_name(f".{SKIPPED}.tmp")
    tmp.write_text("".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in rows))
    os.replace(tmp, path)
    captions = {p for p, _ in getattr(base, "skipped", None) or []}
    unreadable = {p for p, _ in rows} - captions
    samples = getattr(base, "samples", None)
    if samples is None:  # a shard stream: no list of items to count against
        if unreadable:
            accelerator.print(f"data: {len(unreadable)} samples skipped as undecodable; the list and why: {path}")
        return
    whole = not isinstance(dataset, Subset) or dataset.dataset is not base  # a Subset of a Subset: not split here
    train = [str(p) for p, _ in samples] if whole else [str(samples[i][0]) for i in dataset.indices]
    bad_trained = len(unreadable & set(train))
    held_out = len(base) - len(train)
    bad_held_out = len(unreadable & {str(p) for p, _ in samples}) - bad_trained
    total = len(base) + len(captions)
    skipped = len(captions) + bad_trained + bad_held_out
    accelerator.print(
        f"data at the end of training: {len(train) - bad_trained} trained + {held_out - bad_held_out} held out for "
        f"validation + {skipped} skipped = {total} images"
        + (f" ({skipped - len(captions)} found unreadable while training); the skipped ones and why: {path}" if skipped else "")
    )

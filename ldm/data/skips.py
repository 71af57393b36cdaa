"""The skip report: which items of the data set were left out of training, and why.

A run on scraped data meets captions that are not UTF-8 or are empty; those items are
skipped (data.bad_captions=skip) rather than ending the run, and named in the run folder's
skipped.jsonl ({"path", "reason"} a line) with a one-line summary, so that
trained + held out + skipped = total is there to check.
"""

import json
from pathlib import Path

from torch.utils.data import Subset

SKIPPED = "skipped.jsonl"


def base_dataset(dataset):
    """The data set under any Subset wrappers (the train split is a Subset of the folder)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def write_skip_report(accelerator, run_dir, dataset) -> None:
    """Write run_dir/skipped.jsonl and print the summary (main process), when the data set skipped items."""
    base = base_dataset(dataset)
    skipped = getattr(base, "skipped", None)
    if not accelerator.is_main_process or skipped is None:
        return
    path = Path(run_dir) / SKIPPED
    path.write_text("".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in skipped))
    total = len(base) + len(skipped)
    held_out = len(base) - len(dataset)
    accelerator.print(
        f"data: {len(dataset)} trained + {held_out} held out for validation + {len(skipped)} skipped = {total} images"
        + (f"; the skipped ones and why: {path}" if skipped else "")
    )

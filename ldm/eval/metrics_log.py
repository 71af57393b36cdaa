"""metrics.jsonl as the report reads it: series per key, and which keys go in which figure.

Every line is one JSON record with "step" and any number of scalar keys; a step may have
several records (the training log and a validation record). The report groups keys by name:

    step, time_s, epoch         the x axis and bookkeeping (not plotted)
    lr, lr_*                    learning rate(s)
    *_per_s                     throughput (images_per_s, samples_per_s, ...)
    val_loss                    stage-2 validation loss over the held-out split (all timesteps)
    val_loss_t{T}               the same at timestep bucket T (an integer, e.g. val_loss_t250)
    val_loss_ema, val_loss_ema_t{T}   the same with the EMA weights (any val_loss* family: one figure each)
    val_psnr, val_ssim, val_mae (and any other val_*)   validation metrics, e.g. stage-1 reconstructions
    eval_*                      evaluation during training (eval_fid, eval_clip_score, eval_adherence, ...)
    anything else numeric       training losses (loss, rec_loss, kl, ...), drawn raw and smoothed

A torn last line (a run being written, or killed mid-write) is skipped.
"""

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Tuple

BOOKKEEPING = ("step", "time_s", "epoch")
BUCKET = re.compile(r"^(?P<family>val_loss\w*?)_t(?P<t>\d+)$")


def read_records(path: Path) -> List[dict]:
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def series(records: List[dict]) -> Dict[str, Tuple[List[float], List[float]]]:
    """key -> (steps, values) over the records that carry it (numbers only; bools and NaN-free strings skipped)."""
    out: Dict[str, Tuple[List[float], List[float]]] = {}
    for r in records:
        for key, value in r.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(r["step"])
            values.append(float(value) if math.isfinite(value) else math.nan)
    return out


def group_keys(keys) -> Dict[str, object]:
    """{"losses": [...], "lr": [...], "throughput": [...], "val_loss": {family: {"overall": key|None,
    "buckets": [(T, key), ...]}}, "validation": [...], "eval": [...]} in a stable order."""
    groups = {"losses": [], "lr": [], "throughput": [], "val_loss": {}, "validation": [], "eval": []}
    for key in sorted(keys):
        bucket = BUCKET.match(key)
        if key in BOOKKEEPING:
            continue
        if key == "lr" or key.startswith("lr_"):
            groups["lr"].append(key)
        elif key.endswith("_per_s"):
            groups["throughput"].append(key)
        elif bucket:
            family = groups["val_loss"].setdefault(bucket["family"], {"overall": None, "buckets": []})
            family["buckets"].append((int(bucket["t"]), key))
        elif key.startswith("val_loss"):
            groups["val_loss"].setdefault(key, {"overall": None, "buckets": []})["overall"] = key
        elif key.startswith("val_"):
            groups["validation"].append(key)
        elif key.startswith("eval_"):
            groups["eval"].append(key)
        else:
            groups["losses"].append(key)
    for family in groups["val_loss"].values():
        family["buckets"].sort()
    return groups

"""Judging a model and a run: validation loss, image metrics from local weights, the evaluation sweep, the run report.

    validation_loss.py  the held-out loss at fixed noise levels and fixed noise (raw and EMA weights)
    weights.py      local weight files: one-line errors naming the file and where to get it
    inception.py    the FID Inception network from torch-fidelity's local weights file
    fid_kid.py      FID and KID (torchmetrics) on one pass of the Inception network
    clip_score.py   CLIP score from a local CLIP (open_clip name + weights file, or a transformers folder)
    sweep.py        ldm-eval's images: prompts x guidance scales x step counts, resumable, split across processes
    scores.py       ldm-eval's numbers per point, its table, JSON and trade-off plot
    plots.py        matplotlib (Agg) figures as PNG bytes
    metrics_log.py  metrics.jsonl as the report reads it (the keys and their figures)
    machine.py      the machine a report or evaluation was made on
    report.py       ldm-report: RUN_DIR/report.html, one self-contained file

Nothing here downloads: every network is a local file, and a metric asked for without
its file is an `LdmError` that names the file and where users get it.
"""

"""ldm-report: RUN_DIR/report.html, the page people open instead of reading logs.

One self-contained HTML file: plots (matplotlib, Agg) and images are embedded as base64
data URIs, the style is inline, there is no script and no network request, so the file
can be mailed, archived or opened offline. For each run folder it shows

- loss curves (raw and smoothed) and the learning rate, from metrics.jsonl;
- validation loss over steps per timestep bucket (`val_loss`, `val_loss_t{T}`, ...);
- validation metrics (stage 1: `val_psnr`, `val_ssim`, `val_mae`) and evaluation metrics (`eval_*`);
- throughput (`*_per_s`);
- the validation sample grids (stage 2) or reconstruction grids (stage 1) over time, side by side;
- the checkpoints, the config, and the machine the report was written on.

`write_report([dir, ...], out)` puts several runs on one page (the demo: both stages and
the control runs). See `ldm.eval.metrics_log` for the metrics.jsonl keys.
"""

import base64
import html
import json
import re
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ldm.errors import LdmError
from ldm.eval.machine import machine_info
from ldm.eval.metrics_log import group_keys, read_records, series
from ldm.eval.plots import line_plot

MAX_GRIDS = 12  # sample grids shown per run: evenly spaced, always the first and the last
STEP_IMAGE = re.compile(r"^step-(\d+)\.png$")
STEP_FOLDER = re.compile(r"^step-(\d+)$")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff;max-width:1500px}
h1{font-size:22px} h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:15px;margin:18px 0 6px}
.plots{display:flex;flex-wrap:wrap;gap:10px} .plots img{border:1px solid #eee;max-width:100%}
.grids{display:flex;gap:10px;overflow-x:auto;padding-bottom:8px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px;color:#555}
.grids img{image-rendering:pixelated;border:1px solid #ccc;height:auto}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} pre{background:#f7f7f7;padding:10px;font-size:12px;max-height:420px;overflow:auto}
.note{color:#777;font-size:13px} nav a{margin-right:14px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, width: Optional[int] = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}"{size}>'


def _evenly(items: Sequence, k: int) -> list:
    if len(items) <= k:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def stage_of(config_text: str) -> str:
    """'vae', 'unet' or 'control' from a run's config.yaml (by the keys only that stage has)."""
    if re.search(r"^controlnet|^adapter|^control:|^base_model", config_text, re.M):
        return "control"
    if re.search(r"^vae_path:", config_text, re.M):
        return "unet"
    return "vae" if re.search(r"^loss:", config_text, re.M) else "unknown"


def plots_section(records: List[dict]) -> str:
    data = series(records)
    groups = group_keys(data)
    parts = []
    # A key logged once (e.g. the VAE's measured scaling_factor) is a number, not a curve.
    once = {k: data[k] for k in groups["losses"] + groups["validation"] + groups["eval"] if len(data[k][1]) == 1}
    for key in ("losses", "validation", "eval"):
        groups[key] = [k for k in groups[key] if k not in once]

    def block(title: str, figures: List[str], note: str = "") -> None:
        if figures:
            parts.append(f"<h3>{title}</h3>" + (f'<p class="note">{note}</p>' if note else "")
                         + '<div class="plots">' + "".join(figures) + "</div>")

    block("Training losses", [img(line_plot({k: data[k]}, k, smooth=True), k) for k in groups["losses"]],
          "faint: each logged value (the mean over a log interval); solid: smoothed (debiased EMA over ~5% of the points)")
    block("Learning rate", [img(line_plot({k: data[k] for k in groups["lr"]}, "learning rate"), "learning rate")]
          if groups["lr"] else [])
    val_figures = []
    for family, members in groups["val_loss"].items():
        lines = {f"t={t}": data[key] for t, key in members["buckets"]}
        if members["overall"]:
            lines["all timesteps"] = data[members["overall"]]
        val_figures.append(img(line_plot(lines, family, emphasize="all timesteps"), family))
    block("Validation loss per timestep bucket", val_figures,
          "held-out images, fixed timesteps and fixed noise: comparable from step to step")
    block("Validation metrics", [img(line_plot({k: data[k]}, k), k) for k in groups["validation"]])
    block("Evaluation metrics", [img(line_plot({k: data[k]}, k), k) for k in groups["eval"]])
    block("Throughput", [img(line_plot({k: data[k] for k in groups["throughput"]}, "throughput", smooth=True),
                             "throughput")] if groups["throughput"] else [],
          "training time only (checkpoints and validation excluded)")
    if once:
        parts.append('<p class="note">logged once: ' + html.escape(", ".join(
            f"{k} {v[0]:.4g} (step {s[0]:g})" for k, (s, v) in once.items())) + "</p>")
    if records:
        latest = {}
        for r in records:  # each key's latest value (training and validation records alternate)
            latest.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in latest.items())
        parts.insert(0, f'<p class="note">{len(records)} records; latest values: {html.escape(summary)}</p>')
    return "".join(parts) or '<p class="note">no metrics.jsonl records yet</p>'


def grids_section(samples: Path, stage: str) -> str:
    found = sorted((int(m[1]), p) for p in samples.glob("step-*.png") if (m := STEP_IMAGE.match(p.name)))
    if not found:
        return ""
    shown = _evenly(found, MAX_GRIDS)
    title = ("Reconstruction grids (top: held-out images, bottom: their reconstructions)" if stage == "vae"
             else "Validation sample grids")
    note = f"{len(shown)} of {len(found)} grids, evenly spaced" if len(shown) < len(found) else f"{len(found)} grids"
    figures = []
    for step, path in shown:
        from PIL import Image

        with Image.open(path) as im:
            width = im.width * max(1, 256 // max(im.height, 1))  # small grids shown enlarged, pixel-sharp
        figures.append(f"<figure>{img(path.read_bytes(), f'step {step}', width=min(width, 900))}"
                       f"<figcaption>step {step}</figcaption></figure>")
    return f'<h3>{title}</h3><p class="note">{note}, scroll sideways</p><div class="grids">{"".join(figures)}</div>'


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoints_section(run: Path) -> str:
    folders = sorted((int(m[1]), p) for p in (run / "checkpoints").glob("step-*") if (m := STEP_FOLDER.match(p.name)))
    rows = []
    for step, path in folders:
        complete = (path / "checkpoint.json").is_file()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))
        rows.append(f"<tr><td>{html.escape(path.name)}</td><td>{step}</td><td>{folder_size(path) / 2**20:.1f} MB</td>"
                    f"<td>{stamp}</td><td>{'yes' if complete else 'no (being written or torn)'}</td></tr>")
    final = run / "final"
    tail = (f'<p>final model: <code>{html.escape(str(final))}</code> ({folder_size(final) / 2**20:.1f} MB)</p>'
            if final.is_dir() else '<p class="note">no final/ model yet</p>')
    if not rows:
        return "<h3>Checkpoints</h3><p class=\"note\">none</p>" + tail
    return ("<h3>Checkpoints</h3><table><tr><th>folder</th><th>step</th><th>size</th><th>written</th><th>complete</th></tr>"
            + "".join(rows) + "</table>" + tail)


def evaluations_section(run: Path) -> str:
    """ldm-eval results found in the run folder (RUN_DIR/eval*/eval.json): the table and the trade-off plot."""
    from ldm.eval.scores import COLUMNS

    parts = []
    for path in sorted(run.glob("eval*/eval.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            points = result["points"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        shown = [c for c in COLUMNS if any(p.get(c) is not None for p in points)]
        head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in shown)
        body = "".join("<tr>" + "".join(f"<td>{_cell(p.get(c))}</td>" for c in shown) + "</tr>" for p in points)
        plot = path.parent / "tradeoff.png"
        parts.append(f"<h3>Evaluation: {html.escape(str(path.parent.name))}</h3>"
                     f'<p class="note">{html.escape(str(result.get("prompts", "")))}; {result.get("num_prompts", "?")} prompts</p>'
                     f"<table><tr>{head}</tr>{body}</table>"
                     + (f'<div class="plots">{img(plot.read_bytes(), "trade-off plot")}</div>' if plot.is_file() else ""))
    return "".join(parts)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def run_section(run: Path, anchor: str) -> str:
    config_path = run / "config.yaml"
    config = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else ""
    stage = stage_of(config)
    stage_name = {"vae": "stage 1: KL autoencoder", "unet": "stage 2: latent U-Net", "control": "control model"}.get(stage, "")
    records = read_records(run / "metrics.jsonl")
    parts = [f'<h2 id="{anchor}">{html.escape(str(run))}{" — " + stage_name if stage_name else ""}</h2>',
             plots_section(records), evaluations_section(run), grids_section(run / "samples", stage),
             checkpoints_section(run)]
    parts.append("<h3>Config</h3>" + (f"<pre>{html.escape(config)}</pre>" if config else '<p class="note">no config.yaml</p>'))
    return "".join(parts)


def machine_section() -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in machine_info().items())
    return f"<h2 id=\"machine\">Machine (where this report was written)</h2><table>{rows}</table>"


def render(runs: Sequence[Path], title: str) -> str:
    anchors = [f"run-{i}" for i in range(len(runs))]
    nav = "".join(f'<a href="#{a}">{html.escape(r.name or str(r))}</a>' for a, r in zip(anchors, runs))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    body = "".join(run_section(r, a) for r, a in zip(runs, anchors))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
            f'<h1>{html.escape(title)}</h1><p class="note">written {stamp}</p><nav>{nav}<a href="#machine">machine</a></nav>'
            f"{body}{machine_section()}</body></html>\n")


def write_report(run_dirs: Iterable, out=None, title: Optional[str] = None) -> Path:
    """Write one self-contained HTML page for `run_dirs` (default out: the single run's report.html)."""
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise LdmError("no run folder given: ldm-report RUN_DIR [RUN_DIR ...]")
    for run in runs:
        if not run.is_dir():
            raise LdmError(f"no run folder at {run} (a training run's output_dir, with metrics.jsonl and config.yaml)")
    if out is None:
        if len(runs) > 1:
            raise LdmError("several run folders go on one page: name it with --out PATH.html")
        out = runs[0] / "report.html"
    out = Path(out)
    page = render(runs, title or (f"ldm run report: {runs[0]}" if len(runs) == 1 else "ldm runs report"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader (or a browser reloading) never sees half a page
    return out


DEMO_RUNS = ("vae", "unet", "controlnet", "t2i-adapter")  # ldm-demo's run folders, in the order they train


def write_demo_report(demo_dir="runs/demo") -> Path:
    """DEMO_DIR/report.html over the demo's run folders that exist (both stages, and the control runs when they ran)."""
    demo_dir = Path(demo_dir)
    runs = [demo_dir / name for name in DEMO_RUNS if (demo_dir / name).is_dir()]
    if not runs:
        raise LdmError(f"no demo run folders ({', '.join(DEMO_RUNS)}) in {demo_dir}: run ldm-demo first")
    return write_report(runs, demo_dir / "report.html", title=f"ldm demo: {demo_dir}")

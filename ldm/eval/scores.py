"""ldm-eval's numbers: each (step count, guidance scale) point scored by the metrics asked for, then a
JSON, a console table and the trade-off plot.

    fid, kid, kid_std   against the real held-out images (Inception from a local file)
    clip_score          images against their own prompts (a local CLIP)
    adherence           shapes only: the fraction of images whose colour and kind match the prompt
                        (ldm.data.checker, as ldm-demo scores it)

The plot is the Stable Diffusion papers' FID against CLIP score over guidance scales when
both are there; otherwise each metric there is against the guidance scale.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from ldm.eval.plots import line_plot, tradeoff_plot

COLUMNS = ("steps", "guidance_scale", "images", "fid", "kid", "clip_score", "adherence")


def score_point(images, prompts, inception=None, clip=None, shapes: bool = False) -> Dict[str, float]:
    """The metrics of one point's images (uint8 (N, 3, H, W)) and their prompts."""
    out = {}
    if inception is not None:
        inception.reset_generated()
        for i in range(0, len(images), 64):
            inception.update(images[i : i + 64], real=False)
        out.update(inception.compute())
    if clip is not None:
        out["clip_score"] = clip(images, prompts)
    if shapes:
        from ldm.data.checker import adherence

        out["adherence"] = adherence(list(images.permute(0, 2, 3, 1).numpy()), prompts)
    return out


def format_table(points: List[dict]) -> str:
    def cell(value, key):
        if value is None:
            return "-"
        if key in ("steps", "images"):
            return str(value)
        if key == "guidance_scale":
            return f"{value:g}"
        return f"{value:.4g}" if key != "adherence" else f"{value:.3f}"

    shown = [c for c in COLUMNS if any(p.get(c) is not None for p in points)]
    rows = [[c.replace("_", " ") for c in shown]] + [[cell(p.get(c), c) for c in shown] for p in points]
    widths = [max(len(r[i]) for r in rows) for i in range(len(shown))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def plot_points(points: List[dict], path: Path) -> Optional[Path]:
    """tradeoff.png: FID against CLIP score (one curve per step count), else metrics against guidance scale."""
    several_steps = len({p["steps"] for p in points}) > 1
    if all(p.get("fid") is not None and p.get("clip_score") is not None for p in points):
        png = tradeoff_plot(points, x="clip_score", y="fid", group="steps" if several_steps else None,
                            title="FID against CLIP score over guidance scales")
    else:
        metric = next((m for m in ("adherence", "fid", "clip_score", "kid") if all(p.get(m) is not None for p in points)), None)
        if metric is None:
            return None
        series = {}
        for p in sorted(points, key=lambda p: p["guidance_scale"]):
            xs, ys = series.setdefault(f"{p['steps']} steps", ([], []))
            xs.append(p["guidance_scale"])
            ys.append(p[metric])
        png = line_plot(series, f"{metric.replace('_', ' ')} against guidance scale", ylabel=metric, xlabel="guidance scale")
    path.write_bytes(png)
    return path


def write_json(result: dict, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path

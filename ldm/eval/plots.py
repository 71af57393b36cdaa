"""The report's and ldm-eval's figures: matplotlib with the Agg backend (no display), as PNG bytes.

Curves are drawn raw (faint) and smoothed (solid). The smoothing is TensorBoard's:
an exponential moving average, debiased at the start (Kingma & Ba's bias correction),
so the first points are not pulled towards 0; its window grows with the number of points.
"""

import io
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SMOOTHING_SPAN = 0.05  # the running average spans ~5% of the points (TensorBoard's fixed 0.9 lags on short runs)
Series = Tuple[Sequence[float], Sequence[float]]  # (steps, values)


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # before pyplot: never a window, never a display
    import matplotlib.pyplot as plt

    return plt


def smoothing_weight(n: int) -> float:
    """The EMA weight whose window (1 / (1 - w) points) is SMOOTHING_SPAN of `n` points, at most 0.95."""
    return min(max(1.0 - 1.0 / max(SMOOTHING_SPAN * n, 1.0), 0.0), 0.95)


def smoothed(values: Sequence[float], weight: Optional[float] = None) -> np.ndarray:
    """Debiased exponential moving average: m_t = w m_{t-1} + (1 - w) v_t, s_t = m_t / (1 - w^t);
    NaN values are skipped. Default weight: `smoothing_weight(len(values))`."""
    weight = smoothing_weight(len(values)) if weight is None else weight
    out, running, count = [], 0.0, 0
    for v in values:
        if np.isfinite(v):
            count += 1
            running = weight * running + (1 - weight) * v
        out.append(running / (1 - weight**count) if count else np.nan)
    return np.asarray(out, dtype=np.float64)


def to_png(fig) -> bytes:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _log_scale_fits(series: Dict[str, Series]) -> bool:
    """A log axis when every value is positive and they span more than a factor of 20 (losses usually do)."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in series.values()] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    return values.size > 1 and values.min() > 0 and values.max() / values.min() > 20


def line_plot(series: Dict[str, Series], title: str, ylabel: str = "", smooth: bool = False,
              xlabel: str = "step", emphasize: Optional[str] = None) -> bytes:
    """One axes: a line per series (raw faint + smoothed when `smooth`); `emphasize` is drawn thick and black."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    for i, (label, (x, y)) in enumerate(series.items()):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        style = dict(color="black", linewidth=2.2, zorder=3) if label == emphasize else dict(color=f"C{i % 10}", linewidth=1.3)
        if smooth and smoothing_weight(len(y)) > 0:  # short runs: a window of one point would smooth nothing
            ax.plot(x, y, alpha=0.25, linewidth=1.0, color=style["color"])
            ax.plot(x, smoothed(y), label=f"{label} (smoothed)", **style)
        else:
            ax.plot(x, y, marker="o" if len(y) < 30 else None, markersize=3, label=label, **style)
    if _log_scale_fits(series):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or smooth:
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    return to_png(fig)


def tradeoff_plot(points: List[dict], x: str, y: str, label: str = "guidance_scale", group: Optional[str] = None,
                  title: str = "") -> bytes:
    """One curve per `group` value through the (x, y) points in order of `label`, each point annotated with it
    (the Stable Diffusion papers' FID against CLIP score over guidance scales)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    groups = {}
    for p in points:
        if p.get(x) is not None and p.get(y) is not None:
            groups.setdefault(p.get(group) if group else None, []).append(p)
    for i, (key, members) in enumerate(groups.items()):
        members = sorted(members, key=lambda p: p[label])
        xs, ys = [p[x] for p in members], [p[y] for p in members]
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=None if key is None else f"{group} = {key}")
        for p in members:
            ax.annotate(f"{p[label]:g}", (p[x], p[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title or f"{y} against {x} (points: {label.replace('_', ' ')})", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    return to_png(fig)

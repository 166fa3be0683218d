"""The loss plot of a run (redrawn at every evaluation).

Left: the whole run on a log loss axis. Right: the last part zoomed in (from where the CAGE
lambda turns on, else the last quarter), where the methods differ by hundredths of a nat and
the full-range axis shows them as one line.
"""

from __future__ import annotations

from pathlib import Path

from ..data import SPLITS
from .checkpoint import _atomic_write


def _running_mean(values: list[float], k: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def _draw(ax, history: dict, lambda_on_step: float | None, start: float = 0.0) -> list[float]:
    """The curves from step ``start`` on; returns the losses drawn (to fit a zoomed axis)."""
    drawn = []
    train = history["train_loss"]
    steps = range(1, len(train) + 1)
    if train:
        keep = [i for i in range(len(train)) if steps[i] >= start]
        ax.plot([steps[i] for i in keep], [train[i] for i in keep], lw=0.6, alpha=0.35, color="C0", label="train (per step)")
        k = max(1, len(train) // 50)
        if k > 1:
            smooth = _running_mean(train, k)
            ax.plot([steps[i] for i in keep], [smooth[i] for i in keep], lw=1.2, color="C0", label=f"train ({k}-step mean)")
            drawn += [smooth[i] for i in keep]
        else:
            drawn += [train[i] for i in keep]
    for i, split in enumerate(SPLITS[1:]):
        pts = [(e["step"], e["loss"]) for e in history["evals"] if e["split"] == split and e["step"] >= start]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=4, color=f"C{i + 1}", label=split)
            drawn += [loss for _, loss in pts]
    if lambda_on_step is not None:
        ax.axvline(lambda_on_step, color="grey", ls="--", lw=1, label="CAGE lambda > 0 from here")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return drawn


def save_plot(path: Path, history: dict, title: str, lambda_on_step: float | None = None,
              total_steps: int | None = None) -> bool:
    """Loss curves to a PNG; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    whole, zoom = fig.subplots(1, 2)
    _draw(whole, history, lambda_on_step)
    whole.set_yscale("log")
    whole.yaxis.set_major_formatter(ScalarFormatter())
    whole.yaxis.set_minor_formatter(ScalarFormatter())
    whole.set_ylabel("cross-entropy (nats / byte)")
    whole.set_title(title)
    whole.legend(loc="upper right")  # loss falls from the upper left; "best" is slow on long runs
    total = total_steps or max([len(history["train_loss"])] + [e["step"] for e in history["evals"]])
    start = lambda_on_step if lambda_on_step is not None else 0.75 * total
    drawn = _draw(zoom, history, lambda_on_step, start=start * 0.95)
    if drawn:
        lo, hi = min(drawn), max(drawn)
        pad = 0.05 * (hi - lo) or 0.01
        zoom.set_ylim(lo - pad, hi + pad)
    zoom.set_xlim(start * 0.95, max(total, start + 1) + 0.02 * total)
    zoom.set_title("from lambda on" if lambda_on_step is not None else "last quarter")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return True

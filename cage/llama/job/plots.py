"""The loss plot of a run."""

from __future__ import annotations

from pathlib import Path

from ..data import SPLITS
from .checkpoint import _atomic_write


def save_plot(path: Path, history: dict, title: str, lambda_on_step: float | None = None) -> bool:
    """Loss curves to a PNG; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = history["train_loss"]
    if train:
        ax.plot(range(1, len(train) + 1), train, lw=0.6, alpha=0.35, color="C0", label="train (per step)")
        k = max(1, len(train) // 50)
        if k > 1:
            smooth = [sum(train[max(0, i - k + 1) : i + 1]) / len(train[max(0, i - k + 1) : i + 1]) for i in range(len(train))]
            ax.plot(range(1, len(train) + 1), smooth, lw=1.2, color="C0", label=f"train ({k}-step mean)")
    for i, split in enumerate(SPLITS[1:]):
        pts = [(e["step"], e["loss"]) for e in history["evals"] if e["split"] == split]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=4, color=f"C{i + 1}", label=split)
    if lambda_on_step is not None:
        ax.axvline(lambda_on_step, color="grey", ls="--", lw=1, label="CAGE lambda > 0 from here")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return True

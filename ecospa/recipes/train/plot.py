"""Training curves as a PNG: validation loss vs step and vs wall clock, parameter count and training
memory (weights + gradients + optimizer state) vs step.

Uses matplotlib's non-interactive Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_curves", "pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` (parent folders made), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_curves(series: Sequence[Mapping], path: str | Path, *, title: str = "") -> Path:
    """Draw one line per series and save the figure to ``path``.

    Each series is a mapping with ``label`` and the run summary fields ``history`` (a list of
    ``{"step", "train_seconds", "val_loss", ...}``) and ``param_trace`` (``[[step, params], ...]``);
    optional ``state_trace`` (``[[step, bytes], ...]``: weights + gradients + optimizer state after
    each step where it changed; a fourth panel when any series has it) and ``band``: ``{"step":
    [...], "lo": [...], "hi": [...]}`` shaded around the loss.
    Returns the path written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    memory = any(s.get("state_trace") for s in series)
    fig, axes = pyplot().subplots(1, 4 if memory else 3, figsize=(21 if memory else 16, 4.6))
    ax_step, ax_wall, ax_params = axes[:3]
    for s in series:
        h = s["history"]
        steps = [p["step"] for p in h]
        wall = [p["train_seconds"] for p in h]
        loss = [p["val_loss"] for p in h]
        (line,) = ax_step.plot(steps, loss, label=s["label"], lw=1.6)
        band = s.get("band")
        if band:
            ax_step.fill_between(band["step"], band["lo"], band["hi"], color=line.get_color(), alpha=0.15)
        ax_wall.plot(wall, loss, label=s["label"], lw=1.6, color=line.get_color())
        trace = s["param_trace"]
        last_step = steps[-1] if steps else trace[-1][0]
        xs = [t[0] for t in trace] + [last_step]
        ys = [t[1] / 1e3 for t in trace] + [trace[-1][1] / 1e3]
        ax_params.step(xs, ys, where="post", label=s["label"], lw=1.6, color=line.get_color())
        mem = s.get("state_trace")
        if memory and mem:
            axes[3].step([t[0] for t in mem] + [last_step], [t[1] / 2 ** 20 for t in mem] + [mem[-1][1] / 2 ** 20],
                         where="post", label=s["label"], lw=1.6, color=line.get_color())
    lo = min((p["val_loss"] for s in series for p in s["history"][1:]), default=None)
    hi = max((p["val_loss"] for s in series for p in s["history"][1:]), default=None)
    for ax in (ax_step, ax_wall):
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
        if lo is not None and hi is not None and hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax_step.set_xlabel("optimizer step")
    ax_wall.set_xlabel("training wall clock (s, evaluation excluded)")
    ax_params.set_xlabel("optimizer step")
    ax_params.set_ylabel("parameters (thousands)")
    ax_params.grid(alpha=0.3)
    ax_step.set_title("validation loss vs step")
    ax_wall.set_title("validation loss vs wall clock")
    ax_params.set_title("model size vs step")
    ax_params.legend(fontsize=8)
    if memory:
        axes[3].set_xlabel("optimizer step")
        axes[3].set_ylabel("MiB")
        axes[3].set_title("training memory: weights + grads + optimizer")
        axes[3].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)

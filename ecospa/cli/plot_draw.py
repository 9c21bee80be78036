"""The figures of ``ecospa plot`` (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ecospa.recipes.train.plot import pyplot, save_figure

__all__ = ["parse_name", "draw_widths", "draw_params"]

_NAME = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<kind>qk|vo|ffn|glu|linear)(?:\.head(?P<head>\d+)|\.(?P<idx>\d+))?$")


def parse_name(name: str) -> tuple[str, str, int]:
    """``(module path, kind, head or index)`` of a coupling name such as ``h.3.attn.qk.head2``."""
    m = _NAME.match(name)
    if m is None:
        return name, "other", 0
    return m["prefix"] or "<root>", m["kind"], int(m["head"] or m["idx"] or 0)


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _short(labels: list[str]) -> list[str]:
    """Labels without the dotted prefix they all share."""
    if len(labels) < 2:
        return labels
    parts = [lab.split(".") for lab in labels]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return [".".join(p[k:]) for p in parts]


def _heat(ax, cells: dict[tuple[str, int], tuple[int | None, int]], title: str, cmap) -> object | None:
    if not cells:
        ax.set_title(f"{title}: none")
        ax.axis("off")
        return None
    rows = sorted({r for r, _ in cells}, key=_natural)
    cols = max(h for _, h in cells) + 1
    frac = np.full((len(rows), cols), np.nan)
    for (r, h), (dense, kept) in cells.items():
        frac[rows.index(r), h] = kept / dense if dense else np.nan
    im = ax.imshow(np.ma.masked_invalid(frac), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if len(rows) * cols <= 600:
        for (r, h), (dense, kept) in cells.items():
            f = kept / dense if dense else 0.0
            ax.text(h, rows.index(r), str(kept), ha="center", va="center", fontsize=7,
                    color="white" if f < 0.55 else "black")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(_short(rows), fontsize=7)
    ax.set_xticks(range(cols))
    ax.set_xticklabels([str(i) for i in range(cols)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_title(title)
    return im


def draw_widths(data, path: str | Path) -> Path:
    """qk and vo heatmaps (kept width / dense width per layer and head, kept width written in each
    cell) beside bars of the FFN/GLU widths per layer."""
    plt = pyplot()
    attn: dict[str, dict[tuple[str, int], tuple[int | None, int]]] = {"qk": {}, "vo": {}}
    ffn: list[tuple[str, str, int | None, int]] = []
    for name, (dense, kept) in data.widths.items():
        prefix, kind, head = parse_name(name)
        if kind in attn:
            attn[kind][(prefix, head)] = (dense, kept)
        else:
            ffn.append((f"{prefix}.{kind}" + (f".{head}" if head else ""), kind, dense, kept))
    ffn.sort(key=lambda x: _natural(x[0]))
    n_rows = max([len({r for r, _ in cells}) for cells in attn.values()] + [len(ffn), 1])
    fig, axes = plt.subplots(1, 4, figsize=(17, max(3.5, 0.28 * n_rows + 1.8)), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 0.05, 1.1]})
    cax = axes[2]
    axes = [axes[0], axes[1], axes[3]]
    cmap = plt.get_cmap("viridis")
    im = None
    for ax, kind, title in ((axes[0], "qk", "query/key (qk): kept width per head"),
                            (axes[1], "vo", "value/output (vo): kept width per head")):
        im = _heat(ax, attn[kind], title, cmap) or im
    ax = axes[2]
    if ffn:
        y = np.arange(len(ffn))
        dense = [d if d else k for _, _, d, k in ffn]
        kept = [k for _, _, _, k in ffn]
        colors = {"ffn": "#55A868", "glu": "#8172B3", "linear": "#937860"}
        ax.barh(y, dense, color="#dddddd", label="dense")
        ax.barh(y, kept, color=[colors.get(k, "#4C72B0") for _, k, _, _ in ffn], label="kept")
        for yi, (_, _, d, k) in zip(y, ffn):
            ax.text(k, yi, f" {k}" + (f"/{d}" if d else ""), va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels(_short([n for n, _, _, _ in ffn]), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("hidden units")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("FFN / GLU: kept of dense hidden width")
    else:
        ax.set_title("FFN / GLU: none")
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, cax=cax, label="kept / dense width (cells: kept width)")
    else:
        cax.axis("off")
    fig.suptitle(f"kept widths: {data.name}")
    return save_figure(fig, path)


def draw_params(data, path: str | Path) -> Path:
    """Parameters over training, one step line per run, pruning events marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    end = max((s for trace in data.traces.values() for s, _ in trace), default=0)
    for label, trace in data.traces.items():
        xs = [s for s, _ in trace] + [end]  # every run drawn to the last step
        ys = [p / 1e3 for _, p in trace] + [trace[-1][1] / 1e3]
        (line,) = ax.step(xs, ys, where="post", label=label, lw=1.6)
        steps = set(data.events.get(label, []))
        pts = [(s, p / 1e3) for s, p in trace if s in steps]
        if pts:
            ax.plot(*zip(*pts), "o", ms=3, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("parameters (thousands)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"parameters over training: {data.name}")
    fig.tight_layout()
    return save_figure(fig, path)

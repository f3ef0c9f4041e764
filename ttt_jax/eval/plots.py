"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def agg_pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_context_loss(curves: Mapping[str, Any], path: str | Path, *,
                      title: str = "Loss on the final block vs context length",
                      window: Optional[int] = None) -> Path:
    """One line per model: ``curves[name] = PerplexityResult`` (or a dict with ``context_lengths``
    and ``loss``); log2 x axis. ``window`` draws a vertical line (a sliding-window size)."""
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in curves.items():
        d = r if isinstance(r, Mapping) else r.to_dict()
        ax.plot(d["context_lengths"], d["loss"], marker="o", label=name)
    return _finish_log2_plot(plt, fig, ax, path, window=window, title=title,
                             xlabel="context length (tokens)", ylabel="loss on the final block (nats/token)")


def plot_position_loss(curves: Mapping[str, Any], path: str | Path, *, bins: int = 64,
                       title: str = "Loss by position", window: Optional[int] = None) -> Path:
    """Mean loss per position bin of the longest window, one line per model (log2 x axis)."""
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in curves.items():
        d = r["position_loss"] if isinstance(r, Mapping) else r.binned_position_loss(bins)
        mid = (np.asarray(d["start"]) + np.asarray(d["end"])) / 2
        ax.plot(np.maximum(mid, 1), d["loss"], label=name)
    return _finish_log2_plot(plt, fig, ax, path, window=window, title=title,
                             xlabel="position in the sequence (tokens)", ylabel="mean loss (nats/token)")


def _finish_log2_plot(plt, fig, ax, path, *, window: Optional[int], title: str, xlabel: str,
                      ylabel: str) -> Path:
    """Window marker, log2 x axis, labels, legend; save to ``path`` and close."""
    if window:
        ax.axvline(window, color="grey", ls=":", lw=1, label=f"window {window}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_ruler_heatmap(accuracy: Mapping[str, Mapping[Any, float]], lengths: Sequence[int],
                       path: str | Path, *, title: str = "RULER-style exact match") -> Path:
    """Task x length heat map of accuracies in [0, 1], annotated."""
    plt = agg_pyplot()
    tasks = list(accuracy)
    grid = np.array([[accuracy[t].get(n, accuracy[t].get(str(n), np.nan)) for n in lengths]
                     for t in tasks], dtype=float)
    fig, ax = plt.subplots(figsize=(3.6 + 0.8 * len(lengths), 1.2 + 0.45 * len(tasks)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("length (tokens)")
    for i in range(len(tasks)):
        for j in range(len(lengths)):
            v = grid[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    color="white" if (np.isnan(v) or v < 0.6) else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

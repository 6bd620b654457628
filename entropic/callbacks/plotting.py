"""PNG figures of attention entropy in the style of the paper's Figures: heatmap, layer curves, bin histogram.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas directly (never pyplot), so
they work headless, in worker processes and under any configured matplotlib backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from entropic.functional import BIN_LABELS

__all__ = [
    "BIN_LABELS",
    "entropy_bin_shares",
    "new_figure",
    "plot_bin_histogram",
    "plot_head_heatmap",
    "plot_layer_history",
    "save_figure",
]


def entropy_bin_shares(head_means: np.ndarray) -> np.ndarray:
    """[4] shares of heads in the paper's bins (max = largest observed): :func:`entropic.functional.entropy_bin_shares`."""
    import torch

    from entropic.functional import entropy_bin_shares as shares_of

    return np.asarray(shares_of(torch.as_tensor(np.asarray(head_means, dtype=np.float64))).shares)


def new_figure(width: float, height: float):
    """A headless matplotlib Figure (Agg canvas, no pyplot) of ``width`` x ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike[str]) -> Path:
    """Writes ``fig`` as a PNG at ``path`` atomically (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)  # readers never see a half-written PNG
    return path


def plot_head_heatmap(head_means: np.ndarray, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Layer × head heatmap of mean entropy (nats), each cell annotated with its value."""
    data = np.asarray(head_means, dtype=np.float64)
    n_layer, n_head = data.shape
    fig = new_figure(max(4.0, 0.55 * n_head + 2.0), max(3.0, 0.4 * n_layer + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", aspect="auto", origin="upper")
    fig.colorbar(image, ax=ax, label="entropy (nats)")
    finite = data[np.isfinite(data)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    if n_layer * n_head <= 400:  # values stay legible up to ~20×20
        for layer in range(n_layer):
            for head in range(n_head):
                value = data[layer, head]
                color = "black" if np.isfinite(value) and value > middle else "white"
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_title(title or "mean attention entropy per head")
    return save_figure(fig, path)


def plot_layer_history(
    steps: Sequence[int], layer_means: np.ndarray, path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Mean entropy of each layer (one line per layer) against the training step."""
    data = np.asarray(layer_means, dtype=np.float64).reshape(len(steps), -1)  # [N, L]
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for layer in range(data.shape[1]):
        ax.plot(list(steps), data[:, layer], marker="o" if len(steps) < 30 else None, label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title(title or "layerwise mean attention entropy")
    if data.shape[1] <= 24:
        ax.legend(fontsize=7, ncol=2 if data.shape[1] > 8 else 1)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_bin_histogram(head_means: np.ndarray, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Share of heads in each of the paper's four entropy bins (max = largest observed head entropy)."""
    data = np.asarray(head_means, dtype=np.float64)
    shares = entropy_bin_shares(data)
    finite = data[np.isfinite(data)]
    top = float(finite.max()) if finite.size else float("nan")
    fig = new_figure(5.5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(4), shares * 100, color=["#3b528b", "#21918c", "#5ec962", "#fde725"], edgecolor="black")
    for bar, share in zip(bars, shares, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{share:.0%}", ha="center", va="bottom")
    ax.set_xticks(range(4))
    ax.set_xticklabels(BIN_LABELS, fontsize=8)
    ax.set_ylabel("share of heads (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or f"entropy bins (max = {top:.2f} nats, {finite.size} heads)")
    return save_figure(fig, path)

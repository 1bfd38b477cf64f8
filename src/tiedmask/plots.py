"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(curves: dict[str, list[list[float]]], path: Path, ylabel: str, title: str) -> Path:
    """One line per label: the mean over runs per epoch, with a band of min..max."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, runs in curves.items():
        length = min(len(r) for r in runs)
        epochs = range(1, length + 1)
        columns = [[r[i] for r in runs] for i in range(length)]
        mean = [sum(c) / len(c) for c in columns]
        ax.plot(epochs, mean, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmap(matrix, path: Path, title: str, label: str = "application") -> Path:
    """A square matrix (e.g. CKA between applications) with values up to 1.

    The colour scale starts at the matrix's minimum rounded down to 0.05: tied layers are
    often all above 0.9, which a 0..1 scale shows as one flat colour. Small matrices get
    their values printed.
    """
    import math

    n = len(matrix)
    low = min(min(row) for row in matrix)
    vmin = min(0.95, math.floor(low * 20) / 20)
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=120)
    image = ax.imshow(matrix, vmin=vmin, vmax=1, cmap="magma", origin="lower")
    if n <= 10:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i][j]:.3f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i][j] < (vmin + 1) / 2 else "black")
    ticks = list(range(n)) if n <= 12 else list(range(0, n, max(1, n // 8)))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel(label)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

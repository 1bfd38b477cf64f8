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
    """A square matrix (e.g. CKA between applications) with values in [0, 1]."""
    fig, ax = plt.subplots(figsize=(4.6, 4), dpi=120)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
    n = len(matrix)
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

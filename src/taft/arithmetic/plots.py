"""Heatmaps (PNG): disentanglement error ξ(α1, α2) and the task-vector cosine matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], path: str | Path, *,
            title: str, xlabel: str = "", ylabel: str = "", vmin: float | None = None, vmax: float | None = None,
            cmap: str = "viridis", annotate: bool = True) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 0.8 + 0.6 * len(rows)))
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower" if xlabel.startswith("α") else "upper")
    ax.set_xticks(range(len(cols)), list(cols), rotation=45 if max(map(len, cols)) > 4 else 0)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if annotate:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                bright = im.norm(v) > 0.6  # dark text on the bright end of the colormap
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="k" if bright else "w")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def disentanglement_heatmap(result, path: str | Path, *, representation: bool = False) -> Path:
    """ξ over (α1, α2): rows α2 (task 2), columns α1 (task 1); 0 = perfectly disentangled."""
    labels = [f"{a:g}" for a in result.alphas]
    values = [list(col) for col in zip(*(result.xi_rep if representation else result.xi), strict=True)]
    what = "embedding distance" if representation else "prediction disagreement"
    return heatmap(values, labels, labels, path, vmin=0.0, vmax=None if representation else 2.0,
                   title=f"ξ ({what}), {result.mode}: {result.tasks[0]} × {result.tasks[1]}",
                   xlabel=f"α1 ({result.tasks[0]})", ylabel=f"α2 ({result.tasks[1]})", annotate=False)


def cosine_heatmap(matrix: Sequence[Sequence[float]], tasks: Sequence[str], path: str | Path, *, mode: str) -> Path:
    return heatmap(matrix, tasks, tasks, path, title=f"task-vector cosine similarity, {mode}", vmin=0.0, vmax=1.0,
                   cmap="magma")

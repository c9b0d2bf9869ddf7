"""Figures a person would rather look at than read: expert-load heatmaps (PNG and TensorBoard)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and TensorBoard, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["load_heatmap"]


def load_heatmap(loads: Sequence[Sequence[float]], row_labels: Sequence[str], title: str, path: str | Path | None = None):
    """Heatmap of expert-load shares, one row per layer (or module), one column per expert.

    Rows may have different expert counts (MoLA); missing cells are left blank. Returns the figure
    (for ``SummaryWriter.add_figure``) after saving it to ``path`` when given.
    """
    E = max(len(r) for r in loads)
    grid = np.full((len(loads), E), np.nan)
    for i, r in enumerate(loads):
        grid[i, : len(r)] = r
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * E, 0.8 + 0.32 * len(loads)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(np.nanmax(grid), 1e-9))
    ax.set_xticks(range(E), [f"e{e}" for e in range(E)])
    ax.set_yticks(range(len(loads)), list(row_labels), fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="load share")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig

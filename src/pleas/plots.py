"""Plots of a merge (matplotlib, an optional dependency: ``pip install pleas[plot]``)."""
from __future__ import annotations

import io
from pathlib import Path

from .errors import MergeInputError
from .files import write_atomically


def merge_fractions_png(result) -> bytes:
    """A bar chart of each group's merge fraction k_g / d_g, groups in graph order, as PNG bytes.

    ``result`` is a :class:`pleas.MergeResult`. The title gives the method, budget and dense size.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MergeInputError("plotting needs matplotlib: pip install 'pleas[plot]'") from exc
    groups = result.report["groups"]
    fractions = [g["merge_count"] / g["width"] for g in groups]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(groups)), 3.5))
    ax.bar(range(len(groups)), fractions, color="#4477aa")
    ax.set_xticks(range(len(groups)), [g["name"] for g in groups], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("merged fraction k / d")
    size = result.report["size"]["relative_dense"]
    ax.set_title(f"{result.report['method']} at budget {result.report['budget']:g} (dense size {size:.2f}x)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def plot_merge_fractions(result, path: str | Path) -> Path:
    """Save :func:`merge_fractions_png` to ``path`` (written atomically)."""
    path = Path(path)
    write_atomically({path: merge_fractions_png(result)})
    return path

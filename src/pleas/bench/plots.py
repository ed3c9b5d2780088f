"""Accuracy against size: one PNG per task and architecture (matplotlib, Agg backend).

Each method is a line over its budgets at the merged models' mean dense size, with a band of ± one
standard deviation over seed pairs; fixed-size methods are single points with error bars; the ensemble
is a horizontal line (its dense size is off the chart).
"""
from __future__ import annotations

from pathlib import Path

from .aggregate import Summary


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("pleas bench draws its plots with matplotlib: pip install 'pleas[plot]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_combo(summary: Summary, task: str, arch: str, path: Path) -> Path:
    """Mean accuracy over both domains against dense size for every method on (task, arch), saved to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    try:
        for method in summary.methods():
            budgets = [b for b in summary.budgets(task, arch, method) if b is not None]
            found = [summary.merge(task, arch, method, b) for b in budgets]
            if method == "ensemble":
                ens = summary.merge(task, arch, method, None)
                if ens is not None:
                    acc = ens["mean_acc"]
                    ax.axhline(acc.mean, color="black", linestyle="--", linewidth=1,
                               label=f"ensemble ({ens['dense'].mean:.2f}x dense)")
                    if acc.n > 1:
                        ax.axhspan(acc.mean - acc.std, acc.mean + acc.std, color="black", alpha=0.08)
                continue
            if not found:
                continue
            x = [f["dense"].mean for f in found]
            y = [f["mean_acc"].mean for f in found]
            err = [f["mean_acc"].std for f in found]
            if len(found) == 1:
                ax.errorbar(x, y, yerr=err, marker="s", linestyle="none", capsize=3, label=method)
            else:
                style = {"linewidth": 2.4} if method == "pleas" else {"linestyle": "--"} if method == "pleas-free" else {}
                (line,) = ax.plot(x, y, marker="o", label=method, **style)
                ax.fill_between(x, [v - e for v, e in zip(y, err)], [v + e for v, e in zip(y, err)],
                                color=line.get_color(), alpha=0.15)
        ax.set_xlabel("dense size (relative to one source model)")
        ax.set_ylabel("mean accuracy over both domains")
        ax.set_title(f"{task} / {arch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def write_plots(results: dict, directory: Path) -> dict[str, Path]:
    """One PNG per measured (task, arch) in ``directory``, named ``<task>_<arch>.png``; returns
    {"task/arch": path}."""
    summary = Summary(results)
    written = {}
    for task, arch in summary.combos:
        if any(summary.budgets(task, arch, m) for m in summary.methods()):
            written[f"{task}/{arch}"] = plot_combo(summary, task, arch, Path(directory) / f"{task}_{arch}.png")
    return written

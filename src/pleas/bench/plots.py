"""The benchmark's plots (matplotlib, Agg backend).

* Accuracy against size, one PNG per task and architecture: each method is a line over its budgets at
  the merged models' mean dense size, with a band of ± one standard deviation over seed pairs;
  fixed-size methods are single points with error bars; the ensemble is a horizontal line (its dense
  size is off the chart); the distillation students converged are dotted lines / crosses.
* ``distillation.png``: per task and architecture, accuracy against wall time: PLeaS's merges, and each
  student from its start through PLeaS's time to convergence.
* ``calibration_sizes.png``: per task and architecture, accuracy at 1x against calibration size.
"""
from __future__ import annotations

import math
from pathlib import Path

from .aggregate import Summary
from .distill import STUDENTS


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
            style = {"linewidth": 2.4} if method == "pleas" else {"linestyle": "--"} if method in ("pleas-free", "pleas-synthetic") else {}
            (line,) = ax.plot(x, y, marker="o", label=method, **style)
            ax.fill_between(x, [v - e for v, e in zip(y, err)], [v + e for v, e in zip(y, err)],
                            color=line.get_color(), alpha=0.15)
    _students_on_size_plot(ax, summary, task, arch)
    ax.set_xlabel("dense size (relative to one source model)")
    ax.set_ylabel("mean accuracy over both domains")
    ax.set_title(f"{task} / {arch}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _students_on_size_plot(ax, summary: Summary, task: str, arch: str) -> None:
    """The converged distillation students: kd-pleas as a dotted line over its budgets, kd-source a cross."""
    for student, style in zip(STUDENTS, ({"marker": "x", "linestyle": "none", "color": "grey"},
                                         {"marker": "x", "linestyle": ":", "color": "black"})):
        found = [summary.distill(task, arch, student, b) for b in summary.distill_budgets(task, arch, student)]
        if found:
            ax.plot([f["dense"].mean for f in found], [f["converged.mean_acc"].mean for f in found],
                    label=f"{student} (converged)", **style)


def _panels(count: int):
    """A figure with ``count`` panels in rows of up to four; returns (figure, flat list of axes)."""
    plt = _pyplot()
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_distillation(summary: Summary, path: Path) -> Path:
    """Per (task, arch) with students: mean accuracy against wall time from the trained source models
    (log scale). PLeaS's merges are circles at their merge time; each student is a line from its start
    through its accuracy at PLeaS's time to convergence, coloured by budget (kd-source black). kd-pleas
    starts where its merge ended, so its line is drawn at the merge's time plus its own. The accuracy
    axis spans the merges and the trained students; a start below it is named in the legend."""
    combos = summary.distill_combos()
    fig, axes = _panels(len(combos))
    colours = _pyplot().get_cmap("viridis")
    for ax, (task, arch) in zip(axes, combos):
        shown: list[float] = []
        budgets = summary.distill_budgets(task, arch, "kd-pleas")
        for i, budget in enumerate(budgets):
            found = summary.distill(task, arch, "kd-pleas", budget)
            colour = colours(i / max(1, len(budgets) - 1) * 0.9)
            ax.plot(found["merge_seconds"].mean, found["merge_mean_acc"].mean, "o", color=colour,
                    label=f"pleas {budget:g}x")
            shown += _trajectory(ax, found, found["merge_seconds"].mean, color=colour, linestyle="--",
                                 label=f"kd-pleas {budget:g}x")
        pairs = sorted({p for student in STUDENTS for b in summary.distill_budgets(task, arch, student)
                        for p in summary.distill(task, arch, student, b)["pairs"]})
        ensemble = summary.pairs_mean_acc(task, arch, "ensemble", None, pairs)
        if ensemble is not None:
            ax.axhline(ensemble.mean, color="grey", linestyle=":", linewidth=1, label="ensemble")
            shown.append(ensemble.mean)
        source = summary.distill(task, arch, "kd-source", 1.0)
        if source is not None:
            start = source["start.mean_acc"].mean
            shown += _trajectory(ax, source, 0.0, color="black", linestyle="-",
                                 label=f"kd-source 1x (start {start:.3f})")[1:]
        low, high = min(shown), max(shown)
        margin = max(0.01, 0.1 * (high - low))
        ax.set_ylim(low - margin, high + margin)
        ax.set_xscale("log")
        ax.set_title(f"{task} / {arch}", fontsize=9)
        ax.set_xlabel("wall time from the source models (s)", fontsize=8)
        ax.set_ylabel("mean accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    return _save(fig, path)


def _trajectory(ax, found: dict, offset: float, **style) -> list[float]:
    """A student's line through its checkpoints, ``offset`` seconds later; returns their accuracies."""
    points = ("start", "at_budget", "converged")
    x = [offset + found[f"{p}.seconds"].mean for p in points]
    y = [found[f"{p}.mean_acc"].mean for p in points]
    ax.plot(x, y, marker=".", **style)
    return y


def plot_calibration_sizes(summary: Summary, path: Path) -> Path:
    """Per (task, arch) on the axis: mean accuracy at 1x against calibration samples (log scale), a line
    per method."""
    combos = summary.axis_combos()
    fig, axes = _panels(len(combos))
    for ax, (task, arch) in zip(axes, combos):
        sizes = [s for s, _ in summary.axis_sizes(task, arch)]
        for method in summary.axis_methods():
            points = [(s, [r["mean_acc"] for r in summary.axis(task, arch, method, s) if "mean_acc" in r]) for s in sizes]
            points = [(s, sum(v) / len(v)) for s, v in points if v]
            if points:
                ax.plot(*zip(*points), marker="o", label=method, **({"linewidth": 2.4} if method == "pleas" else {}))
        ax.set_xscale("log")
        ax.set_title(f"{task} / {arch}", fontsize=9)
        ax.set_xlabel("calibration samples", fontsize=8)
        ax.set_ylabel("mean accuracy at 1x", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(results: dict, directory: Path) -> dict[str, Path]:
    """One PNG per measured (task, arch) in ``directory``, named ``<task>_<arch>.png``, and the two
    studies' plots where measured (``distillation.png``, ``calibration_sizes.png``); returns
    {"task/arch" | "distillation" | "calibration-sizes": path}."""
    summary = Summary(results)
    written = {}
    for task, arch in summary.combos:
        if any(summary.budgets(task, arch, m) for m in summary.methods()):
            written[f"{task}/{arch}"] = plot_combo(summary, task, arch, Path(directory) / f"{task}_{arch}.png")
    if summary.distill_combos():
        written["distillation"] = plot_distillation(summary, Path(directory) / "distillation.png")
    if summary.axis_combos():
        written["calibration-sizes"] = plot_calibration_sizes(summary, Path(directory) / "calibration_sizes.png")
    return written


def budget_panel(ax, rows: list[dict], curves: list[str], references: list[dict], *, title: str, ylabel: str) -> None:
    """One panel of a metric against the budget: a line per row label in ``curves`` (rows with a
    ``budget`` and a ``mean``), and a dashed, labelled level for each row in ``references``."""
    for label in curves:
        pts = sorted((r["budget"], r["mean"]) for r in rows if r["row"] == label and r["budget"])
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", label=label)
    for r in references:
        ax.axhline(r["mean"], ls="--", lw=0.8, color="grey")
        ax.text(1.0, r["mean"], r["row"], fontsize=7, va="bottom")
    ax.set_title(title)
    ax.set_xlabel("budget (effective parameters)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)

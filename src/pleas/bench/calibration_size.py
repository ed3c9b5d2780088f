"""Calibration size as a benchmark axis: the 1x merges of PLeaS, ZipIt! and Git Re-Basin (activation
matching) against the number of calibration samples, on seed pair 0 of each selected task with an
architecture of the axis (the two ResNets in the full run).

Every size draws its samples with the suite's calibration seed (the pair), half from each domain's
training split, so a smaller set is a subset of every larger one on each domain (the same seeded
permutation, cut shorter). Sizes beyond what the training splits hold are replaced by the largest size
they do hold (both splits used to the end on the smaller side): ``requested`` keeps the size asked for,
``samples`` the size used.

Besides accuracy and time, each record keeps what the merge's report says about the least-squares refit
(PLeaS: one entry per refitted layer, with its rows, columns and relative fit errors on the calibration
data before and after the refit), which shows how a small sample makes layers underdetermined.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

from tqdm.auto import tqdm

from ..api import merge
from ..errors import MergeInputError, PleasError
from . import tasks as task_defs

#: Calibration sizes of the full run and of ``--quick``.
SIZES = (32, 64, 128, 256, 512, 1000, 2000, 5000)
QUICK_SIZES = (32, 64, 128)
#: Architectures the axis runs on in the full run (``--quick`` runs it on the quick selection's).
ARCHS = ("resnet20", "resnet18")
#: The merges on the axis (benchmark method labels), all at 1x. PLeaS-free draws as many samples of the
#: task's free data (a seeded prefix of one draw too); sizes beyond what the free data holds are skipped.
METHODS = ("pleas", "pleas-free", "zipit", "rebasin-activation")
#: The seed pair the axis runs on.
PAIR = 0


def capped_sizes(sizes: list[int], cap: int) -> list[tuple[int, int]]:
    """(requested, used) for each size: sizes above ``cap`` use ``cap``, once (the first one above it)."""
    chosen, seen = [], set()
    for size in sorted(sizes):
        used = min(size, cap)
        if used not in seen:
            seen.add(used)
            chosen.append((size, used))
    return chosen


def plan(selection: list[tuple[str, str]], archs: list[str], methods: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (task, arch) pairs of ``selection`` the axis runs on and the methods it merges with."""
    return [(t, a) for t, a in selection if a in archs], [m for m in METHODS if m in methods]


def _refit_entries(report: dict) -> list[dict] | None:
    refit = report.get("refit")
    if not isinstance(refit, list):
        return None
    keep = ("layer", "rows", "columns", "error_before", "error_after")
    return [{k: entry[k] for k in keep if k in entry} for entry in refit if isinstance(entry, dict)]


def run_axis(combos: list[tuple[str, str]], methods: list[str], sizes: list[int], *, epochs_for: Callable[[str, str], int],
             setups: dict, evaluate: Callable, batch_size: int, bar: tqdm,
             log: Callable[[str], None]) -> list[dict]:
    """Merge seed pair :data:`PAIR` of every (task, arch) in ``combos`` at 1x with every method label in
    ``methods`` (``setups[label]``: its :class:`~pleas.bench.run.MethodSetup`) on each calibration size
    of ``sizes`` the data allows; ``evaluate(model, task, (A's test set, B's))`` gives {domain: accuracy}. One record per
    merge: accuracy, seconds, sizes, the refit's per-layer entries (None for methods without a refit),
    or the error that stopped the merge."""
    records = []
    for task_name, arch in combos:
        task = task_defs.TASKS[task_name]
        a, b = task_defs.source_models(task, arch, PAIR, epochs_for(task_name, arch), log)
        cap = task_defs.calibration_cap(a, b)
        chosen = capped_sizes(sizes, cap)
        bar.total -= (len(set(sizes)) - len(chosen)) * len(methods)  # sizes above the cap collapse into one
        bar.refresh()
        for requested, used in chosen:
            data = {"task": task_defs.task_calibration(a, b, used, seed=PAIR)}
            for label in methods:
                setup = setups[label]
                bar.set_postfix_str(f"{task_name}/{arch}: {label} on {used} calibration samples", refresh=True)
                record: dict[str, Any] = {"task": task_name, "arch": arch, "pair": PAIR, "method": label,
                                          "requested": requested, "samples": used, "cap": cap}
                try:
                    if setup.calibration == "free" and "free" not in data:
                        data["free"] = task.free_data(used, task.archs[arch].resolution, PAIR)
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # in the record, not printed per merge
                        result = merge(a.model, b.model, data[setup.calibration], method=setup.method, budget=1.0, heads=task.heads,
                                       seed=PAIR, batch_size=batch_size, progress=False, **setup.options)
                    seconds = time.perf_counter() - start
                except PleasError as exc:
                    kind = "skipped" if isinstance(exc, MergeInputError) else "error"
                    records.append({**record, "error": f"{kind}: {type(exc).__name__}: {exc}"})
                    bar.update(1)
                    continue
                acc = evaluate(result.model, task, (a.test_set, b.test_set))
                records.append({**record, "acc": acc, "mean_acc": sum(acc.values()) / len(acc), "seconds": seconds,
                                "warnings": result.report.get("warnings", []),
                                "dense": result.report["size"]["relative_dense"],
                                "refit": _refit_entries(result.report)})
                bar.update(1)
    return records


def count_runs(combos: list[tuple[str, str]], methods: list[str], sizes: list[int]) -> int:
    """The merges :func:`run_axis` makes before sizes above a task's cap are collapsed into one."""
    return len(combos) * len(methods) * len(set(sizes))


def refit_summary(entries: list[dict] | None) -> dict | None:
    """What the refit's per-layer entries say about the fit: ``layers``; ``underdetermined``, layers
    fitted on fewer rows than columns (the least-squares solution then interpolates the calibration
    rows, held in place only by the ridge); ``mean_before`` / ``mean_after``, the mean relative fit
    error on the calibration rows before and after the refit; ``worst``, the layer with the largest
    error after, and that error. None without entries."""
    if not entries:
        return None
    after = [e["error_after"] for e in entries if e.get("error_after") is not None]
    before = [e["error_before"] for e in entries if e.get("error_before") is not None]
    worst = max((e for e in entries if e.get("error_after") is not None), key=lambda e: e["error_after"], default=None)
    return {
        "layers": len(entries),
        "underdetermined": sum(1 for e in entries if e.get("rows", 0) < e.get("columns", 0)),
        "mean_before": sum(before) / len(before) if before else None,
        "mean_after": sum(after) / len(after) if after else None,
        "worst": None if worst is None else {"layer": worst["layer"], "error_after": worst["error_after"]},
    }

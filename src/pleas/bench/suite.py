"""The whole benchmark: run (or reload) the merges, save the raw results, write BENCHMARKS.md and the plots.

Layout under the output directory ``out``: ``BENCHMARKS.md``, and in ``docs/bench/`` the plots (one PNG
per task and architecture) and ``results.json`` (every measurement; ``--report-only`` renders from it);
the transformer pairs (:mod:`.transformers`) in ``transformers.json`` and ``transformers.png``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..version import __version__
from ..errors import MergeInputError
from ..files import atomic_write
from . import plots, report, transformers
from . import tasks as task_defs
from .run import BENCH_METHODS, BenchConfig, calibration_plan, count_merges, count_students, run_benchmark

RESULTS_FORMAT = 1


@dataclass(frozen=True)
class OutputPaths:
    report: Path
    plots: Path
    results: Path
    transformers: Path

    @classmethod
    def under(cls, out: str | os.PathLike) -> "OutputPaths":
        out = Path(out)
        plot_dir = out / "docs" / "bench"
        return cls(out / "BENCHMARKS.md", plot_dir, plot_dir / "results.json", plot_dir / "transformers.json")


def _git_commit() -> str | None:
    """The commit of the pleas source tree, with "+changes" if it has uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "") if commit else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the benchmark ran: CPU, cores the process may use, torch threads, versions, commit."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "pleas": __version__,
        "commit": _git_commit(),
    }


def describe_tasks(config: BenchConfig) -> dict:
    """The selected tasks and architectures as JSON (what the report prints about them)."""
    described: dict = {}
    for task_name, arch in config.selection:
        task = task_defs.TASKS[task_name]
        entry = described.setdefault(task_name, {
            "title": task.title, "heads": task.heads, "free_data": task.free_data_text,
            "domains": [{"label": d.label, "dataset": d.dataset, "classes": list(d.classes) if d.classes else None}
                        for d in task.domains],
            "archs": {},
        })
        setup = task.archs[arch]
        entry["archs"][arch] = {"factory": setup.factory, "kwargs": setup.kwargs, "resolution": setup.resolution,
                                "epochs": config.epochs_for(task_name, arch)}
    return described


def save_results(results: dict, path: Path) -> None:
    text = json.dumps(results, indent=1, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def load_results(path: Path) -> dict:
    if not path.exists():
        raise MergeInputError(f"no benchmark results at {str(path)!r}; run `pleas bench` first (without --report-only)")
    results = json.loads(path.read_text())
    if results.get("format") != RESULTS_FORMAT:
        raise MergeInputError(f"{str(path)!r} holds results of format {results.get('format')!r}; "
                              f"this version reads format {RESULTS_FORMAT}: rerun `pleas bench`")
    return results


def write_outputs(results: dict, paths: OutputPaths) -> None:
    """The plots, then BENCHMARKS.md linking them (paths relative to the report)."""
    images = plots.write_plots(results, paths.plots)
    links = {key: os.path.relpath(path, paths.report.parent) for key, path in images.items()}
    text = report.render(results, links, results_link=os.path.relpath(paths.results, paths.report.parent))
    if paths.transformers.exists():  # measured by `pleas bench` too (or alone: --part transformers)
        measured = json.loads(paths.transformers.read_text())
        picture = paths.plots / "transformers.png"
        transformers.plot(measured, picture)
        text = text.rstrip() + "\n\n" + transformers.render(measured) + \
            f"\n![bits per byte against the budget]({os.path.relpath(picture, paths.report.parent)})\n"
    atomic_write(paths.report, lambda tmp: Path(tmp).write_text(text))


def run_transformer_suite(out: str | os.PathLike, *, log: Callable[[str], None] | None = None,
                          families: tuple[str, ...] = transformers.LM_FAMILIES, vit: bool = True) -> dict:
    """Run the transformer benchmark and save it under ``out`` (BENCHMARKS.md is written with the rest)."""
    paths = OutputPaths.under(out)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    started = time.perf_counter()
    measured = transformers.run_transformers(families=families, vit=vit, log=log)
    measured["meta"] = {"machine": machine(), "total_seconds": time.perf_counter() - started,
                        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    save_results(measured, paths.transformers)
    return measured


def run_suite(config: BenchConfig, out: str | os.PathLike, *, command: str, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark of ``config`` and write everything under ``out``; returns the results.
    ``command`` is recorded as the command that regenerates the report. The raw results are saved
    after each task and architecture, so an interrupted run keeps what it measured."""
    paths = OutputPaths.under(out)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    combos, _ = calibration_plan(config)
    log(f"pleas bench: {count_merges(config)} merges over {len(config.selection)} task/architecture pairs x "
        f"{config.seed_pairs} seed pair(s), {count_students(config)} distillation students, the calibration-size "
        f"axis on {len(combos)} pair(s); writing {paths.report} and {paths.plots}/")
    started = time.perf_counter()
    results = {
        "format": RESULTS_FORMAT,
        "meta": {"command": command, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine(), "complete": False, "total_seconds": None},
        "tasks": describe_tasks(config),
        "methods": {label: {"method": m.method, "text": m.text, "options": m.options, "calibration": m.calibration,
                            "pairs": m.pairs}
                    for label, m in BENCH_METHODS.items() if label in config.methods},
    }

    def save(partial: dict) -> None:
        save_results({**results, **partial, "meta": {**results["meta"], "total_seconds": time.perf_counter() - started}},
                     paths.results)

    results.update(run_benchmark(config, progress=progress, on_update=save))
    results["meta"].update(complete=True, total_seconds=time.perf_counter() - started)
    save_results(results, paths.results)
    write_outputs(results, paths)
    log(f"pleas bench: done in {results['meta']['total_seconds'] / 60:.1f} min; wrote {paths.report}")
    return results


def rerender(out: str | os.PathLike) -> dict:
    """Write BENCHMARKS.md and the plots again from the saved results under ``out``."""
    paths = OutputPaths.under(out)
    results = load_results(paths.results)
    write_outputs(results, paths)
    return results

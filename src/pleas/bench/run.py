"""Running the benchmark: which merges, and what is measured for each.

For every selected (task, architecture) and seed pair: train (or load) models A and B, draw the task's
calibration sample and PLeaS-free's, time the forward floor, then merge with every method at every
budget it can make, recording accuracy per domain, dense and effective size, wall time and peak memory.
On the first :attr:`BenchConfig.distill_pairs` seed pairs, each PLeaS merge is also followed by the
distillation baseline (:mod:`.distill`). After all pairs: PLeaS's time against calibration size on
resnet18, and the calibration-size axis (:mod:`.calibration_size`).
Results are plain JSON-ready dicts (see :func:`run_benchmark`).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..api import merge
from ..errors import MergeInputError, PleasError
from ..experiments import train
from ..methods import METHODS
from .findings import ALLOCATION_BUDGETS, EFFECTIVE_ALLOCATIONS, SPEED_ARCH
from . import calibration_size
from . import tasks as task_defs
from .distill import MAX_EPOCHS as DEFAULT_DISTILL_EPOCHS
from .distill import DistillSettings, Teacher, train_students
from .measure import PeakMemory, forward_floor

#: Budgets of the full run and of ``--quick``.
BUDGETS = (1.0, 1.2, 1.5, 1.8, 2.0)
QUICK_BUDGETS = (1.0, 1.5)
#: Seed pairs of the full run (pair p trains A with seed 2p and B with 2p + 1).
SEED_PAIRS = 3
#: Calibration samples per merge (half from each domain's training split), full run and ``--quick``.
CALIBRATION = 1000
QUICK_CALIBRATION = 200
#: The budgets of the free-data ablations (the smallest and the largest of the full run).
ABLATION_BUDGETS = (1.0, 2.0)
#: Synthesised calibration data (pleas.synthesize): inputs (at most the run's calibration size) and Adam
#: steps, full run and ``--quick``. At equal cost, 256 inputs with 400 steps beat 1000 with 100 (domains /
#: resnet20, PLeaS at 1x: 0.676 against 0.538; docs/free-data.md): their quality, not their number, limits.
SYNTHESIS_SAMPLES = 256
SYNTHESIS_STEPS = 400
QUICK_SYNTHESIS_STEPS = 10
#: How many seed pairs (the first ones) the free-data variants beyond PLeaS-free run on: synthesised data
#: (its synthesis takes about 5 min per resnet18 pair), the ablations and the merges that keep both models
#: whole. Set by cost, to keep the full run near two hours; the report compares them with PLeaS on the same
#: pairs.
FREE_EXTRA_PAIRS = 1
#: "2x, both whole": budget 2 in effective parameters, the two sources side by side (the ensemble).
WHOLE_BUDGETS = (2.0,)
WHOLE = {"budget_metric": "effective_params"}
#: The (task, architecture) pairs of ``--quick``.
QUICK_SELECTION = (("mnist-halves", "mlp"),)
#: Batch size of the merges and of the forward floor.
BATCH_SIZE = 256
#: The merges the distillation students continue from, and how many seed pairs get students (the first ones).
DISTILL_METHOD = "pleas"
DISTILL_PAIRS = 1
#: Distillation epoch caps by architecture (others: distill.MAX_EPOCHS), set by cost: the students of the
#: two ResNets take most of the distillation's time. ``--quick`` caps every student at QUICK_DISTILL_EPOCHS.
DISTILL_EPOCHS = {"resnet18": 12, "resnet20": 20}
QUICK_DISTILL_EPOCHS = 3


@dataclass(frozen=True)
class MethodSetup:
    """A benchmarked method: ``method`` is the registered name, ``options`` extra :func:`pleas.merge`
    arguments, ``calibration`` "task" (the task's own data), "free" (the task's free data), "synthetic"
    (:func:`pleas.synthesize` from the sources) or, for PLeaS's ablations, "free-match" / "free-refit"
    (free data for the matching / for the refit and norm statistics only, the task's for the rest:
    :func:`.free_ablation.split_merge`); ``budgets`` the only budgets it runs at (None: every budget)."""

    label: str
    method: str
    text: str
    options: dict = field(default_factory=dict, hash=False)
    calibration: str = "task"
    budgets: tuple[float, ...] | None = None
    pairs: int | None = None

    def runs_on(self, pair: int) -> bool:
        return self.pairs is None or pair < self.pairs

    @property
    def uses_budget(self) -> bool:
        return METHODS[self.method].uses_budget

    @property
    def max_budget(self) -> float | None:
        return METHODS[self.method].max_budget


BENCH_METHODS: dict[str, MethodSetup] = {
    m.label: m
    for m in (
        MethodSetup("ensemble", "ensemble", "both models side by side in one network (exact; the upper bound)"),
        MethodSetup("average", "average", "plain weight averaging, no alignment"),
        MethodSetup("rebasin-weight", "rebasin", "Git Re-Basin, weight matching; partial merge above 1x",
                    {"matching": "weight"}),
        MethodSetup("rebasin-activation", "rebasin", "Git Re-Basin, activation matching; partial merge above 1x",
                    {"matching": "activation"}),
        MethodSetup("zipit", "zipit", "ZipIt! (same-model merges allowed; partial zipping above 1x)"),
        MethodSetup("regmean", "regmean", "RegMean as published: each linear map merged from each model's own input "
                    "Grams (alpha 0.9), no alignment"),
        MethodSetup("pleas-identity", "pleas", "PLeaS's refit without permutations (matching='identity'): what the "
                    "permutations add", {"matching": "identity"}, budgets=(1.0,)),
        MethodSetup("pleas", "pleas", "PLeaS: activation matching, partial merge, least-squares refit"),
        MethodSetup("pleas-free", "pleas", "PLeaS calibrated on data from neither domain (the task's free data)",
                    calibration="free"),
        MethodSetup("pleas-synthetic", "pleas", "PLeaS calibrated on inputs synthesised from the sources' BatchNorm "
                    "statistics (pleas.synthesize; no data at all)", calibration="synthetic", pairs=FREE_EXTRA_PAIRS),
        MethodSetup("pleas-free-norms", "pleas", "ablation: PLeaS-free with norm statistics recomputed on the free "
                    "data (norm_stats='data')", {"norm_stats": "data"}, calibration="free", budgets=ABLATION_BUDGETS,
                    pairs=FREE_EXTRA_PAIRS),
        MethodSetup("pleas-free-match", "pleas", "ablation: units matched on free data, refit and norm statistics on "
                    "the task's data", calibration="free-match", budgets=ABLATION_BUDGETS, pairs=FREE_EXTRA_PAIRS),
        MethodSetup("pleas-free-refit", "pleas", "ablation: units matched on the task's data, refit and norm "
                    "statistics on free data", calibration="free-refit", budgets=ABLATION_BUDGETS,
                    pairs=FREE_EXTRA_PAIRS),
        *(MethodSetup(f"{label}-whole", "pleas", f"{name}, budget 2 in effective parameters: both models whole, "
                      "side by side", WHOLE, calibration=calibration, budgets=WHOLE_BUDGETS, pairs=FREE_EXTRA_PAIRS)
          for label, name, calibration in (("pleas", "PLeaS", "task"), ("pleas-free", "PLeaS-free", "free"),
                                           ("pleas-synthetic", "PLeaS on synthesised data", "synthetic"))),
        *(MethodSetup(label, "pleas",
                      f"PLeaS, budget in effective parameters (zero blocks not counted), allocation '{allocation}'",
                      {"budget_metric": "effective_params", "allocation": allocation}, budgets=ALLOCATION_BUDGETS)
          for allocation, label in EFFECTIVE_ALLOCATIONS.items()),
    )
}


@dataclass
class BenchConfig:
    """What to run. ``selection``: (task, arch) pairs; ``seed_pairs``: how many pairs of source models;
    ``epochs``: training epochs for every architecture (None: each architecture's own)."""

    selection: list[tuple[str, str]]
    seed_pairs: int = SEED_PAIRS
    budgets: list[float] = field(default_factory=lambda: list(BUDGETS))
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))
    calibration: int = CALIBRATION
    quick: bool = False
    epochs: int | None = None
    batch_size: int = BATCH_SIZE
    distill_pairs: int = DISTILL_PAIRS
    distill_epochs: int | None = None
    calibration_sizes: list[int] = field(default_factory=lambda: list(calibration_size.SIZES))
    calibration_archs: list[str] = field(default_factory=lambda: list(calibration_size.ARCHS))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in BENCH_METHODS]
        if unknown:
            raise MergeInputError(f"unknown method(s) {unknown}; allowed: {list(BENCH_METHODS)}")
        bad = [b for b in self.budgets if isinstance(b, bool) or not isinstance(b, (int, float)) or not b >= 1.0]
        if bad:
            raise MergeInputError(f"budgets {bad} are out of range; allowed: numbers >= 1 (1x = one source model)")
        for name, value, low in (("seed pairs", self.seed_pairs, 1), ("calibration", self.calibration, 2),
                                 ("batch size", self.batch_size, 1), ("distill pairs", self.distill_pairs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MergeInputError(f"{name}={value!r}; allowed: an integer >= {low}")
        for name, value in (("epochs", self.epochs), ("distill epochs", self.distill_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MergeInputError(f"{name}={value!r}; allowed: a positive integer")
        bad = [n for n in self.calibration_sizes if isinstance(n, bool) or not isinstance(n, int) or n < 2]
        if bad:
            raise MergeInputError(f"calibration sizes {bad} are out of range; allowed: integers >= 2")
        unknown = [a for a in self.calibration_archs if a not in task_defs.all_archs()]
        if unknown:
            raise MergeInputError(f"unknown calibration-size architecture(s) {unknown}; allowed: {task_defs.all_archs()}")

    def epochs_for(self, task: str, arch: str) -> int:
        setup = task_defs.TASKS[task].archs[arch]
        return self.epochs or (setup.quick_epochs if self.quick else setup.epochs)

    def distill_epochs_for(self, arch: str) -> int:
        """The distillation's epoch cap for ``arch``."""
        if self.distill_epochs is not None:
            return self.distill_epochs
        return QUICK_DISTILL_EPOCHS if self.quick else DISTILL_EPOCHS.get(arch, DEFAULT_DISTILL_EPOCHS)

    def to_json(self) -> dict:
        return {"selection": [list(p) for p in self.selection], "seed_pairs": self.seed_pairs,
                "budgets": list(self.budgets), "methods": list(self.methods), "calibration": self.calibration,
                "quick": self.quick, "epochs": self.epochs, "batch_size": self.batch_size,
                "distill_pairs": self.distill_pairs,
                "distill_epochs": {a: self.distill_epochs_for(a) for a in dict.fromkeys(a for _, a in self.selection)},
                "calibration_sizes": list(self.calibration_sizes), "calibration_archs": list(self.calibration_archs)}


def make_config(*, tasks: list[str] | None = None, archs: list[str] | None = None, quick: bool = False,
                **overrides: Any) -> BenchConfig:
    """The full configuration, or the ``quick`` one, narrowed to ``tasks`` / ``archs`` and with
    ``overrides`` (any :class:`BenchConfig` field; None values are ignored)."""
    if quick and tasks is None and archs is None:
        selection = list(QUICK_SELECTION)
    else:
        selection = task_defs.select(tasks, archs)
    values: dict[str, Any] = {"selection": selection, "quick": quick}
    if quick:
        values.update(seed_pairs=1, budgets=list(QUICK_BUDGETS), calibration=QUICK_CALIBRATION,
                      calibration_sizes=list(calibration_size.QUICK_SIZES),
                      calibration_archs=list(dict.fromkeys(a for _, a in selection)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**values)


def plan_merges(methods: list[str], budgets: list[float],
                pair: int | None = None) -> tuple[list[tuple[str, float | None]], list[dict]]:
    """The (method label, budget) merges to run on seed pair ``pair`` (None: leave out no method for its
    pairs), budget None for fixed-size methods, and a record for each pair left out because the method
    cannot make that size."""
    runs: list[tuple[str, float | None]] = []
    skipped: list[dict] = []
    for label in methods:
        setup = BENCH_METHODS[label]
        if pair is not None and not setup.runs_on(pair):
            continue
        if not setup.uses_budget:
            runs.append((label, None))
            continue
        for budget in budgets:
            if setup.budgets is not None and not any(abs(budget - b) < 1e-9 for b in setup.budgets):
                continue  # measured only at its own budgets
            if setup.max_budget is not None and budget > setup.max_budget * (1 + 1e-9):
                skipped.append({"method": label, "budget": float(budget),
                                "reason": f"makes models of size at most {setup.max_budget:g}x"})
            else:
                runs.append((label, float(budget)))
    return runs, skipped


def _accuracies(model, task: task_defs.Task, tests) -> dict[str, float]:
    separate = task.heads == "separate"
    return {domain.label: train.evaluate(model, test, output_index=i if separate else None)
            for i, (domain, test) in enumerate(zip(task.domains, tests))}


def _is_1x(budget: float | None) -> bool:
    return budget is not None and abs(budget - 1.0) < 1e-9


def _students(config: BenchConfig, task: task_defs.Task, merge_record: dict, model, a, b, data, teacher: Teacher,
              tests, bar: tqdm) -> list[dict]:
    """The distillation students that follow one PLeaS merge (``model``, trained in place): kd-pleas, and
    at 1x kd-source too. Each record holds the merge's accuracy and seconds beside the student's."""
    where = {k: merge_record[k] for k in ("task", "arch", "pair")}
    bar.set_postfix_str(f"{where['task']}/{where['arch']} pair {where['pair']}: distillation from "
                        f"{merge_record['method']} {merge_record['budget']:g}", refresh=True)
    settings = DistillSettings(max_epochs=config.distill_epochs_for(where["arch"]), seed=where["pair"])
    trained = train_students(
        model, a.model, b.model, data, teacher, time_budget=merge_record["seconds"], settings=settings,
        with_source=_is_1x(merge_record["budget"]), evaluate=lambda m: _evaluation(m, task, tests))
    records = [{**where, "student": label, "budget": merge_record["budget"], "dense": merge_record["dense"],
                "merge_acc": merge_record["acc"], "merge_mean_acc": merge_record["mean_acc"],
                "merge_seconds": merge_record["seconds"], "teacher_seconds": teacher.seconds,
                "threads": torch.get_num_threads(), **record}
               for label, record in trained.items()]
    bar.update(len(records))
    return records


def _evaluation(model, task: task_defs.Task, tests) -> dict:
    acc = _accuracies(model, task, tests)
    return {"acc": acc, "mean_acc": sum(acc.values()) / len(acc)}


def run_pair(config: BenchConfig, task_name: str, arch: str, pair: int, bar: tqdm,
             log: Callable[[str], None]) -> dict[str, list[dict]]:
    """Everything measured on one seed pair of one (task, arch): its source, floor, merge, skip and
    distillation records."""
    task = task_defs.TASKS[task_name]
    where = {"task": task_name, "arch": arch, "pair": pair}
    a, b = task_defs.source_models(task, arch, pair, config.epochs_for(task_name, arch), log)
    tests = (a.test_set, b.test_set)
    records: dict[str, list[dict]] = {"sources": [], "floors": [], "merges": [], "skipped": [], "distill": []}
    for name, source, seed in zip("AB", (a, b), task_defs.pair_seeds(pair)):
        if task.heads == "shared":
            acc = {d.label: train.evaluate(source.model, t) for d, t in zip(task.domains, tests)}
        else:
            own = 0 if name == "A" else 1
            acc = {task.domains[own].label: train.evaluate(source.model, tests[own])}
        records["sources"].append({**where, "model": name, "seed": seed, "acc": acc,
                                   "train_seconds": source.train_seconds})

    calibration = {
        "task": task_defs.task_calibration(a, b, config.calibration, seed=pair),
        "free": task.free_data(config.calibration, task.archs[arch].resolution, pair),
    }
    floor = forward_floor([a.model, b.model], calibration["task"], batch_size=config.batch_size)
    records["floors"].append({**where, "seconds": floor, "samples": config.calibration})
    runs, skipped = plan_merges(config.methods, config.budgets, pair)
    synthesis = _synthesis(config, [label for label, _ in runs], a, b, calibration, pair, bar, where)
    records["skipped"] += [{**where, **s} for s in skipped]
    teacher: Teacher | None = None
    for label, budget in runs:
        setup = BENCH_METHODS[label]
        bar.set_postfix_str(f"{task_name}/{arch} pair {pair}: {label} {budget or ''}", refresh=True)
        record: dict[str, Any] = {**where, "method": label, "budget": budget}
        if setup.calibration == "synthetic" and "error" in synthesis:
            records["skipped"].append({**record, "reason": synthesis["error"]})
            bar.update(1)
            continue
        try:
            with PeakMemory() as memory, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # kept in the record (the report's own list), not printed per merge
                start = time.perf_counter()
                if setup.calibration in SPLIT_CALIBRATIONS:
                    match, refit = SPLIT_CALIBRATIONS[setup.calibration]
                    result = _split(a, b, calibration[match], calibration[refit], budget or 1.0, task.heads, pair,
                                    config.batch_size, setup.options)
                else:
                    result = merge(a.model, b.model, calibration[setup.calibration], method=setup.method,
                                   budget=budget or 1.0, heads=task.heads, seed=pair, batch_size=config.batch_size,
                                   progress=False, **setup.options)
                seconds = time.perf_counter() - start
        except PleasError as exc:
            kind = "skipped" if isinstance(exc, MergeInputError) else "error"
            records["skipped"].append({**record, "reason": f"{kind}: {type(exc).__name__}: {exc}"})
            bar.update(1)
            continue
        acc = _accuracies(result.model, task, tests)
        size = result.report["size"]
        record.update(
            acc=acc, mean_acc=sum(acc.values()) / len(acc), dense=size["relative_dense"],
            effective=size["relative_effective"], seconds=seconds, floor_ratio=seconds / floor,
            peak_mb=memory.peak_mb, extra_mb=memory.extra_mb, memory_exact=memory.exact,
            phases=result.report.get("seconds", {}), warnings=result.report.get("warnings", []),
            norm_stats=result.report.get("norm_stats"),
        )
        if setup.calibration == "synthetic":
            record["synthesis_seconds"] = synthesis["seconds"]
        records["merges"].append(record)
        bar.update(1)
        if label == DISTILL_METHOD and pair < config.distill_pairs:
            teacher = teacher or Teacher.of(a.model, b.model, calibration["task"], task.heads,
                                            batch_size=config.batch_size)
            records["distill"] += _students(config, task, record, result.model, a, b, calibration["task"], teacher,
                                            tests, bar)
    return records


#: The ablations' calibration: (the matching's data, the refit's and norm statistics' data).
SPLIT_CALIBRATIONS = {"free-match": ("free", "task"), "free-refit": ("task", "free")}


def _synthesis(config: BenchConfig, labels: list[str], a, b, calibration: dict, pair: int, bar: tqdm,
               where: dict) -> dict:
    """Synthesise the pair's calibration inputs (into ``calibration["synthetic"]``) when a method of
    ``labels`` (the pair's merges) calibrates on them: {"seconds": ...}, or {"error": ...} for models
    without BatchNorm."""
    if not any(BENCH_METHODS[m].calibration == "synthetic" for m in labels):
        return {}
    from ..synthesis import synthesize

    bar.set_postfix_str(f"{where['task']}/{where['arch']} pair {pair}: synthesising calibration data", refresh=True)
    steps = QUICK_SYNTHESIS_STEPS if config.quick else SYNTHESIS_STEPS
    start = time.perf_counter()
    try:
        calibration["synthetic"] = synthesize([a.model, b.model], min(SYNTHESIS_SAMPLES, config.calibration),
                                              shape=tuple(calibration["task"].shape[1:]), steps=steps, seed=pair,
                                              progress=False)
    except MergeInputError as exc:
        return {"error": f"skipped: {exc}"}
    return {"seconds": time.perf_counter() - start, "steps": steps}


def _split(a, b, match_data, refit_data, budget: float, heads: str, seed: int, batch_size: int, options: dict):
    """:func:`.free_ablation.split_merge` as a result with ``model`` and ``report`` (like :func:`pleas.merge`'s)."""
    from types import SimpleNamespace

    from .free_ablation import split_merge

    model, report = split_merge([a.model, b.model], match_data, refit_data, budget=budget, heads=heads, seed=seed,
                                batch_size=batch_size, **options)
    return SimpleNamespace(model=model, report=report)


#: Calibration sizes at which the PLeaS-versus-forward-floor ratio of resnet18 is measured again.
SCALING_SIZES = (1000, 2000, 4000)


def speed_scaling(config: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """PLeaS at 1x on the first selected task's resnet18 pair 0, timed against the forward floor at each
    of :data:`SCALING_SIZES` calibration samples the task's data can give (skipped in quick runs and
    when resnet18 or pleas is not in the run). The fixed costs of the refit (Gram matrices, solves)
    do not grow with the data, the forward floor does: this shows how the ratio falls."""
    chosen = next((t for t, a in config.selection if a == SPEED_ARCH), None)
    if config.quick or chosen is None or "pleas" not in config.methods:
        return []
    task = task_defs.TASKS[chosen]
    a, b = task_defs.source_models(task, SPEED_ARCH, 0, config.epochs_for(chosen, SPEED_ARCH), log)
    setup = BENCH_METHODS["pleas"]
    rows = []
    for samples in SCALING_SIZES:
        try:
            data = task_defs.task_calibration(a, b, samples, seed=0)
        except MergeInputError:
            continue
        floor = forward_floor([a.model, b.model], data, batch_size=config.batch_size)
        start = time.perf_counter()
        merge(a.model, b.model, data, method=setup.method, budget=1.0, heads=task.heads, seed=0,
              batch_size=config.batch_size, progress=False, **setup.options)
        seconds = time.perf_counter() - start
        rows.append({"task": chosen, "arch": SPEED_ARCH, "samples": samples, "floor": floor,
                     "seconds": seconds, "floor_ratio": seconds / floor})
    return rows


def count_merges(config: BenchConfig) -> int:
    per_task = sum(len(plan_merges(config.methods, config.budgets, pair)[0]) for pair in range(config.seed_pairs))
    return per_task * len(config.selection)


def count_students(config: BenchConfig) -> int:
    """Distillation students of the run: per distilled pair, one per PLeaS budget and one more at 1x."""
    runs, _ = plan_merges(config.methods, config.budgets)
    budgets = [b for label, b in runs if label == DISTILL_METHOD]
    per_pair = len(budgets) + sum(1 for b in budgets if _is_1x(b))
    return per_pair * min(config.distill_pairs, config.seed_pairs) * len(config.selection)


def calibration_plan(config: BenchConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """The (task, arch) pairs and method labels of the calibration-size axis (none in a run without sizes)."""
    if not config.calibration_sizes:
        return [], []
    return calibration_size.plan(config.selection, config.calibration_archs, config.methods)


def count_runs(config: BenchConfig) -> int:
    """Merges, distillation students and calibration-size merges: the progress bar's total."""
    combos, methods = calibration_plan(config)
    return (count_merges(config) + count_students(config)
            + calibration_size.count_runs(combos, methods, config.calibration_sizes))


def calibration_axis(config: BenchConfig, bar: tqdm, log: Callable[[str], None]) -> list[dict]:
    """The calibration-size axis of ``config`` (see :mod:`.calibration_size`)."""
    combos, methods = calibration_plan(config)
    if not combos or not methods:
        return []
    return calibration_size.run_axis(
        combos, methods, config.calibration_sizes, epochs_for=config.epochs_for, setups=BENCH_METHODS,
        evaluate=_accuracies, batch_size=config.batch_size, bar=bar, log=log)


def run_benchmark(config: BenchConfig, *, progress: bool = True, log: Callable[[str], None] | None = None,
                  on_update: Callable[[dict], None] | None = None) -> dict:
    """Run every merge of ``config``; returns ``{"config", "sources", "floors", "merges", "skipped",
    "distill", "seconds", "speed", "calibration_sizes", "axis_seconds"}`` (``seconds``: per "task/arch",
    wall time including training and distillation; ``axis_seconds``: the calibration-size axis's).
    ``on_update(results)`` is called after each (task, arch) with the results so far (e.g. to save them)."""
    results: dict[str, Any] = {"config": config.to_json(), "sources": [], "floors": [], "merges": [],
                               "skipped": [], "distill": [], "seconds": {}}
    bar = tqdm(total=count_runs(config), desc="pleas bench", unit="run", disable=not progress, dynamic_ncols=True)
    log = log or (lambda text: tqdm.write(text, file=sys.stderr))
    try:
        for task_name, arch in config.selection:
            start = time.perf_counter()
            for pair in range(config.seed_pairs):
                for kind, records in run_pair(config, task_name, arch, pair, bar, log).items():
                    results[kind] += records
            results["seconds"][f"{task_name}/{arch}"] = time.perf_counter() - start
            if on_update is not None:
                on_update(results)
        bar.set_postfix_str("PLeaS time against calibration size", refresh=True)
        results["speed"] = speed_scaling(config, log)
        start = time.perf_counter()
        results["calibration_sizes"] = calibration_axis(config, bar, log)
        results["axis_seconds"] = time.perf_counter() - start
    finally:
        bar.close()
    return results

"""Summaries over seed pairs of the raw benchmark results (the dict :func:`pleas.bench.run.run_benchmark`
returns, as saved in ``results.json``)."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

#: Per-merge numbers summarised over seed pairs (accuracies per domain come as "acc:<domain label>").
MERGE_FIELDS = ("mean_acc", "dense", "effective", "seconds", "floor_ratio", "peak_mb", "extra_mb", "synthesis_seconds")
#: A distillation student's checkpoints, and the numbers of each summarised as "<checkpoint>.<field>".
DISTILL_POINTS = ("start", "at_budget", "converged")
DISTILL_POINT_FIELDS = ("mean_acc", "seconds", "steps", "epochs", "loss")
#: Per-student numbers summarised as they are.
DISTILL_FIELDS = ("dense", "merge_mean_acc", "merge_seconds", "teacher_seconds")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for a single value), min, max and count of some values."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stat":
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Stat.of needs at least one value")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))


def budget_key(budget: float | None) -> float | None:
    """Budgets as dictionary keys (rounded so 1.2 read back from JSON finds 1.2)."""
    return None if budget is None else round(float(budget), 6)


class Summary:
    """Lookups into results summarised over seed pairs.

    ``merge(task, arch, method, budget)``: {field: Stat} (fields :data:`MERGE_FIELDS` and
    "acc:<domain>"), or None if not measured; ``source(task, arch, model, domain)``: Stat of a source
    model's accuracy; ``floor(task, arch)``: Stat of the forward floor in seconds;
    ``distill(task, arch, student, budget)``: a distillation student's numbers (see :meth:`distill`);
    ``axis(task, arch, method, samples)``: the calibration-size axis's records of one merge.
    """

    def __init__(self, results: dict):
        self.results = results
        self.tasks: dict = results.get("tasks", {})
        selection = results.get("config", {}).get("selection", [])
        self.combos: list[tuple[str, str]] = [(t, a) for t, a in selection if t in self.tasks]
        merges: dict[tuple, list[dict]] = defaultdict(list)
        for record in results.get("merges", []):
            key = (record["task"], record["arch"], record["method"], budget_key(record["budget"]))
            merges[key].append(record)
        self._merges = {key: self._summarise(records) for key, records in merges.items()}
        sources: dict[tuple, list[float]] = defaultdict(list)
        for record in results.get("sources", []):
            for domain, acc in record["acc"].items():
                sources[(record["task"], record["arch"], record["model"], domain)].append(acc)
        self._sources = {key: Stat.of(v) for key, v in sources.items()}
        floors: dict[tuple, list[float]] = defaultdict(list)
        for record in results.get("floors", []):
            floors[(record["task"], record["arch"])].append(record["seconds"])
        self._floors = {key: Stat.of(v) for key, v in floors.items()}
        students: dict[tuple, list[dict]] = defaultdict(list)
        for record in results.get("distill", []):
            students[(record["task"], record["arch"], record["student"], budget_key(record["budget"]))].append(record)
        self._students = dict(students)
        axis: dict[tuple, list[dict]] = defaultdict(list)
        for record in results.get("calibration_sizes", []):
            axis[(record["task"], record["arch"], record["method"], record["samples"])].append(record)
        self._axis = dict(axis)

    @staticmethod
    def _summarise(records: list[dict]) -> dict[str, Stat]:
        summary = {f: Stat.of(r[f] for r in records) for f in MERGE_FIELDS if all(r.get(f) is not None for r in records)}
        for domain in records[0]["acc"]:
            summary[f"acc:{domain}"] = Stat.of(r["acc"][domain] for r in records)
        return summary

    def merge(self, task: str, arch: str, method: str, budget: float | None) -> dict[str, Stat] | None:
        return self._merges.get((task, arch, method, budget_key(budget)))

    def mean_acc(self, task: str, arch: str, method: str, budget: float | None) -> Stat | None:
        found = self.merge(task, arch, method, budget)
        return found["mean_acc"] if found else None

    def budgets(self, task: str, arch: str, method: str) -> list[float | None]:
        """The budgets at which ``method`` was measured on (task, arch), in increasing order (None first)."""
        found = {b for (t, a, m, b) in self._merges if (t, a, m) == (task, arch, method)}
        return sorted(found, key=lambda b: -math.inf if b is None else b)

    def methods(self) -> list[str]:
        """Method labels in the order of the run's configuration."""
        configured = self.results.get("config", {}).get("methods", [])
        seen = {m for (_, _, m, _) in self._merges}
        return [m for m in configured if m in seen] + sorted(seen - set(configured))

    def source(self, task: str, arch: str, model: str, domain: str) -> Stat | None:
        return self._sources.get((task, arch, model, domain))

    def floor(self, task: str, arch: str) -> Stat | None:
        return self._floors.get((task, arch))

    def domains(self, task: str) -> list[str]:
        return [d["label"] for d in self.tasks[task]["domains"]]

    def pair_merge(self, task: str, arch: str, method: str, budget: float | None, pair: int) -> dict | None:
        """The raw record of one merge on one seed pair, or None."""
        return next((r for r in self.results.get("merges", []) if (r["task"], r["arch"], r["method"], r["pair"]) ==
                     (task, arch, method, pair) and budget_key(r["budget"]) == budget_key(budget)), None)

    def pairs(self, task: str, arch: str, method: str, budget: float | None) -> list[int]:
        """The seed pairs on which one merge was measured, in increasing order."""
        return sorted(r["pair"] for r in self.results.get("merges", []) if (r["task"], r["arch"], r["method"]) ==
                      (task, arch, method) and budget_key(r["budget"]) == budget_key(budget))

    def pairs_mean_acc(self, task: str, arch: str, method: str, budget: float | None, pairs: list[int]) -> Stat | None:
        """Stat of one merge's mean accuracy over the seed pairs ``pairs``, or None unless all were measured."""
        found = [self.pair_merge(task, arch, method, budget, p) for p in pairs]
        return Stat.of(r["mean_acc"] for r in found) if found and all(found) else None

    def distill(self, task: str, arch: str, student: str, budget: float | None) -> dict | None:
        """A distillation student over the pairs it was trained on: {"<checkpoint>.<field>": Stat} for the
        checkpoints :data:`DISTILL_POINTS` and fields :data:`DISTILL_POINT_FIELDS`, {field: Stat} for
        :data:`DISTILL_FIELDS`, "stopped" (how each pair's run ended), "budget_reached" (how many reached
        the time budget before converging), "pairs"; None if not measured."""
        records = self._students.get((task, arch, student, budget_key(budget)))
        if not records:
            return None
        summary: dict = {f: Stat.of(r[f] for r in records) for f in DISTILL_FIELDS
                         if all(r.get(f) is not None for r in records)}
        for point in DISTILL_POINTS:
            for f in DISTILL_POINT_FIELDS:
                values = [(r.get(point) or {}).get(f) for r in records]
                if all(v is not None for v in values):
                    summary[f"{point}.{f}"] = Stat.of(values)
        summary.update(stopped=[r["stopped"] for r in records], pairs=[r["pair"] for r in records],
                       budget_reached=sum(1 for r in records if r.get("budget_reached")))
        return summary

    def distill_combos(self) -> list[tuple[str, str]]:
        """The (task, arch) pairs with distillation students, in the run's order."""
        found = {(t, a) for (t, a, _, _) in self._students}
        return [c for c in self.combos if c in found]

    def distill_budgets(self, task: str, arch: str, student: str) -> list[float]:
        return sorted(b for (t, a, s, b) in self._students if (t, a, s) == (task, arch, student))

    def axis(self, task: str, arch: str, method: str, samples: int) -> list[dict]:
        """The calibration-size axis's records of ``method`` on (task, arch) at ``samples`` (one per pair)."""
        return self._axis.get((task, arch, method, samples), [])

    def axis_combos(self) -> list[tuple[str, str]]:
        found = {(t, a) for (t, a, _, _) in self._axis}
        return [c for c in self.combos if c in found]

    def axis_sizes(self, task: str, arch: str) -> list[tuple[int, int]]:
        """(samples used, size requested) on (task, arch), by size."""
        sizes = {(r["samples"], r["requested"]) for (t, a, _, _), records in self._axis.items() if (t, a) == (task, arch)
                 for r in records}
        return sorted(sizes)

    def axis_methods(self) -> list[str]:
        configured = self.results.get("config", {}).get("methods", [])
        seen = {m for (_, _, m, _) in self._axis}
        return [m for m in configured if m in seen] + sorted(seen - set(configured))

"""Summaries over seed pairs of the raw benchmark results (the dict :func:`pleas.bench.run.run_benchmark`
returns, as saved in ``results.json``)."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

#: Per-merge numbers summarised over seed pairs (accuracies per domain come as "acc:<domain label>").
MERGE_FIELDS = ("mean_acc", "dense", "effective", "seconds", "floor_ratio", "peak_mb", "extra_mb")


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
    model's accuracy; ``floor(task, arch)``: Stat of the forward floor in seconds.
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

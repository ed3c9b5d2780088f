"""``rebasin``: Git Re-Basin. Align B to A (weight or activation matching), then average (1x).

Above 1x it merges only the most similar pairs of each group and keeps the rest of both models
(PLeaS's partial merge, without the least-squares refit). ``allocation="uniform"``: one merge
fraction for every group, the least merging that meets the budget; ``"greedy"``: every group's k_g
chosen together to lose the least similarity per unit of size (:func:`pleas.budget.allocate_merge_counts`);
``"measured"``: the same with each group's weight measured as the output change when that group alone
is fully merged; ``"downstream"``: every k_g chosen together to lose the least output energy of the
layers that read the group, from the activation covariances and the weights
(:func:`pleas.budget.downstream_merge_counts`); ``"prefix"``: ZipIt!'s schedule, whole groups merged in
graph order until the budget is met; or ``merge_counts`` (k_g per group) given directly. The default
is ``"uniform"`` for dense budgets (``budget_metric`` "params" or "flops", where no allocator measured
better for PLeaS) and ``"downstream"`` for effective ones ("effective_params", "effective_flops"; the
paper's count, where keeping whole regions apart is cheap; README, "Spreading the budget over groups").
"""
from __future__ import annotations

from ..budget import (allocate_merge_counts, downstream_merge_counts, group_sensitivity, prefix_merge_counts,
                      uniform_merge_counts)
from ..errors import MergeInputError
from ..plans import partial_merge_map
from .registry import MergeMethod, register_method


ALLOCATIONS = ("uniform", "greedy", "measured", "downstream", "prefix")


@register_method
class Rebasin(MergeMethod):
    name = "rebasin"

    def __init__(self, *, merge_counts: dict[str, int] | None = None, allocation: str | None = None):
        if allocation is not None and allocation not in ALLOCATIONS:
            raise MergeInputError(f"allocation={allocation!r}; allowed: {ALLOCATIONS}")
        self.merge_counts = merge_counts
        self.allocation = allocation

    def allocation_for(self, job) -> str:
        """The allocation used: the one asked for, else the default for the budget's metric."""
        if self.allocation is not None:
            return self.allocation
        return "downstream" if job.effective_budget else "uniform"

    def plan(self, job):
        if self.merge_counts is None and job.budget != 1.0:
            job.extra["allocation"] = self.allocation_for(job)  # shown in the report
            if job.extra["allocation"] == "downstream":
                job.moments()  # the full moments it needs, gathered first so that the matching reuses this pass
        matching = job.match()
        counts = self.counts(job)
        return {
            g.name: partial_merge_map(matching.perms[g.name], matching.similarity[g.name], counts[g.name])
            for g in job.spec
        }

    def counts(self, job) -> dict[str, int]:
        if self.merge_counts is None:
            if job.budget == 1.0:
                return {g.name: g.width for g in job.spec}
            allocation = self.allocation_for(job)
            if allocation in ("greedy", "measured"):
                matching = job.match()
                weights = group_sensitivity(job, matching) if allocation == "measured" else None
                return allocate_merge_counts(job.spec, matching.similarity, job.sizes, job.budget_metric,
                                             job.target(), weights=weights)
            if allocation == "downstream":
                return downstream_merge_counts(job)
            if allocation == "prefix":
                return prefix_merge_counts(job.spec, job.sizes, job.budget_metric, job.target())
            return uniform_merge_counts(job.spec, job.sizes, job.budget_metric, job.target())
        names = {g.name: g for g in job.spec}
        unknown = sorted(set(self.merge_counts) - set(names))
        if unknown:
            raise MergeInputError(f"merge_counts names unknown groups {unknown[:5]}; groups: {list(names)[:10]}...")
        counts = {g.name: g.width for g in job.spec}
        for name, k in self.merge_counts.items():
            if not 0 <= int(k) <= names[name].width:
                raise MergeInputError(f"merge_counts[{name!r}]={k}; allowed: 0 to {names[name].width}")
            counts[name] = int(k)
        return counts

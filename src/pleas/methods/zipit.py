"""``zipit``: ZipIt! (Stoica et al. 2024). Greedy merging over the stacked units of both models by
correlation, same-model merges included, and *partial zipping*: zip the groups up to some depth (in
topological order) and keep the rest of both models side by side, the depth chosen to meet the budget
(the last zipped group only as far as the budget needs, so budgets between two depths are met too)."""
from __future__ import annotations

from ..errors import MergeInputError
from ..plans import ensemble_map
from ..zipit_match import zip_units
from .registry import MergeMethod, register_method


@register_method
class ZipIt(MergeMethod):
    """Options: ``alpha`` scales same-model correlations (0 forbids same-model merges); ``beta`` caps
    each model's same-model merges at ``beta * (units removed) / n_models``."""

    name = "zipit"

    def __init__(self, *, alpha: float = 0.5, beta: float = 1.0):
        self.alpha, self.beta = float(alpha), float(beta)

    def plan(self, job):
        if job.effective_budget and job.budget != 1.0:
            raise MergeInputError(
                f"zipit with budget_metric={job.budget_metric!r}: effective sizes assume PLeaS's layout (merged pairs, "
                "then each model's own units), which zipping within a model breaks; allowed: 'params', 'flops'"
            )
        n = len(job.models)
        widths = self.zip_widths(job)
        moments = job.moments()
        maps = {}
        for g in job.spec:
            if widths[g.name] < n * g.width:
                maps[g.name] = zip_units(moments[g.name].correlation(), n_models=n, target=widths[g.name],
                                         alpha=self.alpha, beta=self.beta)
            else:
                maps[g.name] = ensemble_map(g.width, n)
        return maps

    @staticmethod
    def zip_widths(job) -> dict[str, int]:
        """Each group's width after zipping: the fewest leading groups (in graph order) zipped so that
        the dense size is within the budget, all of them fully (to one model's width) but the last,
        which is zipped only as far as the budget needs (the widest width that still fits), and the
        groups after it kept apart."""
        groups = list(job.spec)
        n = len(job.models)
        target = job.target() * (1 + 1e-9)
        widths = {g.name: n * g.width for g in groups}
        for g in groups:
            if job.size(widths) <= target:
                break
            lo, hi = g.width, n * g.width  # size(lo) is the smallest this group can give
            widths[g.name] = lo
            if job.size(widths) <= target:
                while lo < hi:  # the widest width of this group that fits; size grows with width
                    mid = (lo + hi + 1) // 2
                    widths[g.name] = mid
                    if job.size(widths) <= target:
                        lo = mid
                    else:
                        hi = mid - 1
                widths[g.name] = lo
        return widths

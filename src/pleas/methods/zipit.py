"""``zipit``: ZipIt! (Stoica et al. 2024). Greedy merging over the stacked units of both models by
correlation, same-model merges included, and *partial zipping*: zip the groups up to some depth (in
topological order) and keep the rest of both models side by side, the depth chosen to meet the budget."""
from __future__ import annotations

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
        groups = list(job.spec)
        n = len(job.models)
        depth = self.zip_depth(job)
        moments = job.moments()
        maps = {}
        for i, g in enumerate(groups):
            if i < depth:
                maps[g.name] = zip_units(
                    moments[g.name].correlation(), n_models=n, target=g.width, alpha=self.alpha, beta=self.beta
                )
            else:
                maps[g.name] = ensemble_map(g.width, n)
        return maps

    @staticmethod
    def zip_depth(job) -> int:
        """The fewest leading groups to zip so that the dense size is within the budget."""
        groups = list(job.spec)
        n = len(job.models)
        target = job.target()
        for depth in range(len(groups) + 1):
            widths = {g.name: g.width if i < depth else n * g.width for i, g in enumerate(groups)}
            if job.size(widths) <= target * (1 + 1e-9):
                return depth
        return len(groups)
